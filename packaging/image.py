"""`make image [ARCH=amd64|arm64]`: what goes onto the device, in dist/image-ARCH/ (run as root).

    pi0-runtime_V_ARCH.deb            the package (`make deb`)
    pi0-overlay-ARCH.tar.gz           a root-filesystem overlay for a device that already has its OS
                                      (Debian, Ubuntu, openEuler, ...): the package's files, an empty
                                      bundle slot, and a one-shot `pi0-runtime-setup.service` that does
                                      at first boot what the package's postinst does (user, store, venv,
                                      CANN environment) and enables the daemon
    debian-SUITE-ARCH-rootfs.tar.gz   a whole Debian root filesystem (debootstrap) with the package
                                      installed. For a foreign ARCH debootstrap's first stage only runs
                                      here (`--foreign`): the second stage and the package install run
                                      on the device itself, from /pi0-second-stage.sh
    manifest.json                     versions (package, commit, suite, Python, every wheel) and the
                                      sha256 and size of each file above

The image carries no driver, firmware or CANN: those come from Huawei for the exact card and kernel
(docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from deb import APPLIANCE, PACKAGE, build_deb, file_digest, host_arch, source_date_epoch, stage
from wheels import ROOT, project_version

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What the rootfs needs beyond debootstrap's minimal base: the package's dependencies, and the tools
# a person on the device reaches for first.
INCLUDE = ("python3", "python3-venv", "systemd", "systemd-sysv", "ca-certificates", "iproute2", "less")
SECOND_STAGE = """#!/bin/sh
# Finish this root filesystem on the device (or under qemu-user-static): debootstrap's second stage,
# then the pi0-runtime package. Run once, as root, chrooted into this tree or booted from it.
set -e
/debootstrap/debootstrap --second-stage
dpkg -i /var/cache/pi0/{deb}
rm -f /pi0-second-stage.sh
"""
SETUP_UNIT = """[Unit]
Description=pi0-runtime first-boot setup (user, bundle store, venv, CANN environment)
ConditionPathExists=!/opt/pi0-runtime/venv
Before=pi0-runtime.service

[Service]
Type=oneshot
ExecStart=/opt/pi0-runtime/setup configure
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""


def tar_tree(tree: Path, out: Path) -> Path:
    """A gzip tarball of `tree` with numeric owners as they are (root), paths relative to its root."""
    with tarfile.open(out, "w:gz", compresslevel=6) as tar:
        for path in sorted(tree.iterdir()):
            tar.add(path, arcname=f"./{path.name}", recursive=True)
    return out


def overlay(out: Path, arch: str, python: str, wheels: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        stage(root, wheels, python)
        shutil.copyfile(APPLIANCE / "debian" / "postinst", root / "opt" / PACKAGE / "setup")
        (root / "opt" / PACKAGE / "setup").chmod(0o755)
        units = root / "lib" / "systemd" / "system"
        (units / "pi0-runtime-setup.service").write_text(SETUP_UNIT)
        wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
        wants.mkdir(parents=True)
        for unit in ("pi0-runtime-setup.service", "pi0-runtime.service"):
            (wants / unit).symlink_to(f"/lib/systemd/system/{unit}")
        (root / "var" / "lib" / PACKAGE / "bundles").mkdir(parents=True)
        return tar_tree(root, out / f"pi0-overlay-{arch}.tar.gz")


def debootstrap(tree: Path, arch: str, suite: str = SUITE, mirror: str = MIRROR) -> bool:
    """A minimal Debian in `tree` with INCLUDE; both stages where ARCH runs here (-> True), else the first."""
    native = arch == host_arch()
    command = ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", f"--arch={arch}"]
    if not native:
        command.append("--foreign")
    subprocess.run([*command, suite, str(tree), mirror], check=True)
    return native


def rootfs(out: Path, arch: str, deb: Path, suite: str, mirror: str, workdir: Path) -> tuple[Path, bool]:
    """debootstrap, the package installed (natively) or staged for the device; -> (tarball, complete)."""
    tree = workdir / f"rootfs-{arch}"
    native = debootstrap(tree, arch, suite, mirror)
    cache = tree / "var" / "cache" / "pi0"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(deb, cache / deb.name)
    if native:
        install_in_chroot(tree, f"/var/cache/pi0/{deb.name}")
    else:
        (tree / "pi0-second-stage.sh").write_text(SECOND_STAGE.format(deb=deb.name))
        (tree / "pi0-second-stage.sh").chmod(0o755)
    return tar_tree(tree, out / f"debian-{suite}-{arch}-rootfs.tar.gz"), native


def install_in_chroot(tree: Path, deb: str) -> None:
    """`dpkg -i` inside the tree, with /proc mounted for the maintainer scripts."""
    proc = tree / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        subprocess.run(["chroot", str(tree), "dpkg", "-i", deb], check=True, env=env)
    finally:
        subprocess.run(["umount", str(proc)], check=True)


def build_image(arch: str, python: str, out: Path, suite: str, mirror: str) -> dict:
    if os.geteuid() != 0:
        raise SystemExit("make image runs debootstrap and chroot: run it as root")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        deb = build_deb(arch, python, out)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "deb")], check=True)
        wheels = tmp / "deb" / "opt" / PACKAGE / "wheels"
        overlay_tar = overlay(out, arch, python, wheels)
        rootfs_tar, complete = rootfs(out, arch, deb, suite, mirror, tmp)
        wheel_names = sorted(p.name for p in wheels.iterdir())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    manifest = {
        "package": PACKAGE,
        "version": project_version(),
        "commit": commit.strip(),
        "built_at_epoch": int(source_date_epoch()),
        "arch": arch,
        "suite": suite,
        "python": python,
        "rootfs_complete": complete,
        "wheels": wheel_names,
        "files": {
            p.name: {"sha256": file_digest(p, "sha256"), "bytes": p.stat().st_size}
            for p in (deb, overlay_tar, rootfs_tar)
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="amd64 or arm64 (default: this machine's)")
    parser.add_argument("--python", default="3.11", help="the device's Python X.Y (Debian 12: 3.11)")
    parser.add_argument("--suite", default=SUITE, help=f"Debian suite of the rootfs (default {SUITE})")
    parser.add_argument("--mirror", default=MIRROR)
    parser.add_argument("--out", type=Path, default=None, help="default dist/image-ARCH")
    args = parser.parse_args()
    arch = args.arch or host_arch()
    manifest = build_image(arch, args.python, args.out or ROOT / "dist" / f"image-{arch}", args.suite, args.mirror)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
