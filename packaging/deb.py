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


def changelog(version: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")
    return (
        f"{PACKAGE} ({version}) unstable; urgency=medium\n\n"
        "  * Built from the pi0-appliance checkout by `make deb`.\n\n"
        f" -- {MAINTAINER}  {date}\n"
    )


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


def stage(root: Path, wheels: Path, python: str) -> None:
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
    gzip_file(changelog(project_version()), doc / "changelog.gz")
    gzip_file(
        (APPLIANCE / "debian" / "pi0-runtime.1").read_text(),
        root / "usr" / "share" / "man" / "man1" / "pi0-runtime.1.gz",
    )
    overrides = root / "usr" / "share" / "lintian" / "overrides" / PACKAGE
    install_file(APPLIANCE / "debian" / "lintian-overrides", overrides)


def build_deb(arch: str, python: str, out: Path) -> Path:
    if arch not in PLATFORMS:
        raise SystemExit(f"ARCH={arch}: choose from {sorted(PLATFORMS)}")
    out.mkdir(parents=True, exist_ok=True)
    version = project_version()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runtime_wheel = build_wheels(tmp / "dist")["pi0-runtime"]
        download_wheels(runtime_wheel, arch, python, tmp / "wheels")
        root = tmp / "root"
        stage(root, tmp / "wheels", python)
        for directory in [root, *root.rglob("*")]:
            if directory.is_dir():
                directory.chmod(0o755)
        debian = root / "DEBIAN"
        debian.mkdir(mode=0o755)
        installed_kib = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) // 1024 + 1
        (debian / "control").write_text(control(version, arch, python, installed_kib))
        (debian / "conffiles").write_text(f"/etc/{PACKAGE}/runtime.toml\n")
        for script in ("postinst", "prerm", "postrm"):
            install_file(APPLIANCE / "debian" / script, debian / script, 0o755)
        sums = [
            f"{hashlib.md5(f.read_bytes()).hexdigest()}  {f.relative_to(root)}"
            for f in sorted(root.rglob("*"))
            if f.is_file() and not f.is_relative_to(debian)
        ]
        (debian / "md5sums").write_text("\n".join(sums) + "\n")
        for name in ("control", "conffiles", "md5sums"):
            (debian / name).chmod(0o644)
        deb = out / f"{PACKAGE}_{version}_{arch}.deb"
        env = {**os.environ, "SOURCE_DATE_EPOCH": source_date_epoch()}
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], check=True, env=env)
    return deb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="amd64 or arm64 (default: this machine's)")
    parser.add_argument("--python", default="3.11", help="the device's Python X.Y (default 3.11, Debian 12's)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    print(build_deb(args.arch or host_arch(), args.python, args.out))


if __name__ == "__main__":
    main()
