"""What every benchmark's command line shares: `python -m benchmarks.NAME [--smoke]` from the repo root
prints the benchmark's result as JSON on stdout (progress goes to stderr).

`--smoke` runs it at the sizes in the module's SMOKE (a tiny model, a request or two: seconds) to show
that it still runs against today's code; its figures mean nothing, and it writes nothing outside
temporary directories. `python benchmarks/run.py --smoke` runs every benchmark's smoke.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

SMOKE_HELP = "tiny sizes, seconds: check that the benchmark still runs (its figures mean nothing)"


def plain(value: object) -> object:
    """numpy scalars and arrays as JSON numbers and lists (json's `default`)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a benchmark result")


def main(run: Callable[..., dict], smoke: dict[str, Any], parser: argparse.ArgumentParser | None = None) -> None:
    """Parse `parser`'s options (each one a keyword of `run`) and `--smoke`, then print `run(...)` as JSON;
    with `--smoke` the keywords in `smoke` replace the options'."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    options = vars(parser.parse_args())
    if options.pop("smoke"):
        options |= smoke
    print(json.dumps(run(**options), indent=2, default=plain))
