"""Latency summaries: one place for the percentiles the server, `pi0-runtime bench` and the docs report."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def summarize(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of a series of milliseconds (empty: {})."""
    array = np.fromiter(values, dtype=float)
    if array.size == 0:
        return {}
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(array.mean()), "n": int(array.size)}
