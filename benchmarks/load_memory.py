"""Loading cost of a full-size pi0 checkpoint: time and peak RSS against the weights' size.

Builds the `pi0` preset (random weights, real dimensions, 3.5 B parameters), writes it as a LeRobot
float32 checkpoint (14 GB of disk), then runs `pi0-export inspect` on it in a fresh process, which
loads it and reads every weight. The baseline is the same command on the 1 MB golden fixture.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cli import main
from benchmarks.render import table

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"preset": "pi0-dummy"}
FIXTURE = ROOT / "tests" / "fixtures" / "lerobot-pi0-tiny" / "checkpoint"


def inspect(checkpoint: Path) -> dict:
    exe = Path(sys.executable).with_name("pi0-export")
    out = subprocess.run([exe, "inspect", "--checkpoint", str(checkpoint)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run(preset: str = "pi0", workdir: str | None = None) -> dict:
    from exporter.presets import build_preset
    from exporter.readers.lerobot_v03 import save_lerobot

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        start = time.perf_counter()
        policy = build_preset(preset)
        print(f"built {preset} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        start = time.perf_counter()
        save_lerobot(policy, tmp)
        del policy
        print(f"wrote the checkpoint in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        baseline = inspect(FIXTURE)["peak_rss_mib"]
        report = inspect(Path(tmp))
    growth = report["peak_rss_mib"] - baseline
    return {
        "preset": preset,
        "parameters": report["parameters"],
        "weights_mib": report["weights_mib"],
        "load_seconds": report["load_seconds"],
        "read_all_seconds": report["read_all_seconds"],
        "baseline_peak_rss_mib": baseline,
        "peak_rss_mib": report["peak_rss_mib"],
        "peak_rss_growth_mib": round(growth, 1),
        "growth_over_weights": round(growth / report["weights_mib"], 3),
    }


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(load: dict) -> list[str]:
    return [
        "## Loading a full-size pi0 checkpoint (`benchmarks/load_memory.py`)",
        "The `pi0` preset (random weights, real dimensions) written as a LeRobot float32 checkpoint, then "
        "`pi0-export inspect --checkpoint` in a fresh process (loads it and reads every weight). Growth is "
        "the peak RSS above the same command on the 1 MB fixture. Target: growth within 1.3x the weights.",
        table(
            [
                ("parameters", f"{load['parameters']:,}"),
                ("weights (float32)", f"{load['weights_mib'] / 1024:.2f} GiB"),
                ("load time (map the file, build the model)", f"{load['load_seconds']:.1f} s"),
                (
                    "first read of every weight (file just written: page cache warm)",
                    f"{load['read_all_seconds']:.1f} s",
                ),
                ("peak RSS", f"{load['peak_rss_mib'] / 1024:.2f} GiB"),
                ("peak RSS growth / weights", f"{load['growth_over_weights']:.3f}x"),
            ]
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pi0", help="the model to write and load (default: the full-size pi0)")
    parser.add_argument("--workdir", help="where the checkpoint goes (default: the system's temporary directory)")
    main(run, SMOKE, parser)
