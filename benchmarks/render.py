"""What the benchmarks' doc sections share."""

from __future__ import annotations


def table(rows: list[tuple[str, object]]) -> str:
    """A two-column markdown table."""
    return "\n".join(["| what | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def grid(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table with a header row."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
