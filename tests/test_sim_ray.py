"""`pi0-sim eval --ray`: episodes as Ray tasks (`sim.cluster`), against a real Ray cluster this module starts
on loopback with 2 CPUs (`ray start --head`) and stops. The shipped trained policy drives MuJoCo: what is
asserted is that Ray tasks and local worker processes give the same episodes on the same seeds, successes
included, and the counts."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import QUIET

import sim.evaluate
from sim.cli import main as pi0_sim

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_with_us() -> None:
    """In the child, before exec: SIGTERM when this process dies (a crash skips the fixture's teardown)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def session_pids(session: int) -> list[int]:
    """The processes of the session `session` (what `ray start` started: its GCS, raylet, agents, workers)."""
    listed = subprocess.run(["ps", "-o", "pid=", "-s", str(session)], capture_output=True, text=True).stdout
    return [int(pid) for pid in listed.split()]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A one-node Ray cluster on loopback with 2 CPUs -> its address. `ray start --head --block` runs in a
    session of its own; to stop it, SIGTERM to that process, which stops what it started, then SIGKILL
    to anything of its session still there (never `ray stop`, which stops every Ray on the machine).
    Ray's temporary directory is short (its sockets live there) and ours. Ray on Linux turns 127.0.0.1
    into the machine's routable address and listens on every interface; the switch it keeps for
    single-machine Windows and macOS keeps the cluster, its workers and this process's driver on loopback."""
    import ray._private.ray_constants as ray_constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # this process's driver (Ray read it at import)
        yield from loopback_cluster()


def loopback_cluster() -> Iterator[str]:
    """`ray_cluster`'s cluster: started, its address yielded, stopped."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    argv += ["--port", str(port), "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "false"]
    argv += ["--dashboard-agent-listen-port", str(free_port())]
    argv += ["--object-store-memory", str(100 * 2**20), "--temp-dir", temp]
    log_path = Path(temp) / "ray-start.log"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=stop_with_us
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid in session_pids(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def eval_run(argv: list[str], out: Path) -> tuple[dict[str, Any], str]:
    """`pi0-sim eval ARGV` -> its one configuration's row and its table."""
    out.mkdir()
    assert pi0_sim([*argv, "--report", str(out / "eval.json"), "--table", str(out / "table.md")]) == 0
    (row,) = json.loads((out / "eval.json").read_text())["configurations"]
    return row, (out / "table.md").read_text()


SHIPPED = ROOT / "sim" / "policies" / "transfer-cube"
SEEDS = [0, 1, 2]  # held out (the demonstrations used 100-199)


@pytest.fixture(scope="module")
def shipped_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained policy in the repository as an fp32 bundle (its validation is tests/test_sim.py's)."""
    from exporter.bundle import BundleOptions, build_bundle
    from exporter.checkpoint import load_checkpoint

    options = BundleOptions(tokenizer=SHIPPED / "tokenizer.model", validate=False)
    out = tmp_path_factory.mktemp("shipped") / "bundle"
    return build_bundle(load_checkpoint(SHIPPED / "checkpoint"), out, options, **QUIET)


def test_eval_on_ray_gives_the_episodes_of_local_workers(
    ray_cluster: str, shipped_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same seeds through `--workers 2` (processes sharing one daemon) and `--ray ADDRESS --workers 3`
    (three Ray tasks, each serving the bundle itself): every episode the same but for its latencies (its
    steps, requests, rewards, success and, from every executed action, its figures at chunk boundaries),
    merged into the same row and table by the same code."""
    merged = []  # each run's episodes, as `run_configuration` hands them to `summary_row`
    summary_row = sim.evaluate.summary_row
    monkeypatch.setattr(sim.evaluate, "summary_row", lambda *a: merged.append(a[4]) or summary_row(*a))
    argv = ["eval", "--policy", f"shipped={shipped_bundle}", "--episodes", str(len(SEEDS)), "--seed", str(SEEDS[0])]
    argv += ["--actions-per-chunk", "25"]
    local, local_table = eval_run([*argv, "--workers", "2"], tmp_path / "local")
    on_ray, ray_table = eval_run([*argv, "--workers", "3", "--ray", ray_cluster], tmp_path / "ray")

    assert local["ray_nodes"] is None and on_ray["ray_nodes"] == ["127.0.0.1"]
    for row in (local, on_ray):
        assert row["seeds"] == SEEDS and row["episodes"] == len(SEEDS) and row["errors"] == 0, row
        assert row["served_by"] == "onnxruntime" and row["latency_p50_ms"] > 0
    unlike = ("latency_ms", "latency_ms_each")  # each episode's round trips: the one thing that may differ
    episodes = [[{k: v for k, v in e.items() if k not in unlike} for e in run] for run in merged]
    assert len(episodes) == 2 and [e["seed"] for e in episodes[1]] == SEEDS
    assert episodes[1] == episodes[0]
    assert on_ray["successes"] >= 2, on_ray  # seeds 0 and 1 succeed in every configuration (tests/test_sim.py)
    timing = ("latency_p50_ms", "wall_s", "ray_nodes")
    assert {k: v for k, v in on_ray.items() if k not in timing} == {k: v for k, v in local.items() if k not in timing}
    assert re.sub(r"\d+\.\d ms", "ms", ray_table) == re.sub(r"\d+\.\d ms", "ms", local_table)


def test_ray_auto_and_a_failing_task(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`--ray auto` finds the cluster RAY_ADDRESS names (Ray's own rule); an error inside a task (here a
    checkpoint without --tokenizer, refused where the task would serve it) is one line naming its seeds."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    caplog.set_level("INFO")
    argv = ["eval", "--policy", f"ckpt={tmp_path}", "--episodes", "2", "--seed", "7", "--workers", "1"]
    assert pi0_sim([*argv, "--ray", "auto"]) == 2
    assert "Ray cluster at auto: 2 CPUs on 127.0.0.1" in caplog.text
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith("the Ray task of seeds 7-8 failed: ckpt: a checkpoint's reference server needs --tokenizer")
    assert "\n" not in error
