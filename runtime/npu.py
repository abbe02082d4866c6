"""What the machine says about its Ascend NPU and CANN (used by the exporter's atc step,
`pi0-runtime check` and `pi0-runtime cann-env`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from runtime.errors import ApplianceError


def detect_soc() -> str | None:
    """The SoC name from `npu-smi info` (its Name column, e.g. 310P1 -> Ascend310P1), if installed."""
    if shutil.which("npu-smi") is None:
        return None
    out = subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=30)
    match = re.search(r"\b(310P\d|310B\d|910\w*)\b", out.stdout)
    return f"Ascend{match.group(1)}" if match else None


# CANN's environment script, where its installers put it (toolkit on a workstation, nnrt/nnae on a device).
SET_ENV_CANDIDATES = (
    "/usr/local/Ascend/ascend-toolkit/set_env.sh",
    "/usr/local/Ascend/nnrt/set_env.sh",
    "/usr/local/Ascend/nnae/set_env.sh",
)


class CannError(ApplianceError):
    """CANN's environment could not be read."""


def find_set_env() -> Path | None:
    return next((Path(p) for p in SET_ENV_CANDIDATES if Path(p).is_file()), None)


def cann_environment(set_env: Path) -> dict[str, str]:
    """What sourcing CANN's `set_env.sh` adds or changes, from a clean environment (no shell guesses at
    service start: the result is written once, as a systemd EnvironmentFile)."""
    if not Path(set_env).is_file():
        raise CannError(f"{set_env}: no such file (CANN's set_env.sh; give --set-env)")
    clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"}
    script = '. "$1" >/dev/null 2>&1 || exit 3; env -0'
    result = subprocess.run(["bash", "-c", script, "bash", str(set_env)], env=clean, capture_output=True)
    if result.returncode != 0:
        raise CannError(f"sourcing {set_env} failed (exit {result.returncode})")
    after = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    ignored = {"PWD", "SHLVL", "_", "OLDPWD"}
    return {k: v for k, v in sorted(after.items()) if k not in ignored and clean.get(k) != v}


def environment_file(variables: dict[str, str], source: Path) -> str:
    """systemd EnvironmentFile syntax: KEY="value", backslashes and quotes escaped."""
    lines = [f"# CANN's environment, from {source} (written by `pi0-runtime cann-env`; rerun it after CANN upgrades)"]
    for key, value in variables.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"
