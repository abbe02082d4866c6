"""`pi0-runtime bench`: latency of the engine, and of the whole service as a controller sees it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pi0_client.client import PolicyClient, ServerUnavailableError
from runtime.bundle.manifest import Bundle
from runtime.bundle.spec import PolicySpec
from runtime.daemon.state_guard import StateGuard, StateRangeSettings
from runtime.daemon.stats import summarize
from runtime.engine import Engine
from runtime.errors import ApplianceError
from runtime.pipeline.observation import Observation


class BenchError(ApplianceError):
    """The served daemon did not come up or did not stop cleanly."""


STAGES = ("preprocess_ms", "vlm_ms", "expert_ms", "expert_step_ms", "postprocess_ms", "total_ms")


def bench_engine(engine: Engine, n: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    request = Observation.synthetic(engine.metadata())
    timings = []
    for i in range(warmup + n):
        _, timing = engine.infer(request)
        if i >= warmup:
            timings.append(timing)
    return {stage: summarize(t[stage] for t in timings) for stage in STAGES}


def free_tcp_endpoint() -> str:
    """A loopback TCP endpoint on a port the kernel just gave out (free now; a benchmark binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def bench_server(
    bundle: Bundle,
    n: int,
    backend: str = "auto",
    warmup: int = 2,
    ready_timeout_s: float = 300.0,
    config: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Start `pi0-runtime serve` on loopback TCP in a child process (with `config`, that config file),
    send n requests through PolicyClient once it answers a ping (random frames, a `typical_state`), and
    report per request the round trip, the service overhead (round trip minus the engine's own time) and
    the part of it the server measures itself before the reply is encoded (its `queue_ms`: decoding,
    validation, the hand-off to the engine's thread, the state guard). The child is stopped with SIGTERM
    and must exit cleanly."""
    endpoint = free_tcp_endpoint()
    command = [sys.executable, "-m", "runtime.cli", "serve", "--bundle", str(bundle.root), "--backend", backend]
    if config is not None:
        command += ["--config", str(config)]
    with tempfile.TemporaryFile("w+") as log_file:
        child = subprocess.Popen([*command, "--endpoint", endpoint], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            with PolicyClient(endpoint, timeout_s=60) as client:
                _wait_until_serving(client, child, log_file, ready_timeout_s)
                obs = Observation.synthetic(client.metadata()).to_dict()
                state = typical_state(bundle.spec)
                if state is not None:
                    obs["observation.state"] = state
                round_trips, overheads, queued = [], [], []
                for i in range(warmup + n):
                    start = time.perf_counter()
                    result = client.infer(obs)
                    elapsed = (time.perf_counter() - start) * 1e3
                    if i >= warmup:
                        round_trips.append(elapsed)
                        overheads.append(elapsed - result["timing"]["total_ms"])
                        queued.append(result["timing"]["queue_ms"])
        finally:
            child.send_signal(signal.SIGTERM)
            code = child.wait(timeout=60)
        if code != 0:
            log_file.seek(0)
            raise BenchError(f"`pi0-runtime serve` exited with {code} on SIGTERM:\n{log_file.read()}")
    return {
        "round_trip_ms": summarize(round_trips),
        "service_overhead_ms": summarize(overheads),
        "server_queue_ms": summarize(queued),
    }


def typical_state(spec: PolicySpec) -> np.ndarray | None:
    """A state inside the policy's training range, as a robot in normal operation sends it, so that what
    is timed is the served path and not the state guard's warning: the zero pose or the statistics' centre
    (mean, or the quantiles' midpoint; before the robot's adapter), whichever the daemon's default guard accepts first; None when neither
    is (or the policy has no state statistics), and the synthetic random state is sent."""
    if spec.state_norm is None:
        return None
    guard = StateGuard(spec, StateRangeSettings())
    first, second = spec.state_norm.arrays
    centre = first if spec.state_norm.mode == "mean_std" else (first + second) / 2
    for state in (np.zeros(spec.state_dim), centre[: spec.state_dim]):
        state = np.asarray(state, np.float32)
        if guard.check(state) is None:
            return state
    return None


def _wait_until_serving(client: PolicyClient, child: subprocess.Popen, log_file: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            log_file.seek(0)
            raise BenchError(f"`pi0-runtime serve` exited with {child.returncode}:\n{log_file.read()}")
        try:
            if client.ping():
                return
        except ServerUnavailableError:
            pass
    raise BenchError(f"`pi0-runtime serve` did not answer within {timeout_s:.0f} s")


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'stage':<22} {'p50':>9} {'p90':>9} {'p99':>9}"]
    for stage, s in results.items():
        lines.append(f"{stage:<22} {s['p50']:>9.2f} {s['p90']:>9.2f} {s['p99']:>9.2f}")
    return "\n".join(lines)
