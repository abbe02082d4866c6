"""Fraction of the machine's peak: FLOPs per graph counted from the dimensions, the engine's time per
graph, and the fp32 GEMM peak measured in the same run (2048^3, one thread per core, through torch and
through onnxruntime; the larger is the peak).

The model is pi0 at its real widths with a reduced depth (vision 3 layers, language and expert 2, as
the LeRobot comparison uses), exported to an fp32 bundle with the ALOHA-sim conventions
(1 camera + 2 empty slots, left out of the graphs: 256 image + 48 language tokens).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.cli import main
from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import LoadedPolicy
from exporter.dims import PRESETS, GemmaDims, Pi0Dims
from exporter.pi0 import Pi0
from exporter.presets import preset_spec
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.daemon.bench import bench_engine
from runtime.engine import Engine

SHALLOW = {"vision": 3, "language": 2, "expert": 2}
SMOKE = {"n": 1, "dims": PRESETS["pi0-dummy"], "gemm_size": 256, "gemm_repeats": 2, "validate": False}


def shallow_pi0() -> Pi0Dims:
    dims = PRESETS["pi0"]
    return dataclasses.replace(
        dims,
        vision=dataclasses.replace(dims.vision, depth=SHALLOW["vision"]),
        language=dataclasses.replace(dims.language, depth=SHALLOW["language"]),
        expert=dataclasses.replace(dims.expert, depth=SHALLOW["expert"]),
    )


def gemm_peak_gflops(n: int = 2048, repeats: int = 20) -> dict[str, float]:
    """fp32 GEMM n^3, best of `repeats`, through torch and through onnxruntime (the engine's own GEMM).
    The graphs are held to the larger of the two: the machine's peak, not only the one our library reaches."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    peaks = {"torch": 2 * n**3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e9}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(model.SerializeToString(), options)
    feeds = {"a": a.numpy(), "b": np.ascontiguousarray(b.numpy())}
    session.run(None, feeds)
    peaks["onnxruntime"] = 2 * n**3 / min(_timed(lambda: session.run(None, feeds)) for _ in range(repeats)) / 1e9
    return peaks


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemma_layer_flops(d: GemmaDims, queries: int, keys: int) -> int:
    """One Gemma block: q/k/v/o projections, attention scores and mixing, the gated MLP (2 FLOPs a MAC)."""
    q_width, kv_width = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    projections = queries * d.width * (2 * q_width + 2 * kv_width)
    attention = 2 * d.num_heads * queries * keys * d.head_dim
    mlp = 3 * queries * d.width * d.mlp_dim
    return 2 * (projections + attention + mlp)


def vlm_flops(dims: Pi0Dims, cameras: int, tokens: int) -> int:
    """SigLIP per camera, the projector, and the language model over the prefix: every layer but the last
    in full; of the last only its keys and values (its output is never used, and is not computed)."""
    v = dims.vision
    patches = (v.image_size // v.patch_size) ** 2
    per_image = 2 * patches * 3 * v.patch_size**2 * v.width
    per_image += (
        v.depth * 2 * (4 * patches * v.width**2 + 2 * patches * patches * v.width + 2 * patches * v.width * v.mlp_dim)
    )
    per_image += 2 * patches * v.width * dims.language.width  # projector
    prefix = cameras * patches + tokens
    lang = dims.language
    last_layer_kv = 2 * prefix * lang.width * 2 * lang.num_kv_heads * lang.head_dim
    return cameras * per_image + (lang.depth - 1) * gemma_layer_flops(lang, prefix, prefix) + last_layer_kv


def expert_step_flops(dims: Pi0Dims, prefix: int, chunk: int) -> int:
    e = dims.expert
    suffix = chunk + 1  # the state token and the actions
    # state_proj; per action: action_in_proj, the time MLP (2W -> W -> W), action_out_proj
    heads = 2 * (dims.max_state_dim * e.width + chunk * (2 * dims.max_action_dim + 3 * e.width) * e.width)
    return e.depth * gemma_layer_flops(e, suffix, prefix + suffix) + heads


def depths(dims: Pi0Dims) -> dict[str, int]:
    return {"vision": dims.vision.depth, "language": dims.language.depth, "expert": dims.expert.depth}


def run(
    n: int = 10, dims: Pi0Dims | None = None, gemm_size: int = 2048, gemm_repeats: int = 20, validate: bool = True
) -> dict:
    """`dims`: pi0's widths at the reduced depth (`shallow_pi0`) unless given; `validate`: the bundle's own
    check against PyTorch (the smoke leaves it out: it is not what is timed)."""
    dims = dims or shallow_pi0()
    torch.manual_seed(0)
    policy = LoadedPolicy(
        model=Pi0(dims).eval().requires_grad_(False), spec=preset_spec(), source="pi0 widths, shallow"
    )
    params = sum(p.numel() for p in policy.model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        build_bundle(policy, out, BundleOptions(validate=validate), log=lambda message: None)
        del policy
        bundle = load_bundle(out)
        # the peak on either side of the timed requests, in the same conditions
        before = gemm_peak_gflops(gemm_size, gemm_repeats)
        timing = bench_engine(Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)), n)
        after = gemm_peak_gflops(gemm_size, gemm_repeats)
        spec = bundle.spec
    peaks = {k: max(before[k], after[k]) for k in before}
    peak = max(peaks.values())
    cameras, tokens = spec.num_camera_slots, spec.tokenizer_max_length
    prefix = cameras * 256 + tokens
    flops = {"vlm": vlm_flops(dims, cameras, tokens), "expert_step": expert_step_flops(dims, prefix, spec.chunk_size)}
    seconds = {"vlm": timing["vlm_ms"]["p50"] / 1e3, "expert_step": timing["expert_step_ms"]["p50"] / 1e3}
    achieved = {k: flops[k] / seconds[k] / 1e9 for k in flops}
    return {
        "dims": depths(dims),
        "parameters": params,
        "prefix_tokens": prefix,
        "gemm_peak_gflops": peaks,
        "gflop": {k: v / 1e9 for k, v in flops.items()},
        "ms": {k: v * 1e3 for k, v in seconds.items()},
        "achieved_gflops": achieved,
        "fraction_of_peak": {k: v / peak for k, v in achieved.items()},
        "timing": timing,
    }


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(peak: dict) -> list[str]:
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
        "peak. Targets: the VLM graph and the expert step each >= 85% of it.",
        "| graph | GFLOP | ms (p50) | GFLOP/s | fraction of peak |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {peak['gflop'][name]:.2f} | {peak['ms'][name]:.1f} | {peak['achieved_gflops'][name]:.0f} "
            f"| {peak['fraction_of_peak'][name]:.0%} |"
            for name in ("vlm", "expert_step")
        ),
    ]


def targets(peak: dict) -> list[tuple[str, str, str]]:
    fraction = peak["fraction_of_peak"]
    return [
        ("VLM graph, fraction of the fp32 GEMM peak", ">= 85%", f"{fraction['vlm']:.0%}"),
        (
            "expert step, fraction of the fp32 GEMM peak (Step 19)",
            ">= 85%",
            f"{fraction['expert_step']:.0%}" + ("" if fraction["expert_step"] >= 0.85 else ": **missed**"),
        ),
    ]


if __name__ == "__main__":
    main(run, SMOKE)
