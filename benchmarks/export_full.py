"""Exporting the full-size pi0 to an fp16 bundle on this machine, then serving it: wall time and peak RSS.

Runs `pi0-export bundle --preset pi0 --precision fp16` (random weights, real dimensions, validation
on) in a fresh process and reads the time and peak RSS it reports, with the graph sizes. Then, in
another fresh process, the runtime's engine on that bundle (onnxruntime CPU: its fp16 GEMM runs at
the fp32 one's speed on this CPU, and the fp32 export of 3.3 B parameters does not fit in 24 GB):
load time, time per stage, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cli import main
from benchmarks.render import table

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"preset": "pi0-dummy", "n": 1}


def run(workdir: str | None = None, preset: str = "pi0", n: int = 3) -> dict:
    exe = Path(sys.executable).with_name("pi0-export")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / "bundle"
        start = time.perf_counter()
        result = subprocess.run(
            [exe, "bundle", "--preset", preset, "--precision", "fp16", "--out", str(out)],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"export failed:\n{result.stderr[-3000:]}")
        peak = float(re.search(r"peak RSS (\d+) MiB\s*$", result.stderr.strip()).group(1))
        report = json.loads((out / "report.json").read_text())
        sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        served = subprocess.run(
            [sys.executable, "-m", "benchmarks.export_full", "serve", str(out), str(n)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if served.returncode != 0:
            raise RuntimeError(f"the engine failed on the full bundle:\n{served.stderr[-3000:]}")
    return {
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": peak,
        "graph_bytes": {k: v for k, v in sizes.items() if ".onnx" in k},
        "validation": report["results"],
        "passed": report["passed"],
        "engine": json.loads(served.stdout),
    }


def serve(bundle_dir: str, n: int = 3) -> dict:
    """The engine on a bundle, in this (fresh) process: load time, stages over n requests, peak RSS."""
    from exporter.source import peak_rss_mib
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.bundle.manifest import load_bundle
    from runtime.daemon.bench import bench_engine
    from runtime.engine import Engine

    start = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    engine = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle))
    load_seconds = time.perf_counter() - start
    timing = bench_engine(engine, n, warmup=1)
    return {"load_seconds": load_seconds, "timing": timing, "peak_rss_mib": peak_rss_mib(), "n": n}


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(export: dict) -> list[str]:
    results = export["validation"]
    return [
        "## Exporting the full-size pi0 to an fp16 bundle (`benchmarks/export_full.py`)",
        "`pi0-export bundle --preset pi0 --precision fp16` in a fresh process: build the random-weight "
        "model, run the float32 reference, cast to fp16, export both graphs, validate them with onnxruntime "
        "(CPU) against the float32 reference, write the bundle. Peak RSS is the process's own (VmHWM).",
        table(
            [
                ("wall time", f"{export['wall_seconds'] / 60:.1f} min"),
                ("peak RSS", f"{export['peak_rss_mib'] / 1024:.2f} GiB"),
                *((f"`{name}`", f"{size / 2**20:,.1f} MiB") for name, size in sorted(export["graph_bytes"].items())),
                *(
                    (
                        f"validation {graph}",
                        f"max abs {r['max_abs']:.3g}, mean abs {r['mean_abs']:.3g}, cosine {r['cosine']:.8f}",
                    )
                    for graph, r in results.items()
                ),
                ("validation passed", export["passed"]),
            ]
        ),
        "Then the runtime's engine on that fp16 bundle in a fresh process (onnxruntime CPU; 3 requests after "
        "one warm-up; ALOHA-sim conventions with the 2 empty slots left out: 1 camera, 304 prefix tokens):",
        table(
            [
                ("load (bundle + both sessions)", f"{export['engine']['load_seconds']:.1f} s"),
                *((stage, f"{v['p50']:.0f} ms") for stage, v in export["engine"]["timing"].items()),
                ("peak RSS", f"{export['engine']['peak_rss_mib'] / 1024:.2f} GiB"),
            ]
        ),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:  # run()'s second process: serve BUNDLE N
        print(json.dumps(serve(sys.argv[2], int(sys.argv[3]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the bundle goes (default: the system's temporary directory)")
    main(run, SMOKE, parser)
