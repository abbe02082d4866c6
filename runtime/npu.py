"""What the machine says about its Ascend NPU and CANN (used by the exporter's atc step,
`pi0-runtime check` and `pi0-runtime cann-env`)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ApplianceError

MIN_CANN = "7.0.0"  # precision_mode_v2 and ONNX opset >= 15 are documented from CANN 7.0.0 (docs/cann-facts.md §7)


def detect_soc() -> str | None:
    """The SoC name from `npu-smi info`: "Ascend" + its Name column (310P3 -> Ascend310P3; CANN's rule for
    --soc_version, docs/cann-facts.md §6), if npu-smi is installed."""
    if shutil.which("npu-smi") is None:
        return None
    out = subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=30)
    match = re.search(r"\b(310P\d|310B\d|910\w*)\b", out.stdout)
    return f"Ascend{match.group(1)}" if match else None


def device_soc() -> tuple[str | None, str | None]:
    """(this machine's SoC, where it was read): `acl.get_soc_name()` where pyACL is importable and has it
    (documented without constraints, §6), else npu-smi; (None, None) where neither says."""
    if importlib.util.find_spec("acl") is not None:
        try:
            get_soc_name = getattr(importlib.import_module("acl"), "get_soc_name", None)
            name = get_soc_name() if get_soc_name is not None else None
        except Exception:  # pyACL that cannot say is as good as none
            name = None
        if isinstance(name, str) and name:
            return name, "acl.get_soc_name()"
    soc = detect_soc()
    return (soc, "npu-smi") if soc else (None, None)


class SocMismatchError(ApplianceError):
    """The bundle's OM files were compiled for another SoC than this device's."""


@dataclass(frozen=True)
class SocCheck:
    om: str | None  # the SoC the bundle's OM files were compiled for; None: the bundle has no OM files
    device: str | None  # this machine's; None: nothing here says (no pyACL, no npu-smi)
    source: str | None  # where `device` was read

    @property
    def matches(self) -> bool | None:
        return None if self.om is None or self.device is None else self.om == self.device

    def describe(self) -> str:
        return (
            f"the bundle's OM files are compiled for {self.om}, and this device is {self.device} "
            f"(from {self.source}): recompile for {self.device} (atc --soc_version={self.device}, or the "
            "bundle's atc.sh on this box) or install a bundle built for it"
        )


def om_soc_check(bundle: Any) -> SocCheck:
    """The bundle's OM SoC (its manifest's compiled["om"].device, when it holds OM files) and this
    device's. `bundle` is a runtime.bundle.manifest.Bundle (not imported: this module sits below it)."""
    target = bundle.manifest.compiled.get("om")
    om = (target.device or None) if target is not None and bundle.artefact("om") is not None else None
    if om is None:
        return SocCheck(None, None, None)
    device, source = device_soc()
    return SocCheck(om, device, source)


def check_om_soc(bundle: Any) -> SocCheck:
    """`om_soc_check`, refusing (SocMismatchError, naming both SoCs) a bundle whose OM files were
    compiled for another SoC than this device's. CANN documents no error code for loading such an OM
    (§6), so this is checked before anything is loaded. Unknown on either side: nothing to refuse."""
    check = om_soc_check(bundle)
    if check.matches is False:
        raise SocMismatchError(check.describe())
    return check


# --- the installed CANN version (docs/cann-facts.md §7) ------------------------------------------------

VERSION_FILES = ("ascend_toolkit_install.info", "ascend_nnrt_install.info", "ascend_nnae_install.info")
_STAGES = {"alpha": 0, "beta": 1, "rc": 2}


def parse_cann_version(text: str) -> tuple[int, ...] | None:
    """A sortable key for CANN's version strings: 7.0.0, 8.0.RC3, 8.1.RC1, 7.0.alpha003, 9.2.0-beta.2.
    A release candidate, alpha or beta sorts before the release of the same major.minor(.patch):
    8.0.RC3 < 8.0.0, 9.2.0-beta.2 < 9.2.0. None when it is not such a string."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:[.-]?([A-Za-z]+)\.?(\d*))?", text.strip())
    if match is None:
        return None
    major, minor, patch, stage, number = match.groups()
    if stage is not None and stage.lower() not in _STAGES:
        return None
    rank = 3 if stage is None else _STAGES[stage.lower()]
    return (int(major), int(minor), int(patch or 0), rank, int(number or 0))


def cann_version_files(environ: dict[str, str] | None = None) -> list[Path]:
    """Where CANN's installers write the version: <home>/<file> and <home>/<arch>-linux/<file>, for the
    homes in ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME (set by set_env.sh) and the default install roots."""
    environ = os.environ if environ is None else environ
    homes = [environ[k] for k in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME") if environ.get(k)]
    if not homes:
        homes = [
            "/usr/local/Ascend/ascend-toolkit/latest",
            "/usr/local/Ascend/nnrt/latest",
            "/usr/local/Ascend/nnae/latest",
            "/usr/local/Ascend/cann",
        ]
    arch = f"{platform.machine()}-linux"
    files = []
    for home in homes:
        for sub in ("", arch, *sorted(p.name for p in Path(home).glob("*-linux") if p.name != arch)):
            files.extend(Path(home, sub, name) for name in VERSION_FILES)
    return files


@dataclass(frozen=True)
class CannVersion:
    version: str | None  # the `version=` line's value; None: no version file found
    file: Path | None

    @property
    def supported(self) -> bool | None:
        """>= MIN_CANN; None where the version is unknown or unreadable."""
        key = None if self.version is None else parse_cann_version(self.version)
        return None if key is None else key >= parse_cann_version(MIN_CANN)


def cann_version(environ: dict[str, str] | None = None) -> CannVersion:
    """The installed CANN version, from the first `version=` line of its install info file."""
    for file in cann_version_files(environ):
        try:
            lines = file.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition("=")
            if key.strip() == "version" and value.strip():
                return CannVersion(value.strip(), file)
    return CannVersion(None, None)


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
