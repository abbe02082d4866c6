"""Many controllers at once against a running daemon: every reply counted (for `make load` and the
reliability tests; not shipped to the robot)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from pi0_client.client import BusyError, PolicyClient, PolicyError, ServerUnavailableError
from runtime.daemon.stats import summarize


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
