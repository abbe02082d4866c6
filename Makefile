# pi0 appliance: `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch comes first and pinned: 2.13.0 is the local CPU build; an open range would pull a CUDA build.
TORCH := torch==2.13.0
# MuJoCo's headless rendering (EGL, OSMesa); building and checking the device package and image; a real
# Prometheus scraping the daemon in the tests; the signed apt repository (apt-ftparchive from apt-utils, gpg).
SYSTEM_PACKAGES := libegl1 libgl1-mesa-dri libosmesa6 lintian debootstrap systemd-container prometheus apt-utils gnupg
ARCH ?= $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEVICE_PYTHON ?= 3.11

.DEFAULT_GOAL := help
.PHONY: help setup demo test bench fuzz load lerobot-venv openpi-venv lint format clean wheel deb image repo

help:
	@echo "make demo   - set up, then export the shipped trained pi0, serve it with the daemon and drive one sim episode"
	@echo "make test   - set up, then run the test suite"
	@echo "make fuzz   - the long protocol fuzz run (100,000 messages; minutes)"
	@echo "make load   - 16 clients x 500 requests, then 10,000 requests for RSS, on the pi0-dummy daemon"
	@echo "make bench  - run the benchmarks (~20 min, ~15 GB RAM, ~20 GB disk with LeRobot's own venv) and rewrite docs/benchmarks.md"
	@echo "make lint   - ruff check and format check"
	@echo "make wheel  - the runtime and client wheels (no torch) in dist/"
	@echo "make deb    - the device's Debian package in dist/ (ARCH=amd64|arm64, DEVICE_PYTHON=3.11)"
	@echo "make image  - dist/image-ARCH/: the .deb, a rootfs overlay, a debootstrap rootfs, a manifest (root)"
	@echo "make repo   - dist/repo/: a signed apt repository of pi0-runtime and bundle packages for a fleet"
	@echo "              (BUNDLES=\"NAME=DIR:VERSION ...\", default the demo policy; REPO_KEY=gpg key id, default"
	@echo "              a throwaway test key; RUNTIME_VERSION=...; docs/deploy.md, \"Fleet rollout over apt\")"
	@echo "make openpi-venv OPENPI_SRC=DIR - openpi in build/ (proving robot adapters live; tests/fixtures/openpi-transforms)"
	@echo "make setup  - create $(VENV) and install what the targets need (idempotent)"
	@echo "make clean  - remove $(VENV) and build outputs"

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python 3.10+ is required"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[export,runtime,sim,dev,jax,ray]'
	@# openpi's own robot-side client, unchanged, for the websocket tests; --no-deps: its numpy<2 pin is
	@# stale (its code runs on numpy 2; the tests show it) and what it imports is in the dev extra.
	$(PY) -m pip install --quiet --no-deps openpi-client==0.1.2
	@# MuJoCo renders headless through EGL (libegl1 + Mesa) or, as the fallback, OSMesa (libosmesa6);
	@# the packaging tests run lintian, debootstrap and systemd-nspawn; the metrics test a real Prometheus.
	@if ldconfig -p | grep -q 'libEGL.so.1 ' && ldconfig -p | grep -q libOSMesa \
		&& command -v lintian >/dev/null && command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null \
		&& command -v prometheus >/dev/null && command -v apt-ftparchive >/dev/null && command -v gpg >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; } \
		|| echo "warning: could not install $(SYSTEM_PACKAGES); MuJoCo rendering may fail"; \
	else echo "note: run as root or install them first: sudo apt-get install $(SYSTEM_PACKAGES)"; fi
	touch $@

setup: $(STAMP)

DEMO := build/demo

# The shipped policy: pi0-cpu trained by `pi0-sim train` on 100 scripted transfer-cube demonstrations
# (sim/policies/transfer-cube/README.md has the recipe and its success table).
POLICY := sim/policies/transfer-cube
DEMO_SEED := 0
# The task the policy was trained on, served to clients that send no prompt (openpi's aloha_sim example).
DEMO_PROMPT := Pick up the cube with the right arm and transfer it to the left arm.

# The main job on the built-in default: the shipped trained pi0 exported to a validated fp16 bundle (the
# 310P's precision); the daemon started on it (supervised like systemd: READY=1, then SIGTERM and a clean
# exit); one gym-aloha transfer-cube episode on a seed the demonstrations never used, driven through the
# controller's client; the report printed and the video written. It fails if the cube is not transferred.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(VENV)/bin/pi0-export bundle --checkpoint $(POLICY)/checkpoint --tokenizer $(POLICY)/tokenizer.model \
		--precision fp16 --default-prompt "$(DEMO_PROMPT)" --out $(DEMO)/bundle
	$(VENV)/bin/pi0-sim run --bundle $(DEMO)/bundle --seed $(DEMO_SEED) --actions-per-chunk 25 --min-success-rate 1 \
		--report $(DEMO)/report.json --video $(DEMO)/episode.mp4

# The 25 slowest tests close the log: what to look at when the suite nears its time budget (15 min in CI).
test: setup
	$(PY) -m pytest -q --durations=25

# The long fuzz run: 25,000 generated messages per strategy, four strategies (100,000 in all) plus deep
# nesting, through the server's request handling with the real engine (`make test` runs 300 each).
fuzz: setup
	PI0_FUZZ_EXAMPLES=25000 $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py tests/test_websocket.py

# 16 clients x 500 requests on the pi0-dummy daemon (every reply counted), then 10,000 more for RSS.
load: setup
	$(PY) benchmarks/load.py

LEROBOT_VENV := build/lerobot-venv

# LeRobot 0.3.3 for the side-by-side benchmark, apart from our venv (its pins conflict with ours).
$(LEROBOT_VENV)/.stamp: benchmarks/lerobot-requirements.txt
	$(PYTHON) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/pip install -q -r benchmarks/lerobot-requirements.txt
	$(LEROBOT_VENV)/bin/pip install -q --no-deps lerobot==0.3.3
	$(LEROBOT_VENV)/bin/python -c "import lerobot.policies.pi0.modeling_pi0"
	touch $@

lerobot-venv: $(LEROBOT_VENV)/.stamp

# openpi (its source at 15a9616a, from an openpi checkout given as OPENPI_SRC) for proving robot adapters live
# and re-making tests/fixtures/openpi-transforms; the recipe of the fixtures' makers (openpi's own pins).
OPENPI_VENV := build/openpi-venv
OPENPI_PYTHON ?= python3.11
openpi-venv:
	@test -d "$(OPENPI_SRC)/src/openpi" || { echo "give OPENPI_SRC=path/to/an/openpi/checkout"; exit 2; }
	[ "$$(realpath "$(OPENPI_SRC)")" = "$$(realpath -m build/openpi-src)" ] || { rm -rf build/openpi-src && mkdir -p build/openpi-src \
		&& cp -r "$(OPENPI_SRC)"/src "$(OPENPI_SRC)"/packages "$(OPENPI_SRC)"/examples build/openpi-src/; }
	$(OPENPI_PYTHON) -m venv $(OPENPI_VENV)
	$(OPENPI_VENV)/bin/pip install -q pip==24.3.1 && $(OPENPI_VENV)/bin/pip install -q $(TORCH)
	$(OPENPI_VENV)/bin/pip install -q "jax[cpu]==0.5.3" flax==0.10.2 orbax-checkpoint==0.11.13 tensorstore==0.1.74 \
		ml-dtypes==0.4.1 numpy==1.26.4 chex==0.1.90 jaxtyping==0.2.36 beartype==0.19.0 ml_collections==1.0.0 augmax \
		einops equinox numpydantic tyro etils fsspec filelock tqdm-loggable sentencepiece optax safetensors dm-tree \
		transformers==4.53.2 typing-extensions treescope rich polars "pillow==13.0.*" websockets
	cp -r build/openpi-src/src/openpi/models_pytorch/transformers_replace/* $(OPENPI_VENV)/lib/python3.11/site-packages/transformers/
	PYTHONPATH=build/openpi-src/src $(OPENPI_VENV)/bin/python -c "import openpi.training.config"

bench: setup lerobot-venv
	$(PY) benchmarks/run.py

wheel: setup
	$(PY) packaging/wheels.py --out dist

deb: setup
	$(PY) packaging/deb.py --arch $(ARCH) --python $(DEVICE_PYTHON) --out dist

image: setup
	$(PY) packaging/image.py --arch $(ARCH) --python $(DEVICE_PYTHON) --out dist/image-$(ARCH)

# The fleet's apt repository (docs/deploy.md, "Fleet rollout over apt"): pi0-runtime for ARCH and the bundles
# BUNDLES names as pi0-bundle-NAME packages, added to dist/repo (what is there stays; a version published is
# never rebuilt), indexed and signed with REPO_KEY, a gpg key id in your keyring; without one, with a
# throwaway key, for tests only. RUNTIME_VERSION: pi0-runtime's Debian version (default the project's).
# Default BUNDLES: the shipped demo policy exported in fp16 (as `make demo` serves it), as transfer-cube.
PROJECT_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
FLEET_DEMO := build/fleet/transfer-cube
BUNDLES ?= transfer-cube=$(FLEET_DEMO):$(PROJECT_VERSION)

$(FLEET_DEMO)/manifest.json: | $(STAMP)
	rm -rf $(FLEET_DEMO)
	$(VENV)/bin/pi0-export bundle --checkpoint $(POLICY)/checkpoint --tokenizer $(POLICY)/tokenizer.model \
		--precision fp16 --default-prompt "$(DEMO_PROMPT)" --out $(FLEET_DEMO)

repo: setup $(if $(findstring $(FLEET_DEMO),$(BUNDLES)),$(FLEET_DEMO)/manifest.json)
	$(PY) packaging/repo.py --out dist/repo --runtime --arch $(ARCH) --python $(DEVICE_PYTHON) \
		$(if $(RUNTIME_VERSION),--runtime-version $(RUNTIME_VERSION)) $(if $(REPO_KEY),--key $(REPO_KEY)) \
		$(foreach bundle,$(BUNDLES),--bundle $(bundle))

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# Device images often ship Python 3.10: check that the code at least parses there.
	@if python3.10 --version >/dev/null 2>&1; then python3.10 -m compileall -q exporter runtime sim tests benchmarks packaging; \
	else echo "python3.10 not found: skipped the 3.10 syntax check"; fi

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
