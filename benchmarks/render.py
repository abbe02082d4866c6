"""What the benchmarks' doc sections share."""

from __future__ import annotations


def table(rows: list[tuple[str, object]]) -> str:
    """A two-column markdown table."""
    return "\n".join(["| what | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
