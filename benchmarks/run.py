"""`make bench`: run every benchmark and rewrite docs/benchmarks.md with their tables.

Each benchmark module has `run() -> dict` (its result, kept as JSON in build/bench/), `sections(result)`
(its part of the doc) and, where it measures a target, `targets(result)` (rows of the doc's first table).
Benchmarks are not tests: they assert nothing about time and may take minutes and tens of GB.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    ascend_estimate,
    export_full,
    fp16_islands,
    fraction_of_peak,
    lerobot_side_by_side,
    load_memory,
    pi05_engine,
    service,
    sim_harness,
)

# In the order they run: latency first (a page cache busy after the 14 GB runs disturbs it most).
BENCHMARKS = {
    "service": service,
    "fraction_of_peak": fraction_of_peak,
    "pi05_engine": pi05_engine,
    "fp16_islands": fp16_islands,
    "load_memory": load_memory,
    "export_full": export_full,
    "lerobot_side_by_side": lerobot_side_by_side,
    "ascend_estimate": ascend_estimate,
    "sim_harness": sim_harness,
}
RESULTS = ROOT / "build" / "bench"


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.machine()}"


def _plain(value: object) -> object:
    """numpy scalars and arrays as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a benchmark result")


def targets_section(results: dict[str, dict]) -> list[str]:
    """Every benchmark's targets against its latest result (rows only for the benchmarks that have run)."""
    rows = [
        row
        for name, module in BENCHMARKS.items()
        if name in results and hasattr(module, "targets")
        for row in module.targets(results[name])
    ]
    return [
        "## Targets",
        "| target | wanted | measured |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]


def main() -> None:
    """Run the benchmarks named on the command line (all when none; `--render` runs none), keep each
    one's result as JSON in build/bench/, and rewrite docs/benchmarks.md from all the results (dated)."""
    chosen = [] if sys.argv[1:] == ["--render"] else sys.argv[1:] or list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        result = BENCHMARKS[name].run()
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (RESULTS / f"{name}.json").write_text(json.dumps({"when": when, "result": result}, indent=1, default=_plain))
    saved = {name: json.loads(path.read_text()) for name in BENCHMARKS if (path := RESULTS / f"{name}.json").exists()}
    sections = [
        "# Benchmarks",
        f"Written by `make bench` (`python benchmarks/run.py [NAME ...]`).\n\nMachine: {machine()}.",
        *targets_section({name: run["result"] for name, run in saved.items()}),
    ]
    for name, module in BENCHMARKS.items():
        if name not in saved:
            sections.append(f"## {name}\n\nNot run yet: `python benchmarks/run.py {name}`.")
            continue
        rendered = module.sections(saved[name]["result"])
        sections += [rendered[0], f"_Run {saved[name]['when']}._", *rendered[1:]]
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
