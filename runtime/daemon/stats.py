"""Latency summaries (one place for the percentiles the server, `pi0-runtime bench` and the docs report),
and the daemon's running statistics: what a `stats` request answers, forwarded to the Prometheus metrics
(`runtime.daemon.metrics`) where the daemon has them."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from runtime.daemon.metrics import Metrics


def summarize(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of a series of milliseconds (empty: {})."""
    array = np.fromiter(values, dtype=float)
    if array.size == 0:
        return {}
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(array.mean()), "n": int(array.size)}


STAGES = ("queue_ms", "preprocess_ms", "vlm_ms", "expert_ms", "postprocess_ms", "total_ms")
INTERVAL = "interval_ms"  # between consecutive infer requests of one connection: a robot's cadence
CONNECTIONS_REMEMBERED = 1024  # connections whose last infer request time is kept, newest first


@dataclass
class Stats:
    """What a `stats` request answers: uptime, counts by outcome and kind, latency per stage and the
    interval between a connection's requests (last 1000 each). Counts: `ok`, each refusal by its code
    (`out_of_range` among them), `kind:<kind>`, the warnings (`limit_violations`, `out_of_range_warnings`,
    `frames_reshaped`) and `engine_restarts`. Each is also handed to `metrics` when there are some."""

    started: float = field(default_factory=time.time)
    counts: collections.Counter = field(default_factory=collections.Counter)
    latencies: dict[str, collections.deque] = field(
        default_factory=lambda: {s: collections.deque(maxlen=1000) for s in (*STAGES, INTERVAL)}
    )
    metrics: Metrics | None = None
    memory: dict[str, int] | None = None  # the accelerator's, where the backend reports it
    _last_request: collections.OrderedDict = field(default_factory=collections.OrderedDict, repr=False)

    def request(self, kind: Any, connection: Any = None, at: float | None = None) -> None:
        """A request arrived; for infer requests, its connection and arrival (perf_counter seconds)."""
        self.counts[f"kind:{kind}"] += 1
        if self.metrics is not None:
            self.metrics.requested(str(kind))
        if connection is None or at is None:
            return
        last = self._last_request.pop(connection, None)
        self._last_request[connection] = at
        if len(self._last_request) > CONNECTIONS_REMEMBERED:
            self._last_request.popitem(last=False)
        if last is not None:
            self.latencies[INTERVAL].append((at - last) * 1e3)
            if self.metrics is not None:
                self.metrics.interval(at - last)

    def refusal(self, code: str) -> None:
        self.counts[code] += 1
        if self.metrics is not None:
            self.metrics.refused(code)

    def warning(self, kind: str) -> None:
        self.counts[kind] += 1
        if self.metrics is not None:
            self.metrics.warned(kind)

    def restart(self) -> None:
        self.counts["engine_restarts"] += 1
        if self.metrics is not None:
            self.metrics.restarted()

    def served(self, timing: dict[str, float]) -> None:
        self.counts["ok"] += 1
        for stage in STAGES:
            if stage in timing:
                self.latencies[stage].append(timing[stage])
        if self.metrics is not None:
            self.metrics.served(timing)

    def device_memory(self, used: int, total: int) -> None:
        self.memory = {"used": int(used), "total": int(total)}
        if self.metrics is not None:
            self.metrics.device_memory(used, total)

    def summary(self) -> dict[str, Any]:
        latency = {stage: summarize(values) for stage, values in self.latencies.items() if values}
        summary = {"uptime_s": time.time() - self.started, "counts": dict(self.counts), "latency_ms": latency}
        if self.memory is not None:
            summary["device_memory_bytes"] = self.memory
        return summary
