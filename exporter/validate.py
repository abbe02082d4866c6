"""Validation: the exported graphs under onnxruntime against the float32 PyTorch model.

Three comparisons on the same deterministic inputs, all in the normalized (network) space:
- vlm: the prefix keys and values of every layer;
- expert: one velocity at t = 1, fed the *reference* prefix cache, so its error is the expert's own;
- end to end: the VLM graph once and the expert graph num_steps times in the Euler loop, against
  the PyTorch sampler from the same noise.
Thresholds apply end to end: fp32 max abs <= 1e-4; fp16 cosine >= 0.999 and mean abs <= 1e-2.
The reference always runs the model as the checkpoint defines it; graphs that leave out the
always-empty camera slots are fed the same inputs without them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from exporter.pi0 import Pi0
from exporter.torch_backend import TorchBackend
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.engine import denoise, sample
from runtime.pipeline import ModelInputs
from runtime.spec import PolicySpec

THRESHOLDS = {
    "fp32": {"max_abs": 1e-4},
    "fp16": {"cosine": 0.999, "mean_abs": 1e-2},
}


def compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    diff = np.abs(got - want)
    norm = np.linalg.norm(got) * np.linalg.norm(want)
    return {
        "max_abs": float(diff.max()) if np.isfinite(diff).all() else float("inf"),
        "mean_abs": float(diff.mean()) if np.isfinite(diff).all() else float("inf"),
        "cosine": float(got @ want / norm) if norm > 0 and np.isfinite(norm) else float("nan"),
    }


@dataclass
class Reference:
    """What the float32 PyTorch model computes on the validation inputs."""

    inputs: ModelInputs
    noise: np.ndarray
    num_steps: int
    prefix_keys: np.ndarray
    prefix_values: np.ndarray
    velocity: np.ndarray
    actions: np.ndarray  # normalized, padded: the sampler's x(t=0)


def reference(model: Pi0, inputs: ModelInputs, noise: np.ndarray, num_steps: int) -> Reference:
    """Run the float32 model once (before it is cast for export) and keep what validation needs."""
    backend = TorchBackend(model)
    inputs = replace(inputs, tokens=inputs.tokens.astype(np.int64))
    cache = backend.prefix(inputs)
    velocity = backend.velocity(cache, inputs.state, noise, np.ones(1, np.float32))
    actions = denoise(backend, cache, inputs.state, noise, num_steps)
    keys, values, _ = cache
    return Reference(inputs, noise, num_steps, keys.numpy(), values.numpy(), velocity, actions)


def graph_inputs(ref: Reference, spec: PolicySpec) -> tuple[ModelInputs, np.ndarray]:
    """The reference's inputs as the graphs take them (camera slots beyond `spec.num_camera_slots` and
    token positions beyond `spec.tokenizer_max_length` left out: all masked), and the prefix positions
    those graphs keep, as indices into the reference's prefix."""
    slots, length = spec.num_camera_slots, spec.tokenizer_max_length
    full = ref.inputs
    if full.token_mask[:, length:].any():
        raise ValueError("the reference has real tokens beyond the graphs' token budget")
    inputs = replace(
        full,
        images=full.images[:, :slots],
        image_masks=full.image_masks[:, :slots],
        tokens=full.tokens[:, :length],
        token_mask=full.token_mask[:, :length],
    )
    full_slots, full_length = full.images.shape[1], full.tokens.shape[1]
    per_image = (ref.prefix_keys.shape[2] - full_length) // full_slots
    language = full_slots * per_image + np.arange(length)
    return inputs, np.concatenate([np.arange(slots * per_image), language])


def validate(
    backend: OnnxRuntimeBackend, ref: Reference, precision: str, spec: PolicySpec, lora_ref: Reference | None = None
) -> dict:
    """Compare the backend (graphs for `spec`) with the reference; the report says, per check, whether
    it passed. Graphs without the empty camera slots are compared on the prefix positions they keep.
    `lora_ref`: the checkpoint's unmerged LoRA forward, which the bundle (merged weights) must match too,
    so that every export proves its merge."""
    inputs, kept = graph_inputs(ref, spec)
    ref_keys, ref_values = ref.prefix_keys[:, :, kept], ref.prefix_values[:, :, kept]
    cache = backend.prefix(inputs)
    got = backend.cache_to_numpy(cache)
    valid = np.asarray(got["prefix_mask"], dtype=bool).reshape(-1)
    ref_cache = backend.prefix_from_numpy(ref_keys, ref_values, got["prefix_mask"])
    velocity = backend.velocity(ref_cache, inputs.state, ref.noise, np.ones(1, np.float32))
    actions = sample(backend, inputs, ref.noise, ref.num_steps)
    results = {
        "vlm": compare(  # at the valid positions: what a masked token holds is never read
            np.concatenate([got["prefix_keys"], got["prefix_values"]])[:, :, valid],
            np.concatenate([ref_keys, ref_values])[:, :, valid],
        ),
        "expert": compare(velocity, ref.velocity),
        "end_to_end": compare(actions, ref.actions),
    }
    if lora_ref is not None:
        results["vs_lora_forward"] = compare(actions, lora_ref.actions)
    thresholds = THRESHOLDS[precision]
    failures = [
        f"{name} {metric} {r[metric]:.3g} {'<' if metric == 'cosine' else '>'} {limit:g}"
        for name, r in results.items()
        if name in ("end_to_end", "vs_lora_forward")
        for metric, limit in thresholds.items()
        if not (r[metric] >= limit if metric == "cosine" else r[metric] <= limit)
    ]
    return {
        "precision": precision,
        "num_steps": ref.num_steps,
        "space": "normalized actions (before de-normalization)",
        "thresholds": thresholds,
        "results": results,
        "passed": not failures,
        "failures": failures,
    }


def format_report(report: dict) -> str:
    lines = [f"{'graph':<16} {'max abs':>10} {'mean abs':>10} {'cosine':>12}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<16} {r['max_abs']:>10.3g} {r['mean_abs']:>10.3g} {r['cosine']:>12.8f}")
    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    lines.append(f"{report['precision']} thresholds {report['thresholds']}: {verdict}")
    return "\n".join(lines)
