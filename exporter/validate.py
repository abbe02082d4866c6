"""Validation: the exported graphs under onnxruntime against the float32 PyTorch model, judged by the
model's own precision.

Three comparisons on the same deterministic inputs, all in the normalized (network) space:
- vlm: the prefix keys and values of every layer;
- expert: one velocity at t = 1, fed the *reference* prefix cache, so its error is the expert's own;
- end to end: the VLM graph once and the expert graph num_steps times in the Euler loop, against
  the PyTorch sampler from the same noise.
The same three are measured for two yardsticks of the model itself: its float32 noise floor (the
PyTorch model in float64 against float32) and its error in bfloat16, the precision pi0 was trained and
is served in upstream. Absolute thresholds that a tiny fixture passes say nothing at real widths, so
the criteria are relative (end to end, and against the unmerged LoRA forward where there is one):
- fp32: max abs <= max(1e-4, FLOOR_MULTIPLE x the floor's max abs);
- fp16: cosine >= 0.999, and max abs and mean abs no worse than the model's own bf16 run;
- int8: fp16's, per graph as well (the VLM's keys and values, the expert's velocity: each no worse than
  bf16's own), since int8 is chosen matmul by matmul per graph (`exporter/int8.py`).
The float64 run needs a float64 copy of the weights for a moment (twice the float32 model: 26 GB for
the full pi0); where the memory is not there the yardsticks are skipped, the report says so, and the
absolute criteria apply (fp32 max abs <= 1e-4; fp16 and int8 cosine >= 0.999 and mean abs <= 1e-2).
The reference always runs the model as the checkpoint defines it; graphs that leave out the
always-empty camera slots are fed the same inputs without them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from exporter.onnx_export import example_inputs, two_prompts
from exporter.pi0 import Pi0
from exporter.precision import weights_in
from exporter.torch_backend import PrefixCache, TorchBackend
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.graphs import PREFIX_CACHE, VLM, VLM_GUIDED
from runtime.bundle.guidance import PROMPT_CONDITION
from runtime.bundle.spec import PolicySpec
from runtime.engine import denoise, sample
from runtime.pipeline.model_io import ModelInputs

FP32_MAX_ABS = 1e-4  # where the floor is tiny (the fixtures)
FLOOR_MULTIPLE = 10.0  # onnxruntime's accumulation order against PyTorch's: a few floors apart
FP16_COSINE = 0.999
# Against another implementation's output where no yardstick of the model ran (open-loop parity):
ABSOLUTE = {
    "fp32": {"max_abs": FP32_MAX_ABS},
    "fp16": {"cosine": FP16_COSINE, "mean_abs": 1e-2},
    "int8": {"cosine": FP16_COSINE, "mean_abs": 1e-2},
}
PER_GRAPH = {"int8": ("vlm", "expert")}  # precisions judged per graph too, and which graphs


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


def validation_request(
    full_spec: PolicySpec, spec: PolicySpec, model: Pi0, seed: int
) -> tuple[ModelInputs, np.ndarray]:
    """The synthetic request validation runs at `seed` (the checkpoint's camera slots, a few real tokens of
    the bundle's budget `spec`): its model inputs and its noise."""
    x = example_inputs(full_spec, model, seed, real_tokens=min(spec.tokenizer_max_length, 7))
    return ModelInputs(x["images"], x["image_masks"], x["tokens"], x["token_mask"], x["state"]), x["noise"]


def reference(
    model: Pi0, inputs: ModelInputs, noise: np.ndarray, num_steps: int, dtype: torch.dtype = torch.float32,
    context: Reference | None = None,
) -> Reference:  # fmt: skip
    """Run the model (in its present weights, inputs cast to `dtype`) and keep what validation needs.
    With `context`, the expert's single velocity is fed that reference's prefix cache (its own error)."""
    backend = TorchBackend(model, dtype)
    inputs = replace(inputs, tokens=inputs.tokens.astype(np.int64))
    cache = backend.prefix(inputs)
    ((keys, values, mask),) = cache.prompts
    own = (
        cache
        if context is None
        else PrefixCache([(backend.as_tensor(context.prefix_keys), backend.as_tensor(context.prefix_values), mask)])
    )
    velocity = backend.velocity(own, inputs.state, noise, np.ones(1, np.float32))
    actions = denoise(backend, cache, inputs.state, noise, num_steps)
    as_np = lambda x: x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()  # noqa: E731
    return Reference(inputs, noise, num_steps, as_np(keys), as_np(values), velocity, actions)


VALIDATION_SCALE = 2.0  # the beta guidance is validated at: CFGRL's and RECAP's range (1.5 - 3)


@dataclass(frozen=True)
class GuidedReference:
    """Guidance as its definition reads (`TorchBackend`: each branch its own batch-1 call), at beta =
    VALIDATION_SCALE; `inputs` carry both prompts (a condition in the prompt) or one."""

    inputs: ModelInputs
    actions: np.ndarray


def guided_reference(model: Pi0, ref: Reference, kind: str) -> GuidedReference:
    inputs = ref.inputs
    if kind == PROMPT_CONDITION:
        tokens, mask = two_prompts(inputs.tokens, inputs.token_mask)
        inputs = replace(inputs, tokens=tokens, token_mask=mask)
    backend = TorchBackend(model)
    cache = backend.prefix(replace(inputs, tokens=inputs.tokens.astype(np.int64)))
    actions = denoise(backend, cache, inputs.state, ref.noise, ref.num_steps, guidance_scale=VALIDATION_SCALE)
    return GuidedReference(inputs, actions)


def against(ref: Reference, other: Reference) -> dict[str, dict[str, float]]:
    """`other`'s three figures against the float32 reference."""
    return {
        "vlm": compare(
            np.concatenate([other.prefix_keys, other.prefix_values]),
            np.concatenate([ref.prefix_keys, ref.prefix_values]),
        ),
        "expert": compare(other.velocity, ref.velocity),
        "end_to_end": compare(other.actions, ref.actions),
    }


def yardsticks(model: Pi0, ref: Reference) -> dict[str, dict[str, dict[str, float]]]:
    """The model's float32 noise floor (float64 against float32) and its bf16 error, on ref's inputs.
    The model's float32 weights are untouched afterwards (`weights_in` puts them back)."""
    with weights_in(model, torch.float64):
        floor = reference(model, ref.inputs, ref.noise, ref.num_steps, torch.float64, context=ref)
    with weights_in(model, torch.bfloat16, towers_only=True):
        bf16 = reference(model, ref.inputs, ref.noise, ref.num_steps, context=ref)
    return {"floor_fp64": against(ref, floor), "bf16": against(ref, bf16)}


def yardstick_bytes(model: Pi0) -> int:
    """What `yardsticks` adds to memory for a moment: every weight in float64 (the bf16 copy comes after)."""
    return sum(p.numel() for p in model.parameters()) * 8


def thresholds(
    precision: str, marks: dict[str, dict[str, dict[str, float]]] | None, graph: str = "end_to_end"
) -> dict[str, float]:
    """The criteria for `precision` on `graph` (end to end by default), from the model's own yardsticks (see
    the module doc); without them (not measured: no memory for a float64 copy of the model), the absolute ones."""
    if not marks:
        return dict(ABSOLUTE[precision])
    if precision == "fp32":
        return {"max_abs": max(FP32_MAX_ABS, FLOOR_MULTIPLE * marks["floor_fp64"][graph]["max_abs"])}
    bf16 = marks["bf16"][graph]
    return {"cosine": FP16_COSINE, "max_abs": bf16["max_abs"], "mean_abs": bf16["mean_abs"]}


def as_graphs_take(full: ModelInputs, spec: PolicySpec) -> ModelInputs:
    """Inputs made at the checkpoint's sizes, cut to the graphs': camera slots beyond `spec.num_camera_slots`
    and token positions beyond `spec.tokenizer_max_length` left out (all masked)."""
    slots, length = spec.num_camera_slots, spec.tokenizer_max_length
    if full.token_mask[:, length:].any():
        raise ValueError("the reference has real tokens beyond the graphs' token budget")
    return replace(
        full,
        images=full.images[:, :slots],
        image_masks=full.image_masks[:, :slots],
        tokens=full.tokens[:, :length],
        token_mask=full.token_mask[:, :length],
    )


def graph_inputs(ref: Reference, spec: PolicySpec) -> tuple[ModelInputs, np.ndarray]:
    """The reference's inputs as the graphs take them (camera slots beyond `spec.num_camera_slots` and
    token positions beyond `spec.tokenizer_max_length` left out: all masked), and the prefix positions
    those graphs keep, as indices into the reference's prefix."""
    slots, length = spec.num_camera_slots, spec.tokenizer_max_length
    full = ref.inputs
    inputs = as_graphs_take(full, spec)
    full_slots, full_length = full.images.shape[1], full.tokens.shape[1]
    per_image = (ref.prefix_keys.shape[2] - full_length) // full_slots
    language = full_slots * per_image + np.arange(length)
    return inputs, np.concatenate([np.arange(slots * per_image), language])


def failures(name: str, result: dict[str, float], limits: dict[str, float]) -> list[str]:
    """Each of `limits` that `result` misses, in words ("vlm max_abs 0.02 > 0.01"); cosine is a floor."""
    return [
        f"{name} {metric} {result[metric]:.3g} {'<' if metric == 'cosine' else '>'} {limit:.3g}".strip()
        for metric, limit in limits.items()
        if not (result[metric] >= limit if metric == "cosine" else result[metric] <= limit)
    ]


def graph_results(backend: OnnxRuntimeBackend, ref: Reference, spec: PolicySpec) -> dict[str, dict[str, float]]:
    """Each graph's own error: the VLM's keys and values (at the valid positions of the prefix positions the
    graphs keep: what a masked token holds is never read), one expert velocity fed the reference cache."""
    inputs, kept = graph_inputs(ref, spec)
    ref_keys, ref_values = ref.prefix_keys[:, :, kept], ref.prefix_values[:, :, kept]
    cache = backend.prefix(inputs)
    got = backend.cache_to_numpy(cache)
    got_keys, got_values, got_mask = (got[name] for name in PREFIX_CACHE)
    valid = np.asarray(got_mask, dtype=bool).reshape(-1)
    ref_cache = backend.prefix_from_numpy(ref_keys, ref_values, got_mask)
    velocity = backend.velocity(ref_cache, inputs.state, ref.noise, np.ones(1, np.float32))
    return {
        "vlm": compare(
            np.concatenate([got_keys, got_values])[:, :, valid],
            np.concatenate([ref_keys, ref_values])[:, :, valid],
        ),
        "expert": compare(velocity, ref.velocity),
    }


def end_to_end(backend: OnnxRuntimeBackend, ref: Reference, spec: PolicySpec) -> np.ndarray:
    """The whole sampler on the reference's inputs and noise: the VLM graph once, the expert num_steps times."""
    return sample(backend, graph_inputs(ref, spec)[0], ref.noise, ref.num_steps)


def graph_and_chunk_results(
    backend: OnnxRuntimeBackend, ref: Reference, spec: PolicySpec
) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """Each graph's own error (`graph_results`) and the whole sampler's (`end_to_end`), and its chunk."""
    results = graph_results(backend, ref, spec)
    actions = end_to_end(backend, ref, spec)
    results["end_to_end"] = compare(actions, ref.actions)
    return results, actions


def validate(
    backend: OnnxRuntimeBackend,
    ref: Reference,
    precision: str,
    spec: PolicySpec,
    marks: dict[str, dict[str, dict[str, float]]] | None = None,
    lora_ref: Reference | None = None,
    guided_ref: GuidedReference | None = None,
) -> dict:
    """Compare the backend (graphs for `spec`) with the reference; `marks`: the model's own yardsticks
    (`yardsticks`), which set the criteria. Graphs without the empty camera slots are compared on the
    prefix positions they keep. `lora_ref`: the checkpoint's unmerged LoRA forward, which the bundle
    (merged weights) must match too, so that every export proves its merge. `guided_ref`: guidance as its
    definition reads, which the guided graphs (both branches batched) must match; its criteria are the
    absolute ones (the yardsticks measure the unguided chunk)."""
    results, actions = graph_and_chunk_results(backend, ref, spec)
    if lora_ref is not None:
        results["vs_lora_forward"] = compare(actions, lora_ref.actions)
    limits = thresholds(precision, marks)
    checked = {"end_to_end": limits, "vs_lora_forward": limits}
    checked |= {graph: thresholds(precision, marks, graph) for graph in PER_GRAPH.get(precision, ())}
    if guided_ref is not None:
        g = as_graphs_take(guided_ref.inputs, spec)
        cache = backend.prefix(g, VLM_GUIDED if len(g.tokens) == 2 else VLM)
        guided = denoise(backend, cache, g.state, ref.noise, ref.num_steps, guidance_scale=VALIDATION_SCALE)
        cache.release()
        results[f"guided_beta{VALIDATION_SCALE:g}"] = compare(guided, guided_ref.actions)
        checked[f"guided_beta{VALIDATION_SCALE:g}"] = thresholds(precision, None)
    missed = [f for name, r in results.items() if name in checked for f in failures(name, r, checked[name])]
    per_graph = {graph: checked[graph] for graph in PER_GRAPH.get(precision, ())}
    return {
        "precision": precision,
        "num_steps": ref.num_steps,
        "space": "normalized actions (before de-normalization)",
        "thresholds": limits,
        **({"graph_thresholds": per_graph} if per_graph else {}),
        "criteria": "fp32: max abs <= max(1e-4, 10 x floor); fp16: cosine >= 0.999, max and mean abs <= bf16's; "
        "int8: fp16's, end to end and per graph (vlm, expert: each against bf16's own)",
        "results": results,
        "yardsticks": marks or {},
        "passed": not missed,
        "failures": missed,
    }


def format_report(report: dict) -> str:
    """Per graph: the bundle's error, and beside it the floor's and bf16's (max abs)."""
    marks = report.get("yardsticks") or {}
    lines = [f"{'graph':<16} {'max abs':>10} {'mean abs':>10} {'cosine':>12} {'floor fp64':>11} {'bf16':>10}"]
    for name, r in report["results"].items():
        floor = marks.get("floor_fp64", {}).get(name, {}).get("max_abs")
        bf16 = marks.get("bf16", {}).get(name, {}).get("max_abs")
        extra = "".join(f" {v:>10.3g}" if v is not None else f" {'':>10}" for v in (floor, bf16))
        lines.append(f"{name:<16} {r['max_abs']:>10.3g} {r['mean_abs']:>10.3g} {r['cosine']:>12.8f}{extra}")
    limits = ", ".join(f"{k} {v:.3g}" for k, v in report["thresholds"].items())
    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    lines.append(f"{report['precision']} criteria ({limits}): {verdict}")
    return "\n".join(lines)
