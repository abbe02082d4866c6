"""Stand-in for CANN's `atc` (never on this machine): enforces what CANN's ATC documentation says, for
the arguments we use (sources in docs/cann-facts.md §2, §3, §5, §6).

--mode=0 (the default): compile. It checks the ONNX model the way atc would refuse it (unreadable,
opset outside 9-18, dynamic input shapes, ONNX external data missing beside the model), checks
--soc_version against what `npu-smi info` reports when npu-smi is present ("Ascend" + its Name), and
the precision options as documented:
- `--precision_mode_v2`: fp16 (default), origin, cube_fp16in_fp32out, mixed_float16; mixed_bfloat16,
  mixed_hif8 and cube_hif8 are documented for other chips only and are refused for Ascend310P*.
- `--precision_mode` (v1): force_fp16 (default), force_fp32/cube_fp16in_fp32out, allow_fp32_to_fp16,
  must_keep_origin_dtype, allow_mix_precision(_fp16); the bf16 ones are for other chips only.
- the two together are refused ("该参数不能与--precision_mode参数同时使用").
Op placement, the one documented rule that matters to us: under origin / must_keep_origin_dtype an fp32
op whose AI Core implementation supports only fp16 runs as the fp32 AI CPU op, and on Atlas inference
parts (310P) the Cube has no FLOAT32 (cann-facts §3, §8). So every matrix op (MatMul, Gemm, Conv,
BatchMatMul-like) with a float32 input is placed on the AI CPU (`aicpu_ascend_kernel`); everything
else on the AI Core (`AIcoreEngine`). Under the casting modes every op runs on the AI Core.
`--external_weight=1`: the weights go into a `weight/` directory beside the .om (one marker file here).

`<output>.om` is not a real OM: its first line is `ATC-STANDIN soc=... model=... sha256=...` (the pyACL
stand-in's loader reads it), the rest is the JSON that `--mode=1` prints.

--mode=1 `--om=X.om --json=X.json`: writes that JSON, in the layout Huawei's own parsers read:
{"graph": [{"op": [{"name", "type", "attr": [{"key": "_ge_attr_op_kernel_lib_name", "value": {"s": ...}}]}]}],
 "attr": [{"key": "soc_version", "value": {"s": ...}}, ...]}.

Exit status and messages follow atc's: 0 and "ATC run success".
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx

KNOWN = {
    "mode", "model", "framework", "output", "soc_version", "precision_mode_v2", "precision_mode", "input_format",
    "log", "keep_dtype", "external_weight", "om", "json",
}  # fmt: skip
V2_MODES = {"fp16", "origin", "cube_fp16in_fp32out", "mixed_float16", "mixed_bfloat16", "mixed_hif8", "cube_hif8"}
V1_MODES = {
    "force_fp16", "force_fp32", "cube_fp16in_fp32out", "allow_fp32_to_fp16", "must_keep_origin_dtype",
    "allow_mix_precision", "allow_mix_precision_fp16", "allow_mix_precision_bf16", "allow_fp32_to_bf16",
}  # fmt: skip
NOT_ON_310P = {"mixed_bfloat16", "mixed_hif8", "cube_hif8", "allow_mix_precision_bf16", "allow_fp32_to_bf16"}
KEEP_ORIGIN = {"origin", "must_keep_origin_dtype"}
ENGINE = "_ge_attr_op_kernel_lib_name"
AI_CORE, AI_CPU, GE_LOCAL = "AIcoreEngine", "aicpu_ascend_kernel", "DNN_VM_GE_LOCAL_OP_STORE"
MATRIX = re.compile(r"MatMul|Gemm|Conv", re.IGNORECASE)


def fail(message: str) -> None:
    print(f"ATC run failed, {message}", file=sys.stderr)
    sys.exit(1)


def attr(key: str, value: str) -> dict:
    return {"key": key, "value": {"s": value}}


def dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type: inputs, initializers, Constants, what shape inference knows, and for
    the rest, a Cast's `to` or the first input's type."""
    known = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    known.update({t.name: t.data_type for t in model.graph.initializer})
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        known.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
    except Exception:  # inference is a help, not a requirement
        pass
    for node in model.graph.node:
        for output in node.output:
            if known.get(output):
                continue
            if node.op_type == "Cast":
                known[output] = next(a.i for a in node.attribute if a.name == "to")
            elif node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
                known[output] = node.attribute[0].t.data_type
            elif node.input and known.get(node.input[0]):
                known[output] = known[node.input[0]]
    return known


def placements(model: onnx.ModelProto, soc: str, precision: str) -> list[dict]:
    types = dtypes(model)
    ops = [{"name": v.name, "type": "Data", "attr": [attr(ENGINE, GE_LOCAL)]} for v in model.graph.input]
    for index, node in enumerate(model.graph.node):
        fp32_in = any(types.get(i) == onnx.TensorProto.FLOAT for i in node.input if i)
        on_cpu = soc.startswith("Ascend310P") and precision in KEEP_ORIGIN and MATRIX.search(node.op_type) and fp32_in
        name = node.name or f"{node.op_type}_{index}"
        ops.append({"name": name, "type": node.op_type, "attr": [attr(ENGINE, AI_CPU if on_cpu else AI_CORE)]})
    ops.append({"name": "NetOutput", "type": "NetOutput", "attr": [attr(ENGINE, GE_LOCAL)]})
    return ops


def om_to_json(args: dict[str, str]) -> None:
    for required in ("om", "json"):
        if required not in args:
            fail(f"E10004: --{required} is required with --mode=1")
    om = Path(args["om"])
    if not om.is_file():
        fail(f"E10001: --om file {om} not found")
    first, _, rest = om.read_text().partition("\n")
    if not first.startswith("ATC-STANDIN ") or not rest.strip():
        fail(f"E10001: {om} is not an offline model")
    Path(args["json"]).write_text(rest)
    print("ATC run success, welcome to the next use.")


def main(argv: list[str]) -> None:
    args = {}
    for arg in argv:
        match = re.fullmatch(r"--(\w+)=(.*)", arg)
        if not match or match.group(1) not in KNOWN:
            fail(f"E10001: unknown or malformed argument {arg!r}")
        args[match.group(1)] = match.group(2)
    mode = args.get("mode", "0")
    if mode == "1":
        om_to_json(args)
        return
    if mode != "0":
        fail(f"E10001: --mode={mode} is not modelled by this stand-in (0: compile, 1: om to json)")
    for required in ("model", "framework", "output", "soc_version"):
        if required not in args:
            fail(f"E10004: --{required} is required")
    if args["framework"] != "5":
        fail("E10001: --framework must be 5 for ONNX")
    soc = args["soc_version"]
    if not re.fullmatch(r"Ascend310P[1-9]", soc):
        fail(f"E10001: unsupported --soc_version {soc}")
    if shutil.which("npu-smi"):
        info = subprocess.run(["npu-smi", "info"], capture_output=True, text=True).stdout
        chip = re.search(r"\b(310P\d)\b", info)
        if chip and f"Ascend{chip.group(1)}" != soc:
            fail(f"--soc_version {soc} does not match the device's Ascend{chip.group(1)}")
    if "precision_mode" in args and "precision_mode_v2" in args:
        fail("E10001: --precision_mode and --precision_mode_v2 cannot be used together")
    if "precision_mode_v2" in args:
        precision, modes, flag = args["precision_mode_v2"], V2_MODES, "--precision_mode_v2"
    else:
        precision, modes, flag = args.get("precision_mode", "force_fp16"), V1_MODES, "--precision_mode"
    if precision not in modes:
        fail(f"E10001: unsupported {flag} {precision}")
    if precision in NOT_ON_310P:
        fail(f"E10001: {flag}={precision} is not supported on {soc}")
    if args.get("external_weight", "0") not in ("0", "1", "2"):
        fail(f"E10001: unsupported --external_weight {args['external_weight']}")
    model_path = Path(args["model"])
    if not model_path.is_file():
        fail(f"E10001: model file {model_path} not found")
    model = onnx.load(str(model_path), load_external_data=False)
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    if not 9 <= opset <= 18:
        fail(f"E16005: opset {opset} is not supported")
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            fail(f"E10001: input {value.name} has a dynamic shape and no --input_shape was given")
    for tensor in model.graph.initializer:  # ONNX's rule: external data lies beside the model
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if not (model_path.parent / location).is_file():
                fail(f"E10001: {tensor.name}'s external data {location} not found beside {model_path.name}")
    if "keep_dtype" in args:  # one op name (or OpType::Type) per line; a name the model lacks is an error here
        keep = Path(args["keep_dtype"])
        if not keep.is_file():
            fail(f"E10001: --keep_dtype file {keep} not found")
        names = {node.name for node in model.graph.node}
        for line in keep.read_text().splitlines():
            if line.strip() and not line.startswith(("#", "OpType::")) and line.strip() not in names:
                fail(f"E10001: --keep_dtype names {line.strip()!r}, which is not an operator of {model_path.name}")
        print(f"keep_dtype: {len(keep.read_text().split())} operator(s) keep their dtype")
    output = Path(args["output"] + ".om")
    if not output.parent.is_dir():
        fail(f"E10001: output directory {output.parent} does not exist")
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    dump = {
        "name": output.stem,
        "graph": [{"name": output.stem, "op": placements(model, soc, precision)}],
        "attr": [
            attr("atc_cmdline", " ".join(["atc", *argv])),
            attr("soc_version", soc),
            attr("atc_version", "stand-in"),
            attr("opp_version", "stand-in"),
        ],
    }
    if args.get("external_weight", "0") != "0":
        weight = output.parent / "weight"
        weight.mkdir(exist_ok=True)
        (weight / f"weight_{digest[:16]}").write_text(f"ATC-STANDIN weights of {model_path.name}\n")
    output.write_text(f"ATC-STANDIN soc={soc} model={model_path.name} sha256={digest}\n" + json.dumps(dump) + "\n")
    print("ATC start working now, please wait for a moment.")
    print("ATC run success, welcome to the next use.")


if __name__ == "__main__":
    main(sys.argv[1:])
