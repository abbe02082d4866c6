"""Where float16 holds: range calibration, the fp32 islands it decides, and the model run in other
precisions for validation's yardsticks.

fp16's largest finite value is 65 504; pi0 was trained in bf16, which has float32's range. The forward
code keeps norms, softmax, RoPE and the residual stream in float32 whatever the weights
(`exporter/layers.py`), but a float16 matmul whose *input or output* passes 65 504 overflows before any
of that helps. So every matmul of the float16 towers (Linear -> MatMul/Gemm, Conv2d -> Conv, Embedding ->
Gather) is watched while the float32 reference runs on the calibration inputs (the validation's and any
the user gives), and each whose largest input, output or weight magnitude reaches `KEEP_AT` (2^13, 8x
below fp16's limit: headroom for inputs calibration did not see) keeps float32 weights and so computes
in float32. The Gemma MLP's product (a Mul) is down_proj's input and runs in down_proj's dtype; every
other Mul is elementwise in float32 already.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from exporter.pi0 import Pi0

FP16_MAX = 65504.0
KEEP_AT = 2.0**13
TOWERS = ("vision", "projector", "embed_tokens", "llm", "expert")  # what goes to float16
MATMULS = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclass
class OpRange:
    """One matmul's largest magnitudes over the calibration runs, and its FLOPs in one call."""

    kind: str
    max_in: float
    max_out: float
    max_weight: float
    flops: int = 0

    @property
    def peak(self) -> float:
        return max(self.max_in, self.max_out, self.max_weight)


def tower_matmuls(model: Pi0) -> dict[str, nn.Module]:
    """The float16 candidates by module name (`llm.layers.0.mlp.down_proj`)."""
    found = {}
    for tower in TOWERS:
        for name, module in getattr(model, tower).named_modules():
            if isinstance(module, MATMULS):
                found[f"{tower}.{name}" if name else tower] = module
    return found


def _magnitude(t: torch.Tensor) -> float:
    """max |t| without a tensor of |t| (the full pi0's token embedding alone is 2 GB)."""
    t = t.detach()
    return float(torch.maximum(t.max(), -t.min()))


def _flops(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
    return 0  # a gather


class RangeRecorder:
    """While entered, records every tower matmul's magnitudes and its FLOPs per call."""

    def __init__(self, model: Pi0) -> None:
        self.modules = tower_matmuls(model)
        self.ranges = {
            name: OpRange(type(m).__name__, 0.0, 0.0, _magnitude(m.weight)) for name, m in self.modules.items()
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
            if inputs[0].is_floating_point():
                r.max_in = max(r.max_in, _magnitude(inputs[0]))
            r.max_out = max(r.max_out, _magnitude(output))
            r.flops = _flops(module, output)

        return record


def islands(ranges: dict[str, OpRange], keep_at: float = KEEP_AT) -> list[str]:
    """The matmuls that stay float32 in an fp16 bundle."""
    return sorted(name for name, r in ranges.items() if r.peak >= keep_at)


def calibration_report(
    ranges: dict[str, OpRange], kept: list[str], inputs: int, num_steps: int, keep_at: float = KEEP_AT
) -> dict:
    """What report.json records; FLOPs per inference: the prefix once, the expert num_steps times."""
    per_inference = {name: r.flops * (num_steps if name.startswith("expert.") else 1) for name, r in ranges.items()}
    total = sum(per_inference.values())
    kept_flops = sum(per_inference[name] for name in kept)
    return {
        "inputs": inputs,
        "fp16_max": FP16_MAX,
        "keep_at": keep_at,
        "kept_fp32": kept,
        "kept_flops_share": kept_flops / total if total else 0.0,
        "matmul_gflops_per_inference": total / 1e9,
        "largest": max((r.peak for r in ranges.values()), default=0.0),
        "ops": {name: asdict(r) for name, r in ranges.items()},
    }


def to_precision_(model: Pi0, precision: str, keep_fp32: tuple[str, ...] | list[str] = ()) -> Pi0:
    """Put the model's weights in the export precision, in place, one tensor at a time.

    fp16: the towers (vision, projector, embeddings, both Gemmas) go to float16, for the 310P's cube
    units, except the matmuls named in `keep_fp32` (calibration's islands); the small suffix projections
    (and pi0.5's time MLP) stay float32, as LeRobot keeps them. fp32: everything float32.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    keep = set(keep_fp32)
    unknown = keep - set(tower_matmuls(model))
    if unknown:
        raise ValueError(f"no such matmul in the towers: {sorted(unknown)}")
    for tower in TOWERS:
        for name, module in getattr(model, tower).named_modules():
            full = f"{tower}.{name}" if name else tower
            for param in module.parameters(recurse=False):
                param.data = param.data.to(torch.float32 if full in keep else dtype)
    return model


@contextmanager
def weights_in(model: Pi0, dtype: torch.dtype, towers_only: bool = False) -> Iterator[Pi0]:
    """The model with its weights in `dtype` for a while (float64: every weight; bfloat16 with
    `towers_only`: the towers, as fp16 export would), then the very same float32 tensors put back.
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


def island_nodes(graph: Path, model: Pi0, kept: list[str]) -> list[str]:
    """The ONNX nodes of `graph` that compute the kept matmuls, for ATC's --keep_dtype file. Found by
    their float32 weights, not by name: the exporter folds a Linear's weight into a transposed, renamed
    initializer, and names nodes after the module calls on the path (a method like `keys_values` adds
    no scope), not after module paths."""
    if not kept:
        return []
    modules = tower_matmuls(model)
    weights = [modules[name].weight.detach().numpy() for name in kept]
    proto = onnx.load(str(graph), load_external_data=False)
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv", "Gather"):
            for name in node.input:
                consumers.setdefault(name, []).append(node.name)
    found = set()
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name not in consumers:
            continue
        dims = tuple(init.dims)
        candidates = [w for w in weights if dims in (w.shape, w.shape[::-1])]
        if not candidates:
            continue
        array = numpy_helper.to_array(init, base_dir=str(graph.parent))
        if any(np.array_equal(array, w if array.shape == w.shape else w.T) for w in candidates):
            found.update(consumers[init.name])
    return sorted(found)
