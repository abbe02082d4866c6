"""`make deb [ARCH=amd64|arm64]`: the Debian package that puts the daemon on the device.

    /opt/pi0-runtime/wheels/                 the runtime wheel and its dependencies, for ARCH and Python X.Y
    /opt/pi0-runtime/venv/                   made by postinst from those wheels (no network on the device)
    /usr/bin/pi0-runtime                     runs the venv's pi0-runtime
    /lib/systemd/system/pi0-runtime.service  the hardened unit (appliance/systemd/)
    /etc/pi0-runtime/runtime.toml            the default config (a conffile: local edits survive upgrades)
    /usr/lib/sysusers.d/pi0-runtime.conf     the system user, in the Ascend driver's group
    /usr/lib/tmpfiles.d/pi0-runtime.conf     the bundle store /var/lib/pi0-runtime/bundles

The venv is created on the device because a virtual environment belongs to the interpreter that made
it: the package carries wheels for the device's architecture and Python (`--python 3.11`, Debian 12's;
Ubuntu 22.04 has 3.10) and depends on exactly that Python, so building for arm64 on an x86_64
workstation needs no emulation. Maintainer scripts: `appliance/debian/`.

`--version V` gives the Debian package another version than the project's (the wheels keep theirs), e.g.
`0.1.0+fleet2` to roll a rebuild out through the fleet repository (`repo.py`). `build_package` is the
helper every package here is made with (`bundle_deb.py` too): DEBIAN/ for a staged tree, then dpkg-deb.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from wheels import ROOT, build_wheels, project_version

APPLIANCE = ROOT / "appliance"
PACKAGE = "pi0-runtime"
MAINTAINER = "pi0 appliance developers <pi0-appliance@example.org>"
PLATFORMS = {  # manylinux tags the dependency wheels may carry, by Debian architecture
    "amd64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "arm64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
}


def source_date_epoch() -> str:
    """File dates in the package: the checkout's last commit (reproducible), else now."""
    result = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"], capture_output=True, text=True)
    return result.stdout.strip() or str(int(datetime.datetime.now().timestamp()))


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def download_wheels(runtime_wheel: Path, arch: str, python: str, dest: Path) -> None:
    """The runtime wheel and everything it needs, as binary wheels for the device."""
    tag = python.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(dest)]
    command += ["--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}"]
    for platform in PLATFORMS[arch]:
        command += ["--platform", platform]
    command += ["--find-links", str(runtime_wheel.parent), f"{PACKAGE}=={project_version()}"]
    subprocess.run(command, check=True)


def install_file(source: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    dest.chmod(mode)


def gzip_file(text: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(text.encode())


def changelog(
    version: str, package: str = PACKAGE, note: str = "Built from the pi0-appliance checkout by `make deb`."
) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")
    return f"{package} ({version}) unstable; urgency=medium\n\n  * {note}\n\n -- {MAINTAINER}  {date}\n"


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """The hex digest of a file read in 1 MiB blocks (md5 for md5sums, sha256 for the image's manifest)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_version(version: str) -> str:
    """A Debian version dpkg accepts (an error naming it otherwise); -> the version in file names (no epoch)."""
    result = subprocess.run(["dpkg", "--validate-version", version], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"version {version!r}: {result.stderr.strip() or 'not a Debian version'}")
    return version.split(":", 1)[-1]


def build_package(
    root: Path,
    control: Callable[[int], str],
    deb: Path,
    scripts: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    compression: str = "gzip",
) -> Path:
    """Make `deb` from the staged tree `root`: every directory 0755; DEBIAN/ with the control file
    (`control(installed_kib)`), the maintainer scripts (name -> text, 0755), other control files such as
    conffiles or triggers (`metadata`: name -> text, 0644) and md5sums; then dpkg-deb, owned by root, file
    dates the checkout's last commit. gzip by default: what the packages carry (wheels, ONNX weights) is
    compressed already or does not compress, and xz took ~45 s more for 0.04 % less on the runtime's."""
    for directory in [root, *root.rglob("*")]:
        if directory.is_dir():
            directory.chmod(0o755)
    debian = root / "DEBIAN"
    debian.mkdir(mode=0o755)
    installed_kib = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) // 1024 + 1
    files = {"control": control(installed_kib), **(metadata or {})}
    files["md5sums"] = "".join(
        f"{file_digest(f)}  {f.relative_to(root)}\n"
        for f in sorted(root.rglob("*"))
        if f.is_file() and not f.is_relative_to(debian)
    )
    for name, text in files.items():
        (debian / name).write_text(text)
        (debian / name).chmod(0o644)
    for name, text in (scripts or {}).items():
        (debian / name).write_text(text)
        (debian / name).chmod(0o755)
    env = {**os.environ, "SOURCE_DATE_EPOCH": source_date_epoch()}
    command = ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(deb)]
    subprocess.run(command, check=True, env=env)
    return deb


def control(version: str, arch: str, python: str, installed_kib: int) -> str:
    major, minor = (int(x) for x in python.split("."))
    return (
        f"Package: {PACKAGE}\n"
        f"Version: {version}\n"
        f"Architecture: {arch}\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: python3 (>= {major}.{minor}), python3 (<< {major}.{minor + 1}), python3-venv, systemd\n"
        "Section: misc\n"
        "Priority: optional\n"
        "Homepage: https://github.com/Physical-Intelligence/openpi\n"
        "Description: pi0 robot policy server for Huawei Ascend 310P\n"
        " Serves an exported pi0 vision-language-action model bundle to robot\n"
        " controllers over ZeroMQ, on the Ascend NPU through pyACL (from CANN) or\n"
        " on the CPU through onnxruntime, as a hardened systemd service. Bundles are\n"
        " installed with `pi0-runtime install-bundle`, which keeps the previous one\n"
        " for `pi0-runtime rollback`.\n"
    )


def stage(root: Path, wheels: Path, python: str, version: str | None = None) -> None:
    opt = root / "opt" / PACKAGE
    shutil.copytree(wheels, opt / "wheels")
    for wheel in (opt / "wheels").iterdir():
        wheel.chmod(0o644)
    install_file(APPLIANCE / "bin" / "pi0-runtime", root / "usr" / "bin" / "pi0-runtime", 0o755)
    install_file(
        APPLIANCE / "systemd" / "pi0-runtime.service", root / "lib" / "systemd" / "system" / "pi0-runtime.service"
    )
    install_file(APPLIANCE / "config" / "runtime.toml", root / "etc" / PACKAGE / "runtime.toml")
    install_file(
        APPLIANCE / "sysusers.d" / "pi0-runtime.conf", root / "usr" / "lib" / "sysusers.d" / "pi0-runtime.conf"
    )
    install_file(
        APPLIANCE / "tmpfiles.d" / "pi0-runtime.conf", root / "usr" / "lib" / "tmpfiles.d" / "pi0-runtime.conf"
    )
    doc = root / "usr" / "share" / "doc" / PACKAGE
    install_file(APPLIANCE / "debian" / "copyright", doc / "copyright")
    install_file(ROOT / "docs" / "deploy.md", doc / "deploy.md")
    gzip_file(changelog(version or project_version()), doc / "changelog.gz")
    gzip_file(
        (APPLIANCE / "debian" / "pi0-runtime.1").read_text(),
        root / "usr" / "share" / "man" / "man1" / "pi0-runtime.1.gz",
    )
    overrides = root / "usr" / "share" / "lintian" / "overrides" / PACKAGE
    install_file(APPLIANCE / "debian" / "lintian-overrides", overrides)


def build_deb(arch: str, python: str, out: Path, version: str | None = None) -> Path:
    """The package for `arch` and the device's `python`, as `version` (default: the project's)."""
    if arch not in PLATFORMS:
        raise SystemExit(f"ARCH={arch}: choose from {sorted(PLATFORMS)}")
    version = version or project_version()
    check_version(version)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runtime_wheel = build_wheels(tmp / "dist")["pi0-runtime"]
        download_wheels(runtime_wheel, arch, python, tmp / "wheels")
        root = tmp / "root"
        stage(root, tmp / "wheels", python, version)
        scripts = {name: (APPLIANCE / "debian" / name).read_text() for name in ("postinst", "prerm", "postrm")}
        metadata = {
            "conffiles": f"/etc/{PACKAGE}/runtime.toml\n",
            "triggers": (APPLIANCE / "debian" / "triggers").read_text(),
        }
        deb = out / f"{PACKAGE}_{check_version(version)}_{arch}.deb"
        return build_package(root, lambda kib: control(version, arch, python, kib), deb, scripts, metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="amd64 or arm64 (default: this machine's)")
    parser.add_argument("--python", default="3.11", help="the device's Python X.Y (default 3.11, Debian 12's)")
    parser.add_argument("--version", help="the package's Debian version (default: the project's, from pyproject.toml)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    print(build_deb(args.arch or host_arch(), args.python, args.out, args.version))


if __name__ == "__main__":
    main()
