"""pi0 and pi0.5 side by side: the same towers at pi0's real widths with a reduced depth (vision 3
layers, language and expert 2, as `fraction_of_peak` uses), random weights, each with its own
framework's defaults (pi0: LeRobot's ALOHA-sim conventions, 48 language tokens; pi0.5: openpi's, 200
tokens, the state in the prompt), fp32 bundles, the engine on onnxruntime on the CPU, same run.

Also what precomputing pi0.5's per-step constants at export would save: the time MLP and every
adaptive norm's dense layer depend only on the flow time, which the Euler grid fixes, so they could be
tables instead of ops. Counted from the dimensions against the expert step's FLOPs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from benchmarks.cli import main
from benchmarks.fraction_of_peak import SMOKE, depths, gemm_peak_gflops, gemma_layer_flops, shallow_pi0
from benchmarks.render import table
from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import LoadedPolicy
from exporter.dims import PRESETS, Pi0Dims
from exporter.pi0 import Pi0
from exporter.presets import preset_spec
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.conventions import OPENPI
from runtime.bundle.manifest import load_bundle
from runtime.bundle.spec import NormStats, PolicySpec
from runtime.daemon.bench import bench_engine
from runtime.engine import Engine

Z99 = 2.326  # the 99th percentile of a standard normal: q01/q99 made from the preset's mean/std


def pi05_spec() -> PolicySpec:
    """openpi's pi0.5 defaults around the preset's camera and statistics; the quantiles are synthetic
    (mean -/+ 2.326 std): fine for timing, not for a robot."""
    spec = preset_spec()

    def quantiles(stats: NormStats) -> NormStats:
        return NormStats(
            q01=stats.mean - Z99 * stats.std, q99=stats.mean + Z99 * stats.std, eps=OPENPI.norm_eps, mode="quantiles"
        )

    return dataclasses.replace(
        spec,
        conventions=OPENPI.name,
        tokenizer_max_length=200,
        state_in_prompt=True,
        state_norm=quantiles(spec.state_norm),
        action_norm=quantiles(spec.action_norm),
    )


def per_step_constant_flops(dims) -> int:
    """The time MLP and the adaptive norms' dense layers (2 per block and the final one), per step."""
    w = dims.expert.width
    return 2 * (2 * w * w + (2 * dims.expert.depth + 1) * w * 3 * w)


def run(
    n: int = 10, dims: Pi0Dims | None = None, gemm_size: int = 2048, gemm_repeats: int = 20, validate: bool = True
) -> dict:
    """`dims`: the towers (pi0's widths at the reduced depth unless given), as pi0 and as pi0.5; `validate`:
    each bundle's own check against PyTorch (the smoke leaves it out: it is not what is timed)."""
    towers = dims or shallow_pi0()
    results = {}
    for name, pi05 in (("pi0", False), ("pi05", True)):
        dims = dataclasses.replace(towers, pi05=pi05)
        torch.manual_seed(0)
        model = Pi0(dims).eval().requires_grad_(False)
        spec = pi05_spec() if pi05 else preset_spec()
        policy = LoadedPolicy(model=model, spec=spec, source=f"{name} widths, shallow")
        params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bundle"
            build_bundle(policy, out, BundleOptions(validate=validate), log=lambda message: None)
            del policy, model
            bundle = load_bundle(out)
            timing = bench_engine(Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)), n)
        prefix = bundle.spec.num_camera_slots * dims.image_tokens + bundle.spec.tokenizer_max_length
        suffix = bundle.spec.chunk_size + (0 if pi05 else 1)
        step = dims.expert.depth * gemma_layer_flops(dims.expert, suffix, prefix + suffix)
        results[name] = {
            "parameters": params,
            "prefix_tokens": prefix,
            "ms": {k: timing[k]["p50"] for k in ("vlm_ms", "expert_step_ms", "total_ms")},
            "expert_step_gflop": step / 1e9,
        }
        if pi05:
            constants = per_step_constant_flops(dims)
            results[name]["per_step_constants_gflop"] = constants / 1e9
            results[name]["per_step_constants_share"] = constants / (step + constants)
            full = dataclasses.replace(PRESETS["pi0"], pi05=True)  # the same count at pi0's full depth
            full_step = full.expert.depth * gemma_layer_flops(full.expert, suffix, prefix + suffix)
            full_constants = per_step_constant_flops(full)
            results[name]["per_step_constants_share_full_depth"] = full_constants / (full_step + full_constants)
    # this machine's speed in the same run: VMs of the same kind differ by 2.5x
    peak = gemm_peak_gflops(gemm_size, gemm_repeats)
    return {"n": n, "dims": depths(towers), "gemm_peak_gflops": peak, "models": results}


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(result: dict) -> list[str]:
    pi0, pi05 = result["models"]["pi0"], result["models"]["pi05"]
    rows = [
        (f"{label}: {what}", value)
        for label, m in (("pi0", pi0), ("pi0.5", pi05))
        for what, value in (
            ("prefix tokens (1 camera + language budget)", m["prefix_tokens"]),
            ("VLM ms (p50)", f"{m['ms']['vlm_ms']:.0f}"),
            ("expert step ms (p50)", f"{m['ms']['expert_step_ms']:.1f}"),
            ("total ms (p50)", f"{m['ms']['total_ms']:.0f}"),
        )
    ]
    share = pi05["per_step_constants_share"]
    return [
        "## pi0 and pi0.5 side by side (`benchmarks/pi05_engine.py`)",
        "pi0's real widths, vision depth 3, language and expert depth 2, random weights, fp32 bundles, "
        f"onnxruntime on the CPU, engine p50 over {result['n']} requests, same run. Each with its framework's "
        "defaults: pi0 48 language tokens (LeRobot's ALOHA-sim conventions), pi0.5 200 (openpi's; the state "
        "is in the prompt, so every request has its own tokens). The empty camera slots are left out of both. "
        f"This machine's fp32 GEMM peak in the same run: {max(result['gemm_peak_gflops'].values()):.0f} GFLOP/s "
        "(compare `fraction_of_peak`'s, measured on another day).",
        table(rows),
        f"pi0.5's per-step constants (time MLP and adaptive-norm dense layers, fixed by the Euler grid) are "
        f"{pi05['per_step_constants_gflop']:.3f} GFLOP of {pi05['expert_step_gflop'] + pi05['per_step_constants_gflop']:.2f} "
        f"per expert step ({share:.1%}) at this depth, {pi05['per_step_constants_share_full_depth']:.1%} at pi0's "
        "full depth (counted from the dimensions): not worth extra graph inputs, so they stay in the graph.",
    ]


if __name__ == "__main__":
    main(run, SMOKE)
