"""`make bench`: run every benchmark and rewrite docs/benchmarks.md with their tables.

Benchmarks are not tests: they assert nothing about time and may take minutes and tens of GB.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import export_full, fraction_of_peak, load_memory, service, sim_harness  # noqa: E402


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


def table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| what | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def peak_sections(peak: dict) -> list[str]:
    gemm = peak["gemm_peak_gflops"]
    return [
        "## Fraction of the machine's peak (`benchmarks/fraction_of_peak.py`)",
        f"pi0 at its real widths with vision depth {peak['dims']['vision']}, language and expert depth "
        f"{peak['dims']['language']} ({peak['parameters'] / 1e6:.0f} M parameters), fp32 bundle, ALOHA-sim "
        f"conventions with the empty slots left out ({peak['prefix_tokens']} prefix tokens), onnxruntime on "
        "the CPU, engine p50 over 10 requests. FLOPs counted from the dimensions (2 per multiply-add; the "
        "VLM graph computes only the keys and values of the last language layer). The fp32 GEMM peak is "
        "measured in the same run just before and after the timed requests (best of 20 each), 2048^3 on all cores: "
        f"torch {gemm['torch']:.0f} GFLOP/s, onnxruntime {gemm['onnxruntime']:.0f} GFLOP/s; the larger is the "
        "peak. Target: VLM graph >= 85% of it.",
        "| graph | GFLOP | ms (p50) | GFLOP/s | fraction of peak |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {peak['gflop'][name]:.2f} | {peak['ms'][name]:.1f} | {peak['achieved_gflops'][name]:.0f} "
            f"| {peak['fraction_of_peak'][name]:.0%} |"
            for name in ("vlm", "expert_step")
        ),
    ]


def sim_sections(sim: dict) -> list[str]:
    oracle, render, parity = sim["oracle"], sim["render"], sim["parity"]
    steps = [e["steps"] for e in oracle["episodes"]]
    return [
        "## The MuJoCo harness (`benchmarks/sim_harness.py`)",
        "The scripted oracle (`pi0-sim oracle-serve`, the runtime's own server) driven by `pi0-sim run` over "
        f"ZeroMQ ipc on gym-aloha transfer-cube, seeds 0..{len(steps) - 1}, whole chunks (50 actions) per "
        "request, EGL rendering (Mesa, CPU). Target: at least 19 successes of 20.",
        table(
            [
                ("successes", f"{oracle['successes']} / {len(steps)}"),
                ("max reward per episode", ", ".join(f"{e['max_reward']:.0f}" for e in oracle["episodes"])),
                ("steps to success (min / mean / max)", f"{min(steps)} / {sum(steps) / len(steps):.0f} / {max(steps)}"),
                (
                    "request round trip p50 / p99 (ms; the plan is made at the first)",
                    f"{oracle['latency_ms']['p50']:.2f} / {oracle['latency_ms']['p99']:.1f}",
                ),
                ("errors", oracle["errors"]),
            ]
        ),
        "gym-aloha's `env.step` (physics and rendering) per step, one oracle episode (seed 0), with the "
        "render fix (only the `top` camera the policy sees) and as shipped (three 480x640 cameras).",
        "| ms per step | p50 | p90 | p99 | steps |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {v['p50']:.1f} | {v['p90']:.1f} | {v['p99']:.1f} | {v['n']} |" for name, v in render.items()
        ),
        "Open-loop parity (`pi0-sim parity`): one recorded oracle episode (seed 0), every step, through the "
        "PyTorch reference and through the daemon serving a bundle of the `lerobot-pi0-tiny-aloha-sim` "
        "fixture (1 camera + 2 empty slots, ALOHA conventions), same noise; action chunks in the robot's "
        "units. Threshold: fp32 max abs <= 1e-4; fp16 cosine >= 0.999 and mean abs <= 1e-2.",
        "| bundle | steps | max abs | mean abs | cosine | worst step cosine | passed |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {precision} | {r['steps_compared']} | {r['overall']['max_abs']:.3g} | {r['overall']['mean_abs']:.3g} "
            f"| {r['overall']['cosine']:.8f} | {r['overall']['cosine_worst_step']:.8f} | {r['passed']} |"
            for precision, r in parity.items()
        ),
    ]


def main() -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    svc = service.run()  # first: latency is what a busy page cache (after the 14 GB runs) disturbs most
    peak = fraction_of_peak.run()  # next, for the same reason
    load = load_memory.run()
    sections = [
        "# Benchmarks",
        f"Written by `make bench` (`python benchmarks/run.py`) on {now}.\n\nMachine: {machine()}.",
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
    export = export_full.run()
    results = export["validation"]
    sections += [
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
    ]
    sections += [
        "## The service: engine breakdown and overhead (`benchmarks/service.py`)",
        f"`pi0-dummy` (fp32, onnxruntime CPU) with three 480x640 cameras, {svc['n']} requests after 2 warm-up "
        "ones. Engine: `Engine.infer` in process. Server: `pi0-runtime serve` on loopback TCP, driven by "
        "`PolicyClient`; the overhead is each round trip minus the engine time the server reports for it. "
        "Target for the overhead: under 1 ms at p50.",
        "| ms | p50 | p90 | p99 |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} |"
            for name, v in [*svc["engine"].items(), *svc["server"].items()]
        ),
    ]
    sections += peak_sections(peak)
    sections += sim_sections(sim_harness.run())
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
