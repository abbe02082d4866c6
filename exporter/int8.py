"""int8 bundles for the CPU (onnxruntime) backend: the exported float32 graphs through onnxruntime's own
dynamic quantization, on the matmuls where calibration and measurement say it holds.

How a matmul becomes int8: `onnxruntime.quantization.quantize_dynamic` turns a MatMul whose second operand
is a weight into DynamicQuantizeLinear + MatMulInteger (onnxruntime fuses them into one int8 GEMM, on
VNNI/AMX where the CPU has them): the weight int8, symmetric, one scale per output channel; the
activation uint8 with its range taken on every call (dynamic). Static scales (`quantize_static`, QDQ or
QLinearMatMul, MinMax calibration) were measured on the same graphs and not chosen: no faster on the VLM,
and 1.4-4.7x the error of dynamic scales (a fixed range clips or wastes steps on inputs calibration did
not see; docs/bundle.md has the numbers).

Which matmuls (each Linear of the model; its MatMul node is found by its weights):
1. fp32 by rule: the attention products (both operands are activations: scores and probs @ values);
   the first and last projections: the patch embedding (a Conv on the pixels), the projector (every
   image token enters the language model through it), the language model's k/v projections (they write
   the prefix cache, the VLM graph's output) and the suffix projections (state, action in and out, the
   time MLP: float32 in upstream's bf16 serving too, and so in the bf16 yardstick).
2. fp32 by calibration: the float32 reference runs on the validation inputs and `--calibration OBS.npz`
   with every Linear watched (`Int8Recorder`); a matmul whose int8 rounding noise, predicted from those
   ranges, passes `NOISE_LIMIT` stays fp32: an input whose range is many times its rms (Gemma's massive
   activations: one step of 1/255 of the range is then most of a typical value), or an output channel
   whose weights hold an outlier.
3. The rest go int8 least predicted noise first, as many as each graph's own bar allows: a bisection on
   the validation inputs, each try the graph (vlm: the prefix keys and values; expert: one velocity fed
   the reference cache) and the whole sampler judged as validation judges them, against the model's own
   bf16 run. The VLM is searched first, with the expert in fp32: a prefix within its own bar can still put
   the chunk over bf16's (every step reads it). Guidance's graphs take the choice of the graph they batch.
Validation then judges the bundle per graph and end to end (`exporter.validate`); a model where no
matmul holds in int8 is refused (`Int8Error`). report.json's `int8` section lists every matmul that
stayed fp32 and why, with its calibrated figures.

The search and that verdict use the one validation request, so the set sits at bf16's error there. On
requests the search never saw it is about bf16's error, not within it each time: `held_out` measures
HELD_OUT more synthetic requests (seeds after the validation one) against their own bf16 runs and
records each figure and their mean in report.json, without judging them (a per-request "no worse than
bf16" fails about half the time for anything exactly as accurate as bf16).

int8 bundles run on onnxruntime only: ATC does not take onnxruntime's int8 operators (the 310P's int8
path is CANN's AMCT), so the exporter compiles no OM and the ACL backend refuses them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from exporter.errors import ExportError
from exporter.pi0 import Pi0
from exporter.precision import PREFIX, TOWERS, RangeRecorder
from exporter.validate import (
    Reference,
    failures,
    graph_and_chunk_results,
    reference,
    validation_request,
    yardsticks,
)
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.graphs import EXPERT, EXPERT_GUIDED, VLM, VLM_GUIDED
from runtime.bundle.manifest import load_bundle
from runtime.bundle.spec import PolicySpec
from runtime.engine import Engine
from runtime.pipeline.observation import Observation

INT8 = "int8"
NOISE_LIMIT = 0.02  # predicted int8 rounding noise, relative to the rms of what is rounded
# Each graph's int8 set is searched on its own bar and the end-to-end one (the VLM first, the expert then
# fp32; the expert after, on the VLM's choice). Guidance's graphs take the choice of the graph they batch.
SEARCHED = {VLM: (VLM, "end_to_end"), EXPERT: (EXPERT, "end_to_end")}
BASE_GRAPH = {VLM: VLM, VLM_GUIDED: VLM, EXPERT: EXPERT, EXPERT_GUIDED: EXPERT}
CACHE_WRITERS = re.compile(r"^llm\.layers\.\d+\.self_attn\.[kv]_proj$")
INT8_OPS = ("MatMulInteger", "DynamicQuantizeLinear")
HELD_OUT = 3  # synthetic requests the search never saw, measured (not judged) after validation
FIGURES = (VLM, EXPERT, "end_to_end")


class Int8Error(ExportError):
    """The model cannot be served in int8 within its own bf16 run's error, or int8 was asked with
    something it cannot go with."""


def input_noise(x: torch.Tensor) -> float:
    """The rms rounding noise of DynamicQuantizeLinear (uint8 steps over [min(x, 0), max(x, 0)]) relative to
    x's rms: range / 255 / sqrt(12) / rms."""
    x = x.detach().float()
    rms = float(x.square().mean().sqrt())
    span = float(x.max().clamp(min=0) - x.min().clamp(max=0))
    return span / 255 / math.sqrt(12) / rms if rms > 0 else 0.0


def weight_noise(w: torch.Tensor) -> float:
    """The worst output channel's rms rounding noise in symmetric per-channel int8 (steps of max |w_c| / 127),
    relative to that channel's rms."""
    w = w.detach().float().flatten(1)
    rms = w.square().mean(1).sqrt()
    step = w.abs().amax(1) / 127
    noise = torch.where(rms > 0, step / math.sqrt(12) / rms.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return float(noise.max())


class Int8Recorder(RangeRecorder):
    """`RangeRecorder`, and for every Linear the worst calibration call's predicted int8 input noise."""

    def __init__(self, model: Pi0) -> None:
        super().__init__(model)
        self.input_noise = {name: 0.0 for name, m in self.modules.items() if isinstance(m, nn.Linear)}

    def _hook(self, name: str):  # noqa: ANN202
        record = super()._hook(name)
        if name not in self.input_noise:
            return record

        def with_noise(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            record(module, inputs, output)
            self.input_noise[name] = max(self.input_noise[name], input_noise(inputs[0]))

        return with_noise


@dataclass
class Plan:
    """What calibration decided: the matmuls that stay fp32 ({module: why and its figures}) and the
    candidates for int8, least predicted noise first."""

    fp32: dict[str, dict]
    candidates: list[str]
    noise: dict[str, float] = field(default_factory=dict)  # a candidate's predicted int8 noise


def _rule(name: str, kind: str) -> str | None:
    """Why a matmul stays fp32 whatever its ranges, or None."""
    if kind == "MatMul":
        return "attention product: both operands are activations"
    if kind == "Conv2d":
        return "first projection: the patch embedding reads the pixels"
    if name == "projector":
        return "first projection of the language model: every image token enters through it"
    if CACHE_WRITERS.match(name):
        return "last projection of the VLM graph: writes the prefix cache"
    if not name.startswith(TOWERS):
        return "suffix projection: float32 in upstream's bf16 serving too"
    return None


def plan(model: Pi0, recorder: Int8Recorder, limit: float = NOISE_LIMIT) -> Plan:
    """Decide from the calibrated ranges (`recorder`, entered around the calibration runs)."""
    fp32, noise = {}, {}
    for name, r in recorder.ranges.items():
        if r.kind == "Embedding":  # a gather, not a matmul
            continue
        figures = {"max_in": r.max_in, "max_out": r.max_out, "max_weight": r.max_weight}
        if (why := _rule(name, r.kind)) is not None:
            fp32[name] = {"why": why, **figures}
            continue
        n_in, n_w = recorder.input_noise[name], weight_noise(recorder.modules[name].weight)
        figures |= {"input_noise": n_in, "weight_noise": n_w}
        if n_in > limit:
            why = f"calibrated input range {r.max_in:.3g}: int8 noise {n_in:.2%} of its rms > {limit:.0%} (outliers)"
        elif n_w > limit:
            why = f"weights up to {r.max_weight:.3g}: an output channel's int8 noise {n_w:.2%} > {limit:.0%} (outliers)"
        else:
            noise[name] = math.hypot(n_in, n_w)
            continue
        fp32[name] = {"why": why, **figures}
    return Plan(fp32, sorted(noise, key=lambda name: noise[name]), noise)


def weight_digests(model: Pi0) -> dict[str, str | None]:
    """{digest of a Linear's weight as the exported graph holds it (transposed, float32): its module}; None
    where modules share the same weights (their nodes are not told apart, and stay fp32)."""
    found: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = _digest(module.weight.detach().float().T.contiguous().numpy())
            found[key] = None if key in found else name
    return found


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def graph_matmuls(path: Path, digests: dict[str, str | None]) -> dict[str, str]:
    """{MatMul node: its module} for the graph's MatMuls whose second operand is a Linear's weight."""
    model = onnx.load(str(path), load_external_data=True)
    weights = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            module = digests.get(_digest(onnx.numpy_helper.to_array(weights[node.input[1]])))
            if module is not None:
                found[node.name] = module
    return found


def op_counts(path: Path) -> dict[str, int]:
    """The graph's int8 ops and the float32 MatMuls left."""
    counts = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: counts[op] for op in (*INT8_OPS, "MatMul")}


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer advises pre-processing on the root logger at every call: not for our users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(source: list[Path], out: Path, nodes: list[str]) -> None:
    """`source` (a graph and its external data, if any) with `nodes` int8, written to `out`; no nodes: a copy."""
    if not nodes:
        for path in source:
            shutil.copyfile(path, out.with_name(path.name))
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnx appends external tensors to a data file that is already there: the search writes the same graph
    # again and again, so what an earlier try wrote goes first (else the weights pile up, one copy a try).
    for path in source:
        out.with_name(path.name).unlink(missing_ok=True)
    with _quiet():
        quantize_dynamic(
            source[0],
            out,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            use_external_data_format=len(source) > 1,
            extra_options={"MatMulConstBOnly": True},
        )


def quantize_bundle(
    work: Path,
    files: dict[str, list[Path]],
    the_plan: Plan,
    digests: dict[str, str | None],
    ref: Reference,
    spec: PolicySpec,
    limits: dict[str, dict[str, float]],
    log: Callable[[str], None],
) -> dict:
    """Quantize the bundle's float32 graphs (in `work`, `files` as export_graphs wrote them) in place: each
    searched graph gets the longest prefix of the plan's candidates that keeps it within `limits[graph]`
    (validation's criteria per graph, and end to end). Returns report.json's `int8` section."""
    originals = work / ".int8-source"
    originals.mkdir()
    source = {}
    for name, paths in files.items():
        source[name] = [originals / p.name for p in paths]
        for path, kept in zip(paths, source[name], strict=True):
            path.rename(kept)
        quantize_graph(source[name], paths[0], [])
    nodes = {name: graph_matmuls(source[name][0], digests) for name in files}
    order = {module: i for i, module in enumerate(the_plan.candidates)}
    chosen: dict[str, list[str]] = {}
    trials = []
    for graph in SEARCHED:
        candidates = sorted((n for n, m in nodes[graph].items() if m in order), key=lambda n: order[nodes[graph][n]])

        def holds(count: int, graph: str = graph, candidates: list[str] = candidates) -> bool:
            quantize_graph(source[graph], files[graph][0], candidates[:count])
            backend = OnnxRuntimeBackend(load_bundle(work, verify=False))
            results, _ = graph_and_chunk_results(backend, ref, spec)
            backend.close()
            missed = [f for name in SEARCHED[graph] for f in failures(name, results[name], limits[name])]
            result = results[graph]
            trials.append({"graph": graph, "int8": count, "holds": not missed, **result})
            log(
                f"      int8 {graph}: {count} of {len(candidates)} matmuls, max abs {result['max_abs']:.3g}, mean abs "
                f"{result['mean_abs']:.3g}, cosine {result['cosine']:.6f}: "
                + (f"over bf16's error ({'; '.join(missed)})" if missed else "holds")
            )
            return not missed

        count = _longest(len(candidates), holds)
        quantize_graph(source[graph], files[graph][0], candidates[:count])
        chosen[graph] = [nodes[graph][n] for n in candidates[:count]]
    for graph in files:
        if graph not in SEARCHED:
            taken = set(chosen[BASE_GRAPH[graph]])
            quantize_graph(source[graph], files[graph][0], [n for n, m in nodes[graph].items() if m in taken])
    shutil.rmtree(originals)
    int8 = {m for modules in chosen.values() for m in modules}
    if not int8:
        tried = "; ".join(
            f"{t['graph']} with 1 int8: max abs {t['max_abs']:.3g}, mean abs {t['mean_abs']:.3g}" for t in trials
            if t["int8"] == 1
        )  # fmt: skip
        why = f"{tried}; bf16's: {limits}" if tried else "every one stays fp32 by rule or by its calibrated ranges"
        raise Int8Error(f"no matmul of this model holds in int8 within its own bf16 run's error ({why}): export fp32")
    return _section(the_plan, nodes, chosen, trials, files)


def _longest(n: int, holds: Callable[[int], bool]) -> int:
    """The largest count in 0..n that `holds` accepts, by bisection from n (0 is taken to hold: float32)."""
    if n == 0 or holds(n):
        return n
    good, bad = 0, n
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if holds(mid) else (good, mid)
    return good


def _section(
    the_plan: Plan,
    nodes: dict[str, dict[str, str]],
    chosen: dict[str, list[str]],
    trials: list[dict],
    files: dict[str, list[Path]],
) -> dict:
    """report.json's `int8`: what is int8 per graph, what stayed fp32 and why, the search's tries, the ops."""
    int8 = {m for modules in chosen.values() for m in modules}
    fp32 = dict(the_plan.fp32)
    for graph in SEARCHED:
        held = len(chosen[graph])
        for module in set(nodes[graph].values()) - int8 - set(fp32):
            noise = the_plan.noise.get(module)
            fp32[module] = {
                "why": f"left fp32 by the search: the {graph} graph holds bf16's error with its {held} least noisy "
                "candidates int8, not with more",
                "predicted_noise": noise,
            }
    present = {m for graph_nodes in nodes.values() for m in graph_nodes.values()}
    return {
        "mode": "dynamic",
        "weights": "int8, symmetric, one scale per output channel",
        "activations": "uint8, range taken per call (DynamicQuantizeLinear)",
        "noise_limit": NOISE_LIMIT,
        "int8": {graph: sorted(modules) for graph, modules in chosen.items()},
        "fp32": dict(sorted(fp32.items())),
        # e.g. the language model's last layer past its k/v projections: the graphs never read it
        "not_in_graphs": sorted(set(the_plan.candidates) - present),
        "search": trials,
        "ops": {graph: op_counts(paths[0]) for graph, paths in files.items()},
    }


def flops_share(section: dict, calibration: dict, num_steps: int) -> float:
    """The int8 matmuls' share of the matmul FLOPs per inference (the prefix once, the rest num_steps times)."""
    per = {name: r["flops"] * (1 if name.startswith(PREFIX) else num_steps) for name, r in calibration["ops"].items()}
    total = sum(per.values())
    int8 = {m for modules in section["int8"].values() for m in modules}
    return sum(per[m] for m in int8) / total if total else 0.0


def served_chunk(bundle_dir: Path, seed: int) -> dict:
    """The chunk the bundle serves (runtime Engine on onnxruntime) for `Observation.synthetic(seed)` at guidance
    scale 1 (its tokens need no tokenizer): recorded in report.json so that a served chunk can be checked
    against the validated bundle's."""
    bundle = load_bundle(bundle_dir, verify=False)
    engine = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle))
    try:
        obs = replace(Observation.synthetic(engine.metadata(), seed=seed), guidance_scale=1.0)
        actions = engine.infer(obs)[0]
    finally:
        engine.close()
    return {
        "observation": f"Observation.synthetic(metadata, seed={seed}), guidance_scale 1",
        "actions": np.asarray(actions).tolist(),
    }


@dataclass
class HeldOut:
    """A request the search never saw: its float32 reference and the model's own yardsticks on it."""

    seed: int
    ref: Reference
    marks: dict[str, dict[str, dict[str, float]]]


def held_out_references(model: Pi0, full_spec: PolicySpec, spec: PolicySpec, seed: int) -> list[HeldOut]:
    """HELD_OUT validation requests at seeds seed+1.. (`validation_request`), their references and yardsticks."""
    held = []
    for s in range(seed + 1, seed + 1 + HELD_OUT):
        inputs, noise = validation_request(full_spec, spec, model, s)
        ref = reference(model, inputs, noise, full_spec.num_steps)
        held.append(HeldOut(s, ref, yardsticks(model, ref)))
    return held


def held_out(backend: OnnxRuntimeBackend, requests: list[HeldOut], spec: PolicySpec) -> dict:
    """report.json's `int8.held_out`: each graph's and the chunk's error on each held-out request, beside
    that request's bf16 error, and the means over them (measured, not judged)."""
    rows = []
    for request in requests:
        results, _ = graph_and_chunk_results(backend, request.ref, spec)
        rows.append({"seed": request.seed, "int8": results, "bf16": {f: request.marks["bf16"][f] for f in FIGURES}})
    mean = {
        side: {f: {m: float(np.mean([r[side][f][m] for r in rows])) for m in ("max_abs", "mean_abs")} for f in FIGURES}
        for side in ("int8", "bf16")
    }
    return {
        "requests": rows,
        "mean": mean,
        "within_bf16_on_average": {
            f: all(mean["int8"][f][m] <= mean["bf16"][f][m] for m in ("max_abs", "mean_abs")) for f in FIGURES
        },
        "note": "synthetic requests at seeds after the validation one, which the int8 search never saw; measured, "
        "not judged",
    }
