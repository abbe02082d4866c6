"""Classifier-free guidance's cost: a chunk with both branches (beta = 2, the `expert_guided` graph: one
batched call per step) against the conditioned branch alone (beta = 1, the plain graphs), on the same
engine, requests alternating, same run; for a learned condition (one prefix) and a condition in the prompt
(two prefixes, one batched VLM call). pi0's real widths at the reduced depth `fraction_of_peak` uses,
random weights, fp32 bundles, onnxruntime on this CPU.

And the 310P estimate, from the dimensions (`ascend_estimate`'s peaks): the expert step is bandwidth-bound,
and a batch of two reads its weights once; the second branch adds its FLOPs and, with two prompts, a second
prefix cache to read.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.ascend_estimate import FP16, PEAK_BYTES_PER_S, PEAK_FP16_FLOPS, parameter_counts
from benchmarks.cli import main
from benchmarks.fraction_of_peak import depths, expert_step_flops, gemma_layer_flops, shallow_pi0, vlm_flops
from benchmarks.render import grid
from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import LoadedPolicy
from exporter.dims import PRESETS, Pi0Dims
from exporter.pi0 import Pi0
from exporter.presets import preset_spec
from exporter.tokenizer_train import train_tokenizer
from runtime.backends import BackendOptions
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.engine import Engine
from runtime.pipeline.observation import Observation

KINDS = {"embedding": "a learned condition", "prompt": "a condition in the prompt"}
CONDITION_TEXT = ", Advantage: positive"
GUIDED = 2.0
STAGES = ("vlm_ms", "expert_step_ms", "total_ms")
SMOKE = {"n": 1, "dims": PRESETS["pi0-dummy"], "validate": False}


def time_both(engine: Engine, n: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """p50 per stage at beta = 1 and beta = GUIDED, requests alternating (so drift hits both alike)."""
    meta = engine.metadata()
    obs = Observation.synthetic(meta)
    obs = Observation(obs.images, obs.state, prompt="transfer the cube", seed=0)
    runs: dict[str, list[dict[str, float]]] = {"1": [], f"{GUIDED:g}": []}
    for i in range(warmup + n):
        for scale in runs:
            _, timing = engine.infer(dataclasses.replace(obs, guidance_scale=float(scale)))
            if i >= warmup:
                runs[scale].append(timing)
    return {scale: {stage: float(np.median([t[stage] for t in ts])) for stage in STAGES} for scale, ts in runs.items()}


def measure(kind: str, towers: Pi0Dims, n: int, validate: bool, tokenizer: Path, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = Pi0(dataclasses.replace(towers, condition="bias" if kind == "embedding" else None))
    model = model.eval().requires_grad_(False)
    spec = preset_spec(image_size=towers.vision.image_size)
    policy = LoadedPolicy(model=model, spec=spec, source=f"guidance ({kind}), pi0 widths, shallow")
    options = BundleOptions(
        tokenizer=tokenizer, validate=validate, guidance_prompt=CONDITION_TEXT if kind == "prompt" else None
    )
    out = tmp / kind
    build_bundle(policy, out, options, log=lambda message: None)
    del policy, model
    bundle = load_bundle(out)
    engine = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle, BackendOptions()))
    ms = time_both(engine, n)
    engine.close()
    single, guided = ms["1"], ms[f"{GUIDED:g}"]
    return {"ms": ms, "ratio": {stage: guided[stage] / single[stage] for stage in STAGES}}


def estimate_310p(dims: Pi0Dims = PRESETS["pi0"], cameras: int = 1, tokens: int = 48, chunk: int = 50) -> dict:
    """Per expert step and per VLM run: the floor (max of compute and memory time at the peaks) for one
    branch and for both, by kind of condition."""
    params = parameter_counts(dims)
    lang = dims.language
    prefix = cameras * 256 + tokens
    kv_bytes = lang.depth * 2 * prefix * lang.num_kv_heads * lang.head_dim * FP16
    step_flops = expert_step_flops(dims, prefix, chunk)
    weights = params["expert"] * FP16

    def floor_ms(flops: float, moved: float) -> float:
        return max(flops / PEAK_FP16_FLOPS, moved / PEAK_BYTES_PER_S) * 1e3

    language_flops = (lang.depth - 1) * gemma_layer_flops(lang, prefix, prefix)  # what a second prompt adds
    vlm_bytes = (params["vision"] + params["language"] + tokens * lang.width) * FP16
    vlm_one = vlm_flops(dims, cameras, tokens)
    result = {
        "single": {"expert_step_ms": floor_ms(step_flops, weights + kv_bytes), "vlm_ms": floor_ms(vlm_one, vlm_bytes)}
    }
    for kind, caches in (("embedding", 1), ("prompt", 2)):
        vlm = floor_ms(vlm_one + language_flops, vlm_bytes) if kind == "prompt" else result["single"]["vlm_ms"]
        result[kind] = {"expert_step_ms": floor_ms(2 * step_flops, weights + caches * kv_bytes), "vlm_ms": vlm}
    for kind in KINDS:
        steps = 10
        single, guided = result["single"], result[kind]
        result[kind]["chunk_ratio"] = (guided["vlm_ms"] + steps * guided["expert_step_ms"]) / (
            single["vlm_ms"] + steps * single["expert_step_ms"]
        )
        result[kind]["expert_step_ratio"] = guided["expert_step_ms"] / single["expert_step_ms"]
    return result


def run(n: int = 10, dims: Pi0Dims | None = None, validate: bool = True) -> dict:
    towers = dims or shallow_pi0()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(Path(tmp) / "tokenizer.model")
        measured = {kind: measure(kind, towers, n, validate, tokenizer, Path(tmp)) for kind in KINDS}
    return {"n": n, "dims": depths(towers), "guided_scale": GUIDED, "cpu": measured, "ascend_310p": estimate_310p()}


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def targets(result: dict) -> list[tuple[str, str, str]]:
    measured = "; ".join(
        f"{what}: {ratio:.2f}x" + ("" if ratio <= 1.4 else " **missed**")
        for kind, what in KINDS.items()
        if (ratio := result["cpu"][kind]["ratio"]["total_ms"])
    )
    return [("guided chunk (both branches) / one branch, this CPU", "<= 1.4x", measured)]


def sections(result: dict) -> list[str]:
    rows = []
    for kind, what in KINDS.items():
        m = result["cpu"][kind]
        for stage in STAGES:
            one, two = m["ms"]["1"][stage], m["ms"][f"{result['guided_scale']:g}"][stage]
            rows.append((f"{what}: {stage}", f"{one:.1f} / {two:.1f} = {m['ratio'][stage]:.2f}x"))
    est = result["ascend_310p"]
    est_rows = [
        (
            f"{what}",
            f"{est['single']['expert_step_ms']:.2f} / {est[kind]['expert_step_ms']:.2f} ms = "
            f"{est[kind]['expert_step_ratio']:.2f}x",
            f"{est[kind]['chunk_ratio']:.2f}x",
        )
        for kind, what in KINDS.items()
    ]
    return [
        "## Classifier-free guidance (`benchmarks/guidance.py`)",
        f"Both branches (beta = {result['guided_scale']:g}: `expert_guided`, one batched call per step; with a "
        "condition in the prompt also `vlm_guided`, two prompts in one call) against the conditioned branch alone "
        "(beta = 1, the plain graphs), the same engine, requests alternating, p50 of "
        f"{result['n']} each: pi0's real widths at depths "
        + ", ".join(f"{tower} {depth}" for tower, depth in result["dims"].items())
        + ", random weights, fp32, onnxruntime on this CPU. A CPU is compute-bound, so a batch of two costs "
        "nearly twice one per expert step here, and a second prompt nearly doubles the language model's share of "
        "the VLM (the vision tower runs once); on the 310P the expert is bandwidth-bound (below).",
        grid(["stage", "one branch / both (ms)"], [list(r) for r in rows]),
        "The 310P estimate (arithmetic, never run on a 310P; `ascend_estimate`'s peaks, real pi0 dimensions, "
        "1 camera, 48 tokens, chunk 50, 10 steps): a batch of two reads the expert's weights once; a second "
        "prompt adds its prefix cache to each step's reads and its language-model FLOPs to the VLM.",
        grid(["condition", "expert step floor, one / both", "chunk floor ratio"], [list(r) for r in est_rows]),
    ]


if __name__ == "__main__":
    main(run, SMOKE)
