"""The benchmarks cannot rot unseen: every benchmark module (one that defines `run`) runs its `--smoke` (tiny
sizes, seconds), all in one process from the repo root as `python benchmarks/run.py --smoke` runs them, and its
doc section renders from that result; a benchmark module that run.py would not run fails here.

Where LeRobot's venv is missing (`make lerobot-venv`; not in CI), the LeRobot side of the benchmarks that
have one is skipped by the smoke, which says so; its own test here is then skipped with that reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks import run as bench  # run.py imports no benchmark until one is used

ROOT = bench.ROOT
LEROBOT_SIDE = ("fp16_islands", "lerobot_side_by_side")  # their LeRobot side needs build/lerobot-venv


@pytest.fixture(scope="module")
def smoke():
    """name -> its smoke's finished run; every smoke runs once, all in one process (as run.py runs them),
    the first time a test here asks for one."""
    runs: dict[str, subprocess.CompletedProcess] = {}

    def finished(name: str) -> subprocess.CompletedProcess:
        if not runs:
            runs.update(bench.smoke_processes(bench.benchmark_modules()))
        return runs[name]

    return finished


def smoke_result(smoke, name: str) -> dict:
    done = smoke(name)
    assert done.returncode == 0, f"benchmarks.{name} --smoke exited {done.returncode}:\n{done.stderr[-5000:]}"
    assert "{" in done.stdout, f"python -m benchmarks.{name} --smoke printed no JSON result: has it a --smoke?"
    return bench.result_of(done.stdout)


def test_run_py_runs_every_benchmark_module() -> None:
    assert bench.unregistered() == [], "benchmark modules that benchmarks/run.py neither renders nor smoke-runs"
    assert set(bench.BENCHMARKS) | set(bench.ELSEWHERE) <= set(bench.benchmark_modules())


def test_running_some_benchmarks_keeps_the_others_as_the_doc_shows_them() -> None:
    """`run.py NAME`: the benchmarks not run keep their sections (notes written by hand included) and their
    target rows from the doc as it was; one the doc never showed says it has not run."""
    kept = (
        "# Benchmarks\n\n## Targets\n\n| target | wanted | measured | benchmark |\n|---|---|---|---|\n"
        "| guided / one branch | <= 1.4x | 1.30x | guidance |\n\n"
        "## Classifier-free guidance (`benchmarks/guidance.py`)\n\n_Run then; a note by hand._\n\n| a | b |\n\n"
        "## sim_harness\n\nNot run yet: `python benchmarks/run.py sim_harness`.\n"
    )
    doc = bench.render({}, kept)
    assert "| guided / one branch | <= 1.4x | 1.30x | guidance |" in doc
    assert "## Classifier-free guidance (`benchmarks/guidance.py`)\n\n_Run then; a note by hand._\n\n| a | b |\n" in doc
    assert "## service\n\nNot run yet" in doc and "## sim_harness\n\nNot run yet" in doc
    assert bench.render({}, doc) == doc  # rendering what it wrote changes nothing
    assert "## guidance\n\nNot run yet" in bench.render({}, "")  # no doc yet: every section says so


@pytest.mark.system
@pytest.mark.parametrize("name", bench.benchmark_modules())
def test_smoke_runs_and_renders(name: str, smoke) -> None:
    result = smoke_result(smoke, name)
    assert isinstance(result, dict) and result
    if name in bench.BENCHMARKS:
        stale = f"## Old (`benchmarks/{name}.py`)\n\nstale figures\n\n| t | w | m | {name} |"
        doc = bench.render({name: {"when": "smoke", "result": result}}, kept=stale)
        assert f"(`benchmarks/{name}.py`" in doc  # its section's heading, rendered from the result
        assert "stale figures" not in doc and f"| t | w | m | {name} |" not in doc  # a new result replaces them
    if name == "load":
        assert result["load"]["lost"] == 0 and result["soak"]["lost"] == 0 and result["daemon_exit"] == 0


@pytest.mark.system
@pytest.mark.parametrize("name", LEROBOT_SIDE)
def test_the_lerobot_side(name: str, smoke) -> None:
    from benchmarks.lerobot_side_by_side import LEROBOT

    result = smoke_result(smoke, name)
    if LEROBOT in result.get("skipped", {}):
        pytest.skip(f"{name}: {LEROBOT} not run: {result['skipped'][LEROBOT]}")
    cases = result["cases"].values()
    if name == "lerobot_side_by_side":  # LeRobot timed beside ours, on the same tiny checkpoint and inputs
        assert all({"LeRobot fp32", "LeRobot bf16"} <= set(case["ms"]) for case in cases)
        assert all(v <= 1e-4 for case in cases for k, v in case["max_abs_vs_lerobot_fp32"].items() if "ours" in k)
    else:  # LeRobot made the checkpoint; our fp32 and fp16 bundles of it validate
        assert all(case[p]["report"]["passed"] for case in cases for p in ("fp32", "fp16"))


@pytest.mark.system
def test_run_py_smoke_writes_only_its_out_dir(tmp_path: Path, smoke, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = ROOT / "docs" / "benchmarks.md"
    before = docs.read_bytes()
    saved = bench.RESULTS / "ascend_estimate.json"
    saved_before = saved.read_bytes() if saved.exists() else None
    monkeypatch.setattr(bench, "smoke_processes", lambda names: {name: smoke(name) for name in names})  # no rerun
    assert bench.smoke(["ascend_estimate"], tmp_path) == 0
    assert "(`benchmarks/ascend_estimate.py`" in (tmp_path / "benchmarks.md").read_text()
    assert json.loads((tmp_path / "ascend_estimate.json").read_text())["result"]
    assert docs.read_bytes() == before
    assert (saved.read_bytes() if saved.exists() else None) == saved_before
