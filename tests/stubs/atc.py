"""Stand-in for CANN's `atc` (never on this machine): enforces the contract our exporter relies on.

It accepts only the arguments real atc accepts in the form we use, checks the ONNX model the way atc
would refuse it (unreadable, opset outside 9-18, dynamic input shapes), checks --soc_version against
what `npu-smi info` reports when npu-smi is present, and writes `<output>.om` (not a real OM: a
marker with the model's sha256). Exit status and messages follow atc's: 0 and "ATC run success".
"""

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx

KNOWN = {
    "model", "framework", "output", "soc_version", "precision_mode_v2", "precision_mode", "input_format", "log",
    "keep_dtype",
}  # fmt: skip
PRECISION_MODES = {"origin", "force_fp16", "mixed_float16", "mixed_bfloat16", "cube_fp16in_fp32out", "mixed_hif8"}


def fail(message: str) -> None:
    print(f"ATC run failed, {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> None:
    args = {}
    for arg in argv:
        match = re.fullmatch(r"--(\w+)=(.*)", arg)
        if not match or match.group(1) not in KNOWN:
            fail(f"E10001: unknown or malformed argument {arg!r}")
        args[match.group(1)] = match.group(2)
    for required in ("model", "framework", "output", "soc_version"):
        if required not in args:
            fail(f"E10004: --{required} is required")
    if args["framework"] != "5":
        fail("E10001: --framework must be 5 for ONNX")
    if not re.fullmatch(r"Ascend310P[1-9]", args["soc_version"]):
        fail(f"E10001: unsupported --soc_version {args['soc_version']}")
    if shutil.which("npu-smi"):
        info = subprocess.run(["npu-smi", "info"], capture_output=True, text=True).stdout
        chip = re.search(r"\b(310P\d)\b", info)
        if chip and f"Ascend{chip.group(1)}" != args["soc_version"]:
            fail(f"--soc_version {args['soc_version']} does not match the device's Ascend{chip.group(1)}")
    if args.get("precision_mode_v2", "origin") not in PRECISION_MODES:
        fail(f"E10001: unsupported --precision_mode_v2 {args['precision_mode_v2']}")
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
    output.write_text(f"ATC-STANDIN soc={args['soc_version']} model={model_path.name} sha256={digest}\n")
    print("ATC start working now, please wait for a moment.")
    print("ATC run success, welcome to the next use.")


if __name__ == "__main__":
    main(sys.argv[1:])
