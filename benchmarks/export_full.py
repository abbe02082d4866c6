"""Exporting the full-size pi0 to an fp16 bundle on this machine: wall time and peak RSS.

Runs `pi0-export bundle --preset pi0 --precision fp16` (random weights, real dimensions, validation
on) in a fresh process and reads the time and peak RSS it reports, with the graph sizes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(workdir: str | None = None) -> dict:
    exe = Path(sys.executable).with_name("pi0-export")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / "bundle"
        start = time.perf_counter()
        result = subprocess.run(
            [exe, "bundle", "--preset", "pi0", "--precision", "fp16", "--out", str(out)],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"export failed:\n{result.stderr[-3000:]}")
        peak = float(re.search(r"peak RSS (\d+) MiB\s*$", result.stderr.strip()).group(1))
        report = json.loads((out / "report.json").read_text())
        sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    return {
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": peak,
        "graph_bytes": {k: v for k, v in sizes.items() if ".onnx" in k},
        "validation": report["results"],
        "passed": report["passed"],
        "log": result.stderr,
    }


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in run(*sys.argv[1:]).items() if k != "log"}, indent=2))
