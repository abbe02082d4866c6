"""`pi0-runtime bench`: latency of the engine, and of the whole service as a controller sees it."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

from pi0_client.client import BusyError, PolicyClient, PolicyError, ServerUnavailableError
from runtime.bundle import Bundle
from runtime.engine import Engine
from runtime.observation import Observation
from runtime.stats import summarize
from runtime.supervise import Daemon

STAGES = ("preprocess_ms", "vlm_ms", "expert_ms", "expert_step_ms", "postprocess_ms", "total_ms")


def bench_engine(engine: Engine, n: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    request = Observation.synthetic(engine.metadata())
    timings = []
    for i in range(warmup + n):
        _, timing = engine.infer(request)
        if i >= warmup:
            timings.append(timing)
    return {stage: summarize(t[stage] for t in timings) for stage in STAGES}


def _free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def bench_server(bundle: Bundle, n: int, backend: str = "auto", warmup: int = 2) -> dict[str, dict[str, float]]:
    """Start `pi0-runtime serve` on loopback TCP, send n requests through PolicyClient, and report the
    round trip and the service overhead (round trip minus the engine's own time) per request."""
    daemon = Daemon.serve(bundle.root, "--backend", backend, endpoint=_free_tcp_endpoint(), quiet=True)
    with daemon, PolicyClient(daemon.endpoint, timeout_s=60) as client:
        obs = Observation.synthetic(client.metadata()).to_dict()
        round_trips, overheads = [], []
        for i in range(warmup + n):
            start = time.perf_counter()
            result = client.infer(obs)
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                round_trips.append(elapsed)
                overheads.append(elapsed - result["timing"]["total_ms"])
    return {"round_trip_ms": summarize(round_trips), "service_overhead_ms": summarize(overheads)}


def bench_load(endpoint: str, obs: dict, clients: int, requests: int) -> dict:
    """`clients` threads, each with its own PolicyClient, `requests` infer requests each; every reply
    counted by kind (ok, busy, error) and what got none within 60 s as lost. A client told `busy`
    waits 5 ms before its next request, as a controller would."""
    counts: Counter = Counter()
    latency: dict[str, list[float]] = {"ok": [], "busy": [], "error": []}
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with PolicyClient(endpoint, timeout_s=60, retries=0) as client:
            for i in range(requests):
                start = time.perf_counter()
                try:
                    client.infer({**obs, "seed": index * requests + i})
                    outcome = "ok"
                except BusyError:
                    outcome = "busy"
                except PolicyError:
                    outcome = "error"
                except ServerUnavailableError:
                    outcome = "lost"
                elapsed = (time.perf_counter() - start) * 1e3
                with lock:
                    counts[outcome] += 1
                    if outcome in latency:
                        latency[outcome].append(elapsed)
                if outcome == "busy":
                    time.sleep(0.005)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": clients * requests,
        "counts": dict(counts),
        "lost": clients * requests - sum(counts[k] for k in ("ok", "busy", "error")),
        "latency_ms": {k: summarize(v) for k, v in latency.items() if v},
        "wall_s": wall,
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'stage':<22} {'p50':>9} {'p90':>9} {'p99':>9}"]
    for stage, s in results.items():
        lines.append(f"{stage:<22} {s['p50']:>9.2f} {s['p90']:>9.2f} {s['p99']:>9.2f}")
    return "\n".join(lines)
