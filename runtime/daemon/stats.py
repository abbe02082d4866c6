"""Latency summaries (one place for the percentiles the server, `pi0-runtime bench` and the docs report),
and the daemon's running statistics."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def summarize(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of a series of milliseconds (empty: {})."""
    array = np.fromiter(values, dtype=float)
    if array.size == 0:
        return {}
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(array.mean()), "n": int(array.size)}


STAGES = ("queue_ms", "preprocess_ms", "vlm_ms", "expert_ms", "postprocess_ms", "total_ms")


@dataclass
class Stats:
    """What a `stats` request answers: uptime, counts by outcome and kind, latency per stage (last 1000).
    Counts: `ok`, each refusal by its code (`out_of_range` among them), `kind:<kind>`, `limit_violations`,
    and `out_of_range_warnings` (requests served with the state guard's warning)."""

    started: float = field(default_factory=time.time)
    counts: collections.Counter = field(default_factory=collections.Counter)
    latencies: dict[str, collections.deque] = field(
        default_factory=lambda: {s: collections.deque(maxlen=1000) for s in STAGES}
    )

    def record(self, timing: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in timing:
                self.latencies[stage].append(timing[stage])

    def summary(self) -> dict[str, Any]:
        latency = {stage: summarize(values) for stage, values in self.latencies.items() if values}
        return {"uptime_s": time.time() - self.started, "counts": dict(self.counts), "latency_ms": latency}
