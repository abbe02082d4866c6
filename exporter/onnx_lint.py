"""Check an ONNX graph against what Ascend's ATC can compile, before anyone waits for ATC to say no.

The operator table lists, for each ONNX operator our graphs may use, the opsets at which ATC's ONNX
parser registers it. Source: CANN's ONNX parser plugins (`framework/onnx_plugin/*_plugin.cc` in
Huawei's canndev / ops-nn sources), which register each operator as
`OriginOpType("ai.onnx::<opset>::<Op>")`; the ranges below are those registrations as read on
2026-11-22 (elementwise and logical ops from `similar_opp_plugins.cc`, registered for opsets 8-15;
the others from their own plugin files, registered up to 17 or 18). The table is deliberately the
subset our graphs need: an operator missing here is refused until someone checks ATC for it.
"""

from __future__ import annotations

from pathlib import Path

import onnx

ATC_OPSETS = range(9, 19)  # ATC's ONNX parser accepts opsets 9-18 (CANN 7+)

# op type -> (first, last) opset at which ATC's parser registers it
ATC_ONNX_OPS: dict[str, tuple[int, int]] = {
    # similar_opp_plugins.cc (REGISTER_CUSTOM_ONNX_OP for opsets 8..15)
    **dict.fromkeys(
        [
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Pow",
            "Sqrt",
            "Reciprocal",
            "Neg",
            "Abs",
            "Exp",
            "Log",
            "Tanh",
            "Sigmoid",
            "Erf",
            "Sin",
            "Cos",
            "Equal",
            "Less",
            "LessOrEqual",
            "Greater",
            "And",
            "Or",
            "Not",
            "Where",
            "Expand",
            "Identity",
            "Range",
            "Tile",
        ],
        (8, 15),
    ),
    # operators with their own plugin files
    "Cast": (9, 18),
    "Concat": (9, 18),
    "Reshape": (9, 18),
    "Transpose": (9, 18),
    "Unsqueeze": (9, 18),
    "Squeeze": (9, 18),
    "Slice": (9, 18),
    "Gather": (9, 18),
    "Split": (9, 18),
    "MatMul": (9, 18),
    "Gemm": (9, 18),
    "Conv": (9, 18),
    "Softmax": (9, 18),
    "ReduceMean": (9, 18),
    "CumSum": (11, 18),
    "LayerNormalization": (17, 18),
    "Shape": (9, 18),
    "ConstantOfShape": (9, 18),
    "ReduceSum": (13, 18),
    "Constant": (9, 18),
}

FORBIDDEN = {
    "Einsum": "ATC compiles Einsum only in a few fixed equations; write it as MatMul/Transpose",
    "Loop": "control flow does not compile to a static OM graph",
    "If": "control flow does not compile to a static OM graph",
    "Scan": "control flow does not compile to a static OM graph",
}
FORBIDDEN_TYPES = {
    onnx.TensorProto.BFLOAT16: "bfloat16 (the 310P has no bf16)",
    onnx.TensorProto.COMPLEX64: "complex64",
    onnx.TensorProto.COMPLEX128: "complex128",
    onnx.TensorProto.DOUBLE: "float64 (no float64 kernels on the AI cores)",
}


def _static(value_info: onnx.ValueInfoProto) -> bool:
    dims = value_info.type.tensor_type.shape.dim
    return all(d.HasField("dim_value") and d.dim_value > 0 for d in dims)


def lint(model: onnx.ModelProto | str | Path) -> list[str]:
    """Every problem that would stop ATC (or the runtime) with this graph; empty when it is clean."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    problems = []
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset not in ATC_OPSETS:
        problems.append(f"opset {opset} is outside ATC's range {ATC_OPSETS.start}-{ATC_OPSETS.stop - 1}")
    seen = set()
    for node in model.graph.node:
        key = (node.domain, node.op_type)
        if key in seen:
            continue
        seen.add(key)
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.op_type} is in domain {node.domain!r}: ATC reads ai.onnx operators only")
        elif node.op_type in FORBIDDEN:
            problems.append(f"{node.op_type} ({node.name}): {FORBIDDEN[node.op_type]}")
        elif node.op_type not in ATC_ONNX_OPS:
            problems.append(f"{node.op_type} ({node.name}) is not in the checked list of ATC's ONNX operators")
        else:
            first, last = ATC_ONNX_OPS[node.op_type]
            if opset is not None and not first <= opset <= last:
                problems.append(f"{node.op_type} is registered by ATC for opsets {first}-{last}, not {opset}")
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        if not _static(value):
            problems.append(f"{value.name} has a dynamic shape: ATC graphs take static shapes")
    typed = [(v.name, v.type.tensor_type.elem_type) for v in list(graph.input) + list(graph.output)]
    typed += [(v.name, v.type.tensor_type.elem_type) for v in graph.value_info]
    typed += [(t.name, t.data_type) for t in graph.initializer]
    typed += [(f"{n.name}.to", a.i) for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    for name, elem_type in typed:
        if elem_type in FORBIDDEN_TYPES:
            problems.append(f"{name} is {FORBIDDEN_TYPES[elem_type]}")
    return problems


# The ops the 310P runs on its Cube (matrix) unit, which multiplies float16 (and int8) only: with a
# float32 operand ATC places them on the AI CPU, orders of magnitude slower.
CUBE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
WIDE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}


def float32_cube_ops(model: onnx.ModelProto | str | Path) -> list[str]:
    """The names of the graph's Cube ops (MatMul, Gemm, Conv, ...) with any float32 input: in an fp16
    bundle each would run on the 310P's AI CPU. Types come from ONNX shape inference over the graph (its
    weights stay on disk: only their declared types are read)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return [
        node.name or f"{node.op_type}#{i}"
        for i, node in enumerate(graph.node)
        if node.op_type in CUBE_OPS and any(types.get(name) in WIDE_TYPES for name in node.input if name)
    ]
