"""What the machine says about its Ascend NPU (used by the exporter's atc step and `pi0-runtime check`)."""

from __future__ import annotations

import re
import shutil
import subprocess


def detect_soc() -> str | None:
    """The SoC name from `npu-smi info` (its Name column, e.g. 310P1 -> Ascend310P1), if installed."""
    if shutil.which("npu-smi") is None:
        return None
    out = subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=30)
    match = re.search(r"\b(310P\d|310B\d|910\w*)\b", out.stdout)
    return f"Ascend{match.group(1)}" if match else None
