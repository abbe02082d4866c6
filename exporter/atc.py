"""Compile the bundle's ONNX graphs to Ascend OM files with CANN's `atc`, or say exactly how to.

Flags, and why:
- `--framework=5`: ONNX.
- `--soc_version`: must name the chip `npu-smi info` reports (a mismatch fails at load time with ACL
  error 507011); read from `npu-smi` when it is installed, else given, else Ascend310P1.
- `--precision_mode_v2=origin`: keep the graph's own dtypes. Our fp16 graphs already hold fp16
  matmuls with fp32 islands (norms, softmax, RoPE, residual sums); ATC's default for the 310P casts
  everything it can to fp16 and would undo the islands. (CANN < 8.0 spells it
  `--precision_mode=must_keep_origin_dtype`.)
- `--input_format=ND`: the inputs are plain tensors (images are 5-D), not NCHW feature maps.
- `--keep_dtype=<graph>.keep_dtype.cfg`, when calibration kept matmuls in float32 (fp16 bundles): one
  ONNX node name per line (CANN's format). CANN documents that under `origin` the flag takes no effect,
  because origin already keeps every op's dtype, our float32 islands included; the file travels with the
  bundle so that the islands survive a compile with a casting mode too (e.g. `--precision_mode_v2=fp16`).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from exporter.errors import ExportError

DEFAULT_SOC = "Ascend310P1"


class AtcError(ExportError):
    """atc was needed and is missing, or it failed."""


def atc_command(onnx_file: str, om_stem: str, soc_version: str, keep_dtype: str | None = None) -> list[str]:
    """One graph's atc command line, with paths relative to the bundle directory."""
    keep = [f"--keep_dtype={keep_dtype}"] if keep_dtype else []
    return [
        "atc",
        f"--model={onnx_file}",
        "--framework=5",
        f"--output={om_stem}",
        f"--soc_version={soc_version}",
        "--precision_mode_v2=origin",
        "--input_format=ND",
        *keep,
        "--log=error",
    ]


def write_script(bundle: Path, commands: dict[str, list[str]]) -> Path:
    script = bundle / "atc.sh"
    lines = [
        "#!/usr/bin/env bash",
        "# Compile this bundle's graphs for Ascend with CANN's atc (source CANN's set_env.sh first).",
        "# Then re-run `pi0-export bundle` with --atc always, or copy om/ into the bundle by hand.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "mkdir -p om",
        *(shlex.join(cmd) + f" 2>&1 | tee om/{name}.atc.log" for name, cmd in commands.items()),
    ]
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script


def compile_graphs(bundle: Path, commands: dict[str, list[str]], log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run atc for each graph in the bundle directory; keep its log in om/<name>.atc.log."""
    if shutil.which("atc") is None:
        raise AtcError("atc is not on PATH (source CANN's set_env.sh, or use --atc auto|never)")
    (bundle / "om").mkdir(exist_ok=True)
    outputs = {}
    for name, cmd in commands.items():
        log(f"atc: compiling {name} ({shlex.join(cmd[1:3])} ...), this can take minutes")
        result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
        log_file = bundle / "om" / f"{name}.atc.log"
        log_file.write_text(result.stdout + result.stderr)
        om = bundle / (next(a.split("=", 1)[1] for a in cmd if a.startswith("--output=")) + ".om")
        if result.returncode != 0 or not om.is_file():
            raise AtcError(f"atc failed on {name} (exit {result.returncode}); its log: {log_file}")
        outputs[name] = om
    return outputs
