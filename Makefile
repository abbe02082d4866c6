# pi0 appliance: `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch comes first and pinned: 2.13.0 is the local CPU build; an open range would pull a CUDA build.
TORCH := torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help setup demo test bench lint format clean

help:
	@echo "make demo   - set up, then export the pi0-dummy preset, serve it and drive it through the client"
	@echo "make test   - set up, then run the test suite"
	@echo "make bench  - run the benchmarks (minutes, ~15 GB RAM and disk) and rewrite docs/benchmarks.md"
	@echo "make lint   - ruff check and format check"
	@echo "make setup  - create $(VENV) and install what the targets need (idempotent)"
	@echo "make clean  - remove $(VENV) and build outputs"

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python 3.10+ is required"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[export,runtime,sim,dev]'
	touch $@

setup: $(STAMP)

DEMO := build/demo

# The main job on the built-in default, as far as the steps built so far go (the MuJoCo sim comes
# with Step 4): the pi0-dummy preset exported to a validated bundle, then served by the daemon and
# driven through the controller's client, with the latency breakdown of both.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(VENV)/bin/pi0-export bundle --preset pi0-dummy --out $(DEMO)/bundle --prompt "transfer the cube"
	$(VENV)/bin/pi0-runtime bench --bundle $(DEMO)/bundle --n 10 --through-server

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# Device images often ship Python 3.10: check that the code at least parses there.
	@if python3.10 --version >/dev/null 2>&1; then python3.10 -m compileall -q exporter runtime sim tests benchmarks; \
	else echo "python3.10 not found: skipped the 3.10 syntax check"; fi

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
