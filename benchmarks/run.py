"""`make bench`: run every benchmark and rewrite docs/benchmarks.md with their tables.

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
    fraction_of_peak,
    lerobot_side_by_side,
    load_memory,
    service,
    sim_harness,
)


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


def service_sections(svc: dict) -> list[str]:
    copies, threads = svc["copies"], svc["threads"]
    return [
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
        "The transport's floor: a bare ZeroMQ REQ -> ROUTER round trip of the same frames to an echo process "
        "that answers at once (no decoding, no engine), back to back and with a pause as long as the engine's "
        "time between requests, as the controller's requests have. What is above the floor is the server's "
        "own share (decoding, the hand-offs to the engine thread and back, the reply).",
        "| bare ZeroMQ round trip, ms | p50 | p90 | p99 |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} |"
            for name, v in svc["transport_floor"].items()
        ),
        "Threads: onnxruntime's intra-op pool has one thread per core (the calling thread is one of them), "
        "inter-op 1, no spinning between runs; ZeroMQ one I/O thread; the server's main thread sleeps in "
        "`poll` while the engine runs. Engine total p50 by intra-op threads:",
        "| intra-op threads | total p50 ms | p90 ms |\n|---|---|---|\n"
        + "\n".join(f"| {t} | {v['p50']:.1f} | {v['p90']:.1f} |" for t, v in threads.items()),
        "Bytes per inference (one 3-camera request; `copy_ledger` in the benchmark):",
        table(
            [
                ("request frames on the wire", f"{copies['request_on_the_wire']:,}"),
                (
                    "copied when the server decodes them (arrays are views of the frames)",
                    f"{copies['copied_by_decode']:,}",
                ),
                (
                    "preprocessing's peak allocation (tracemalloc; the frames are converted only where sampled)",
                    f"{copies['preprocess_peak_allocation']:,}",
                ),
                ("VLM inputs it produces", f"{copies['vlm_inputs']:,}"),
                (
                    "host -> device per inference on the ACL backend (VLM inputs, state once, x_t and t per step)",
                    f"{copies['host_to_device']:,}",
                ),
                ("device -> host per inference (the velocity per step)", f"{copies['device_to_host']:,}"),
                ("prefix KV cache (stays on the device)", f"{copies['kv_cache']:,}"),
                ("KV cache copies per step", copies["kv_cache_copies_per_step"]),
            ]
        ),
    ]


def side_by_side_sections(sbs: dict) -> list[str]:
    depth = sbs["depth"]
    sections = [
        "## Side by side with LeRobot (`benchmarks/lerobot_side_by_side.py`)",
        "LeRobot 0.3.3's `PI0Policy` makes a checkpoint at pi0's real widths with vision depth "
        f"{depth['vision']}, language and expert depth {depth['language']} (random weights; chunk 50, 10 steps, "
        "14-dim state, 480x640 cameras); `pi0-export bundle` exports our fp32 bundle from that very checkpoint. "
        "Then, one request at a time on all cores, alternating: LeRobot fp32 (`select_action`), ours "
        "(`Engine.infer`, onnxruntime CPU), LeRobot bf16 (as shipped), same images, state, prompt tokens and "
        "noise. LeRobot runs in its own venv (`make lerobot-venv`: lerobot 0.3.3 with --no-deps, transformers "
        "4.55.4; torchvision forces torch 2.14.1 there), its tokenizer read from a local file (no network), and "
        "for fp32 its hard-coded bfloat16 casts mapped to float32 (`benchmarks/lerobot_worker.py` says how). "
        "Max abs is over the whole de-normalized chunk against LeRobot fp32. Targets: ours >= 1.3x LeRobot fp32 "
        "with 2 cameras; >= 2.5x with 1 camera + 2 empty slots, actions within 1e-4.",
    ]
    for name, case in sbs["cases"].items():
        sections.append(
            f"**{name}** ({case['parameters'] / 1e6:,.0f} M parameters in LeRobot's model, LeRobot on torch "
            f"{case['torch']} with {case['threads']} threads, {case['n']} timed rounds after one warm-up; "
            "prefix tokens: "
            + ", ".join(f"{label} {tokens}" for label, tokens in case["prefix_tokens"].items())
            + ")\n\n| implementation | p50 ms | min ms | max ms | speed-up vs LeRobot fp32 | max abs vs LeRobot fp32 |"
            "\n|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {label} | {ms['p50']:.0f} | {ms['min']:.0f} | {ms['max']:.0f} "
                f"| {case['speedup_vs_lerobot_fp32'][label]:.2f}x | {case['max_abs_vs_lerobot_fp32'][label]:.2g} |"
                for label, ms in case["ms"].items()
            )
        )
    return sections


def ascend_sections(estimate: dict) -> list[str]:
    peaks = estimate["peaks"]
    rows = []
    for name, e in (("empty slots left out", estimate["aloha_sim_empty_slots_dropped"]),
                    ("empty slots kept", estimate["aloha_sim_empty_slots_kept"])):  # fmt: skip
        for graph in ("vlm", "expert"):
            rows.append(
                f"| {name} ({e['prefix_tokens']} prefix tokens) | {graph}{' x10 steps' if graph == 'expert' else ''} "
                f"| {e['flops'][graph] / 1e12:.2f} | {e['bytes'][graph] / 1e9:.2f} | {e['compute_ms'][graph]:.1f} "
                f"| {e['memory_ms'][graph]:.1f} | {e['floor_ms'][graph]:.1f} |"
            )
    dropped, kept = estimate["aloha_sim_empty_slots_dropped"], estimate["aloha_sim_empty_slots_kept"]
    params = dropped["parameters"]
    return [
        "## A 310P estimate for the real pi0 (`benchmarks/ascend_estimate.py`; arithmetic, never run on a 310P)",
        f"One 310P chip as published for the Atlas 300I Pro: {peaks['fp16_tflops']:.0f} TFLOPS fp16, "
        f"{peaks['gb_per_s']:.1f} GB/s. pi0 at its real dimensions ({params['vision'] / 1e6:.0f} M vision + projector, "
        f"{params['language'] / 1e6:.0f} M language layers, {params['embedding'] / 1e6:.0f} M token embedding of which "
        f"only the prompt's rows are read, {params['expert'] / 1e6:.0f} M expert), fp16 weights, ALOHA-sim "
        "conventions (1 camera + 2 empty slots, 48 language tokens), chunk 50, 10 steps. FLOPs as in the "
        "fraction-of-peak section; bytes = the weights each graph reads once per run, plus the prefix KV cache "
        "the expert reads at each step. The floor of each graph is the larger of its compute time and its "
        "memory time at the peaks.",
        "| bundle | graph | TFLOP | GB read | compute ms | memory ms | floor ms |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows),
        f"Floor per chunk: **{dropped['floor_total_ms']:.0f} ms** with the empty slots left out, "
        f"{kept['floor_total_ms']:.0f} ms with them kept. The expert is memory-bound (each of the 10 steps reads "
        f"its {params['expert'] * 2 / 1e9:.2f} GB of fp16 weights for 51 tokens), the VLM becomes compute-bound "
        "when the empty slots are kept (3 x 256 image tokens). What the design does about it:\n"
        f"- KV cache resident on the device: the expert reads the {dropped['kv_cache_bytes'] / 2**20:.1f} MiB cache "
        "where the VLM wrote it (no copy; `tests/test_acl.py::test_the_prefix_cache_stays_on_the_device` counts "
        "the bytes); a host round trip per step would move "
        f"{dropped['kv_round_trip_per_chunk_bytes'] / 2**20:.0f} MiB per chunk over PCIe instead.\n"
        "- Empty slots left out: the VLM's FLOPs fall "
        f"{kept['flops']['vlm'] / dropped['flops']['vlm']:.1f}x and its floor from {kept['floor_ms']['vlm']:.0f} to "
        f"{dropped['floor_ms']['vlm']:.0f} ms.\n"
        "- fp16 islands (norms, softmax, RoPE, residuals in fp32) add casts of activations only: a few MB per "
        "chunk, next to the GB of weights. Their cost in time is unmeasured until a 310P runs the OM files.\n"
        "- What is left is bandwidth for the expert's weights; only smaller weights (int8 quantization of the "
        "expert, halving its bytes) would lower that floor. Not done.",
    ]


def load_memory_sections(load: dict) -> list[str]:
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


def export_sections(export: dict) -> list[str]:
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


# In the order they run: latency first (a page cache busy after the 14 GB runs disturbs it most).
BENCHMARKS = {
    "service": (service.run, service_sections),
    "fraction_of_peak": (fraction_of_peak.run, peak_sections),
    "load_memory": (load_memory.run, load_memory_sections),
    "export_full": (lambda: {k: v for k, v in export_full.run().items() if k != "log"}, export_sections),
    "lerobot_side_by_side": (lerobot_side_by_side.run, side_by_side_sections),
    "ascend_estimate": (ascend_estimate.run, ascend_sections),
    "sim_harness": (sim_harness.run, sim_sections),
}
RESULTS = ROOT / "build" / "bench"


def _plain(value: object) -> object:
    """numpy scalars and arrays as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a benchmark result")


def targets_section(results: dict[str, dict]) -> list[str]:
    """Issue 7's targets against the latest results (each row only when its benchmark has run)."""
    rows = []
    if "lerobot_side_by_side" in results:
        cases = results["lerobot_side_by_side"]["cases"]
        two, empty = cases["2 cameras"], cases["1 camera + 2 empty slots"]
        rows.append(
            (
                "ours / LeRobot fp32, same weights, 2 cameras",
                ">= 1.3x",
                f"{two['speedup_vs_lerobot_fp32']['ours']:.2f}x",
            )
        )
        rows.append(
            (
                "ours / LeRobot fp32, 1 camera + 2 empty slots; max abs diff",
                ">= 2.5x; <= 1e-4",
                f"{empty['speedup_vs_lerobot_fp32']['ours']:.2f}x; {empty['max_abs_vs_lerobot_fp32']['ours']:.1g}",
            )
        )
    if "fraction_of_peak" in results:
        fraction = results["fraction_of_peak"]["fraction_of_peak"]["vlm"]
        rows.append(("VLM graph, fraction of the fp32 GEMM peak", ">= 85%", f"{fraction:.0%}"))
    if "service" in results:
        svc = results["service"]
        overhead = svc["server"]["service_overhead_ms"]["p50"]
        floor = min(v["p50"] for k, v in svc["transport_floor"].items() if not k.endswith(" 0 ms pause"))
        rows.append(
            (
                "service overhead p50, 3 x 480x640 cameras",
                "< 1 ms",
                f"**{overhead:.2f} ms: missed**; the bare ZeroMQ round trip of the same frames alone is "
                f"{floor:.2f} ms here (transport floor below)",
            )
        )
        rows.append(("KV cache copies per step", "0", str(svc["copies"]["kv_cache_copies_per_step"])))
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
        result = BENCHMARKS[name][0]()
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (RESULTS / f"{name}.json").write_text(json.dumps({"when": when, "result": result}, indent=1, default=_plain))
    saved = {name: json.loads(path.read_text()) for name in BENCHMARKS if (path := RESULTS / f"{name}.json").exists()}
    sections = [
        "# Benchmarks",
        f"Written by `make bench` (`python benchmarks/run.py [NAME ...]`).\n\nMachine: {machine()}.",
        *targets_section({name: run["result"] for name, run in saved.items()}),
    ]
    for name, (_, render) in BENCHMARKS.items():
        if name not in saved:
            sections.append(f"## {name}\n\nNot run yet: `python benchmarks/run.py {name}`.")
            continue
        rendered = render(saved[name]["result"])
        sections += [rendered[0], f"_Run {saved[name]['when']}._", *rendered[1:]]
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
