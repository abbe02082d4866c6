"""Compile the bundle's ONNX graphs to Ascend OM files with CANN's `atc` (CANN >= 7.0.0), or say exactly how to.

Flags, and why (sources in docs/cann-facts.md):
- `--framework=5`: ONNX.
- `--soc_version`: "Ascend" + the Name `npu-smi info` prints on the device (deployed 310P cards: 310P3,
  so Ascend310P3; §6). Read from npu-smi where it is installed, else `--soc-version` is required; no
  default is guessed. atc.sh, where atc is not installed here, reads it on the box it runs on (or takes
  it as its argument). CANN documents no error code for an OM built for another SoC, so the runtime
  compares the SoC itself (`pi0-runtime check`, runtime/npu.py) instead of waiting for a load failure.
- `--precision_mode_v2=origin`: keep the graph's own dtypes. Our fp16 graphs hold every matmul in fp16
  and the vector ops that need it (norms, softmax, RoPE, residual sums) in fp32; ATC's default (fp16)
  casts everything it can to fp16 and would undo those. Under origin an fp32 op whose AI Core
  implementation supports only fp16 runs on the AI CPU (§3), and the 310P's Cube has no fp32 (§8): an
  fp32 matmul compiled this way runs on the AI CPU, which is why the exporter reads the placement
  back (`atc --mode=1`, `_ge_attr_op_kernel_lib_name`, §2) and refuses AI CPU matmuls unless allowed.
  (--precision_mode_v2 is documented from CANN 7.0.0 on; the v1 spelling is must_keep_origin_dtype.)
- `--input_format=ND`: the inputs are plain tensors (images are 5-D), not NCHW feature maps.
- `--external_weight=1` when the graph keeps its weights in ONNX external data (the full-size VLM,
  ~5 GB: protobuf caps one file at 2 GB): the OM's weights go to `om/weight/`, beside the .om, where
  `acl.mdl.load_from_file` looks for them (§5). That atc reads ONNX external data is not documented.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import ExportError

ENGINE_ATTR = "_ge_attr_op_kernel_lib_name"  # per-op engine in `atc --mode=1` JSON (cann-facts §2)
MATRIX_OP = re.compile(r"MatMul|Gemm|Conv", re.IGNORECASE)  # ONNX and GE spellings (MatMulV2, BatchMatMulV2, Conv2D)
SOC_RULE = 'soc = "Ascend" + the Name `npu-smi info` prints on the device (e.g. Ascend310P3 on Atlas 300I Pro/Duo)'


class AtcError(ExportError):
    """atc was needed and is missing, or it failed."""


@dataclass
class CompiledGraph:
    """One graph's OM and what `atc --mode=1` says about it."""

    om: Path
    json: Path
    soc_version: str | None
    ai_cpu_ops: list[dict[str, str]] = field(default_factory=list)  # {"name", "type", "engine"}

    @property
    def ai_cpu_matrix_ops(self) -> list[dict[str, str]]:
        return [op for op in self.ai_cpu_ops if MATRIX_OP.search(op["type"])]


def atc_command(
    onnx_file: str,
    om_stem: str,
    soc_version: str,
    external_weight: bool = False,
) -> list[str]:
    """One graph's atc command line, with paths relative to the bundle directory. `external_weight`:
    the graph's weights are in ONNX external data (write them beside the OM, in om/weight/)."""
    weight = ["--external_weight=1"] if external_weight else []
    return [
        "atc",
        f"--model={onnx_file}",
        "--framework=5",
        f"--output={om_stem}",
        f"--soc_version={soc_version}",
        "--precision_mode_v2=origin",
        "--input_format=ND",
        *weight,
        "--log=error",
    ]


def _script_line(name: str, cmd: list[str]) -> str:
    args = ['--soc_version="$SOC"' if a.startswith("--soc_version=") else shlex.quote(a) for a in cmd]
    return " ".join(args) + f" 2>&1 | tee om/{name}.atc.log"


def write_script(bundle: Path, commands: dict[str, list[str]], soc: str | None = None, fp32: bool = False) -> Path:
    """atc.sh: the commands, for the SoC given as its argument, else `soc` (known at export), else the one
    `npu-smi info` names where it runs; it refuses to guess. For an `fp32` bundle it refuses unless
    ALLOW_AI_CPU=1: the 310P's Cube has no float32, so every matmul would run on the AI CPU."""
    guard = [
        'if [ "${ALLOW_AI_CPU:-0}" != 1 ]; then',
        "  echo 'atc.sh: this is an fp32 bundle: on the 310P every matmul would run on the AI CPU (its Cube has no"
        " float32). Export with --precision fp16, or run ALLOW_AI_CPU=1 ./atc.sh to compile it anyway.' >&2",
        "  exit 2",
        "fi",
    ]
    script = bundle / "atc.sh"
    lines = [
        "#!/usr/bin/env bash",
        "# Compile this bundle's graphs for Ascend with CANN's atc (CANN >= 7.0.0; source its set_env.sh first).",
        "# Usage: ./atc.sh [SOC]. " + SOC_RULE + ";",
        "# without SOC: " + (f"{soc} (given at export)" if soc else "read from npu-smi on this machine") + ".",
        "# Then re-run `pi0-export bundle` with --atc always, or copy om/ into the bundle by hand.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        *(guard if fp32 else []),
        f'SOC="${{1:-{soc or ""}}}"',
        'if [ -z "$SOC" ] && command -v npu-smi >/dev/null 2>&1; then',
        "  NAME=\"$(npu-smi info | grep -oE '\\b(310P[0-9]|310B[0-9]|910[A-Za-z0-9]*)\\b' | head -n 1 || true)\"",
        '  if [ -n "$NAME" ]; then SOC="Ascend$NAME"; fi',
        "fi",
        'if [ -z "$SOC" ]; then',
        "  echo 'atc.sh: which SoC? npu-smi is not on this machine (or names no chip). Run ./atc.sh SOC, where SOC is"
        ' "Ascend" + the Name that npu-smi info prints on the device, e.g. ./atc.sh Ascend310P3 (Atlas 300I Pro/Duo).\' >&2',
        "  exit 2",
        "fi",
        'echo "atc.sh: compiling for $SOC"',
        "mkdir -p om",
        *(_script_line(name, cmd) for name, cmd in commands.items()),
    ]
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script


def read_om_json(path: Path) -> tuple[str | None, list[dict[str, str]]]:
    """(the model's soc_version, its AI CPU ops) from `atc --mode=1` JSON: model-level attrs under "attr",
    ops under graph[*].op[*] with the engine in the `_ge_attr_op_kernel_lib_name` attr (cann-facts §2;
    an engine whose name contains "aicpu" is the AI CPU, as Huawei's own OM parsers read it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AtcError(f"atc --mode=1 wrote no readable JSON ({path}): {e}") from e

    def attrs(entry: dict) -> dict[str, str]:
        return {a.get("key"): (a.get("value") or {}).get("s") for a in entry.get("attr", []) if isinstance(a, dict)}

    soc = attrs(data).get("soc_version")
    ai_cpu = []
    for graph in data.get("graph", []):
        for op in graph.get("op", []):
            engine = attrs(op).get(ENGINE_ATTR) or ""
            if "aicpu" in engine.lower():
                ai_cpu.append({"name": op.get("name", ""), "type": op.get("type", ""), "engine": engine})
    return soc, ai_cpu


def compile_graphs(
    bundle: Path, commands: dict[str, list[str]], log: Callable[[str], None] = print
) -> dict[str, CompiledGraph]:
    """Run atc for each graph in the bundle directory (its log in om/<name>.atc.log), then
    `atc --mode=1` on the OM (om/<name>.json) to read back its SoC and which ops landed on the AI CPU."""
    if shutil.which("atc") is None:
        raise AtcError("atc is not on PATH (source CANN's set_env.sh, or use --atc auto|never)")
    (bundle / "om").mkdir(exist_ok=True)
    outputs = {}
    for name, cmd in commands.items():
        log(f"atc: compiling {name} ({shlex.join(cmd[1:3])} ...), this can take minutes")
        result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
        log_file = bundle / "om" / f"{name}.atc.log"
        log_file.write_text(result.stdout + result.stderr)
        stem = next(a.split("=", 1)[1] for a in cmd if a.startswith("--output="))
        om = bundle / (stem + ".om")
        if result.returncode != 0 or not om.is_file():
            raise AtcError(f"atc failed on {name} (exit {result.returncode}); its log: {log_file}")
        dump = bundle / (stem + ".json")
        info = subprocess.run(
            ["atc", "--mode=1", f"--om={om.relative_to(bundle)}", f"--json={dump.relative_to(bundle)}"],
            cwd=bundle,
            capture_output=True,
            text=True,
        )
        if info.returncode != 0 or not dump.is_file():
            raise AtcError(f"atc --mode=1 failed on {om.name} (exit {info.returncode}): {(info.stderr or '').strip()}")
        soc, ai_cpu = read_om_json(dump)
        asked = next(a.split("=", 1)[1] for a in cmd if a.startswith("--soc_version="))
        if soc is not None and soc != asked:
            raise AtcError(f"{om.name} reports soc_version {soc}, not the {asked} it was compiled for")
        outputs[name] = CompiledGraph(om=om, json=dump, soc_version=soc, ai_cpu_ops=ai_cpu)
    return outputs
