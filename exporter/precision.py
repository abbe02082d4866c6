"""Where float16 holds: range calibration, the power-of-two scales it decides, and the model run in
other precisions for validation's yardsticks.

fp16's largest finite value is 65 504; pi0 was trained in bf16, which has float32's range. The forward
code keeps norms, softmax, RoPE and the residual stream in float32 whatever the weights
(`exporter/layers.py`), but a float16 matmul whose *input or output* passes 65 504 overflows before any
of that helps, and the 310P's Cube has no float32 to fall back on (a float32 MatMul runs on the AI CPU).
So every matmul of the model (Linear -> MatMul/Gemm, Conv2d -> Conv, the attention's two products, and
Embedding -> Gather, whose weights only are checked) is watched while the float32 reference runs on the
calibration inputs (the validation's and any the user gives). Each whose largest input or output reaches
`KEEP_AT` (2^13, 8x below fp16's limit: headroom for inputs calibration did not see) gets a scale k, the
smallest with max_in 2^-k and max_out 2^-k both <= KEEP_AT: it computes (x 2^-k) W in float16 and
multiplies by 2^k in float32 after, exact in binary floating point. An attention product scales each
operand by its own power of two. Weights beyond fp16's range are refused (an fp16 bundle cannot hold
them). The Gemma MLP's product (a Mul) is down_proj's input: computed in float32 where down_proj is scaled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from exporter.errors import ExportError
from exporter.layers import MatMul
from exporter.pi0 import Pi0

FP16_MAX = 65504.0
KEEP_AT = 2.0**13
TOWERS = ("vision", "projector", "embed_tokens", "llm", "expert")  # what the bf16 yardstick casts
PREFIX = ("vision", "projector", "embed_tokens", "llm")  # computed once per inference; the rest every step
MATMULS = (nn.Linear, nn.Conv2d, nn.Embedding, MatMul)


class PrecisionError(ExportError):
    """The model cannot be put in float16: a weight beyond its range, or a non-finite float32 reference."""


@dataclass
class OpRange:
    """One matmul's largest magnitudes over the calibration runs, and its FLOPs in one call. For an
    attention product (`MatMul`), `max_in` is its first operand's (as the Cube is fed it: q already
    divided by sqrt(head_dim)) and `max_in_b` its second's; it has no weight."""

    kind: str
    max_in: float
    max_out: float
    max_weight: float
    flops: int = 0
    max_in_b: float = 0.0

    @property
    def peak(self) -> float:
        return max(self.max_in, self.max_out, self.max_weight, self.max_in_b)


def model_matmuls(model: Pi0) -> dict[str, nn.Module]:
    """Every float16 matmul candidate by module name (`llm.layers.0.mlp.down_proj`, `llm.layers.0.self_attn.qk`,
    `action_in_proj`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MATMULS)}


def _magnitude(t: torch.Tensor) -> float:
    """max |t| without a tensor of |t| (the full pi0's token embedding alone is 2 GB)."""
    t = t.detach()
    return float(torch.maximum(t.max(), -t.min()))


def _flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, MatMul):
        return 2 * output.numel() * inputs[0].shape[-1]
    return 0  # a gather


class RangeRecorder:
    """While entered, records every matmul's magnitudes and its FLOPs per call."""

    def __init__(self, model: Pi0) -> None:
        self.modules = model_matmuls(model)
        self.ranges = {
            name: OpRange(type(m).__name__, 0.0, 0.0, _magnitude(m.weight) if hasattr(m, "weight") else 0.0)
            for name, m in self.modules.items()
        }
        self._handles: list = []

    def __enter__(self) -> RangeRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):  # noqa: ANN202
        r = self.ranges[name]

        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, MatMul):
                post = abs(inputs[2]) if len(inputs) > 2 else 1.0  # what the Cube is fed: q / sqrt(D)
                r.max_in = max(r.max_in, _magnitude(inputs[0]) * post)
                r.max_in_b = max(r.max_in_b, _magnitude(inputs[1]))
            elif inputs[0].is_floating_point():
                r.max_in = max(r.max_in, _magnitude(inputs[0]))
            r.max_out = max(r.max_out, _magnitude(output))
            r.flops = _flops(module, inputs, output)

        return record


def exponent(magnitude: float, keep_at: float = KEEP_AT) -> int:
    """The smallest k >= 0 with magnitude 2^-k <= keep_at."""
    k = 0
    while magnitude * 2.0**-k > keep_at:
        k += 1
    return k


def scales(ranges: dict[str, OpRange], keep_at: float = KEEP_AT) -> dict[str, int | list[int]]:
    """The power-of-two scales of an fp16 bundle: {op: k}, {op: [k_a, k_b]} for an attention product
    (its operands' own, the first raised until the output fits too); ops that need none are left out.
    Refuses weights beyond fp16's range and magnitudes the float32 reference could not hold."""
    bad = sorted(name for name, r in ranges.items() if not all(map(math.isfinite, (r.max_in, r.max_out, r.max_in_b))))
    if bad:
        raise PrecisionError(f"the float32 reference is not finite in {', '.join(bad)}: nothing to calibrate fp16 on")
    beyond = sorted(f"{name} (|w| {r.max_weight:.3g})" for name, r in ranges.items() if r.max_weight > FP16_MAX)
    if beyond:
        raise PrecisionError(
            f"weights beyond fp16's range ({FP16_MAX:.0f}): {', '.join(beyond)}; an fp16 bundle cannot hold them, "
            "export with --precision fp32"
        )
    found: dict[str, int | list[int]] = {}
    for name, r in ranges.items():
        if r.kind == "Embedding":  # a gather: no arithmetic, its weights are checked above
            continue
        if r.kind == "MatMul":
            ka, kb = exponent(r.max_in, keep_at), exponent(r.max_in_b, keep_at)
            ka += exponent(r.max_out * 2.0 ** -(ka + kb), keep_at)
            if ka or kb:
                found[name] = [ka, kb]
        elif k := exponent(max(r.max_in, r.max_out), keep_at):
            found[name] = k
    return dict(sorted(found.items()))


def calibration_report(
    ranges: dict[str, OpRange], scaled: dict[str, int | list[int]], inputs: int, num_steps: int,
    keep_at: float = KEEP_AT,
) -> dict:  # fmt: skip
    """What report.json records; FLOPs per inference: the prefix once, the expert and suffix num_steps times."""
    per_inference = {name: r.flops * (1 if name.startswith(PREFIX) else num_steps) for name, r in ranges.items()}
    total = sum(per_inference.values())
    scaled_flops = sum(per_inference[name] for name in scaled)
    return {
        "inputs": inputs,
        "fp16_max": FP16_MAX,
        "keep_at": keep_at,
        "scaled": scaled,
        "scaled_flops_share": scaled_flops / total if total else 0.0,
        "matmul_gflops_per_inference": total / 1e9,
        "largest": max((r.peak for r in ranges.values()), default=0.0),
        "ops": {name: asdict(r) for name, r in ranges.items()},
    }


def to_precision_(model: Pi0, precision: str, scaled: dict[str, int | list[int]] | None = None) -> Pi0:
    """Put the model in the export precision, in place, one tensor at a time.

    fp16: every weight goes to float16 (the towers, the embeddings and the suffix projections: the 310P's
    Cube multiplies float16 only), every attention product computes in float16, and the ops in `scaled`
    (calibration's {op: k}) get their power-of-two scales. fp32: everything float32, nothing scaled.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    scaled = scaled or {}
    modules = model_matmuls(model)
    unknown = set(scaled) - set(modules)
    if unknown:
        raise ValueError(f"no such matmul in the model: {sorted(unknown)}")
    if precision == "fp32":
        if scaled:
            raise ValueError("an fp32 export scales nothing")
        for param in model.parameters():
            param.data = param.data.to(torch.float32)
        return model
    for name, param in model.named_parameters():
        if _magnitude(param) > FP16_MAX:
            raise PrecisionError(f"{name} reaches {_magnitude(param):.3g}, beyond fp16's range: export fp32")
    for param in model.parameters():
        param.data = param.data.to(torch.float16)
    for name, module in modules.items():
        if isinstance(module, MatMul):
            module.dtype = torch.float16
            module.scale_exp = tuple(scaled.get(name, (0, 0)))
        elif name in scaled:
            module.scale_exp = int(scaled[name])
    return model


@contextmanager
def weights_in(model: Pi0, dtype: torch.dtype, towers_only: bool = False) -> Iterator[Pi0]:
    """The model with its weights in `dtype` for a while (float64: every weight; bfloat16 with
    `towers_only`: the towers, as upstream serves pi0 in bf16 with float32 suffix projections), then the very same float32 tensors put back.
    Costs one copy of the affected weights in `dtype` (float64: twice the float32 model)."""
    modules = [getattr(model, t) for t in TOWERS] if towers_only else [model]
    params = [p for m in modules for p in m.parameters()]
    originals = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(dtype)
        yield model
    finally:
        for p, original in zip(params, originals, strict=True):
            p.data = original
