"""`make repo`: a signed apt repository of the runtime and bundle packages, to roll them out to a fleet.

    dist/repo/pool/main/p/PACKAGE/*.deb                        every version published, kept: a box can
                                                               go back to any of them
    dist/repo/dists/SUITE/main/binary-{amd64,arm64}/Packages{,.gz}
    dist/repo/dists/SUITE/{Release,InRelease,Release.gpg}      the indexes' sha256, signed
    dist/repo/pi0-fleet.gpg                                    the signing key's public half: on a box,
                                                               /usr/share/keyrings/pi0-fleet.gpg (`signed-by=`)

Debian's own tools make it: apt-ftparchive (apt-utils) writes the indexes and the Release file, gpg signs
it. Publishing is copying dist/repo to a web server (pool/ before dists/, so that no index ever names a
file not there yet), or onto the boxes (a `file:` source).

What goes in: `--runtime` builds pi0-runtime (deb.py) for `--arch`/`--python` as `--runtime-version`
(default the project's); `--bundle NAME=DIR:VERSION` packages an exported bundle as
pi0-bundle-NAME_VERSION_all.deb (bundle_deb.py); `--deb FILE` adds packages built elsewhere. Run it again
to add more: what is in the pool stays, a package at a version already published is not built again (a
version is published once; give a new one for changed files), and the indexes are made and signed anew.

The key: `--key KEYID` (`make repo REPO_KEY=...`), a key whose secret half is in your gpg keyring.
Without one, a THROWAWAY key is made in a temporary GNUPGHOME, used for this run and destroyed, and that
is said loudly: such a repository is for tests. A box trusts the key it was given, and refuses a
repository signed by another.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bundle_deb import build_bundle_deb, package_name
from deb import PACKAGE, PLATFORMS, build_deb, check_version, host_arch
from wheels import ROOT, project_version

SUITE = "bookworm"  # Debian 12's Python 3.11: the runtime package depends on exactly one Python
COMPONENT = "main"
KEYRING = "pi0-fleet.gpg"
THROWAWAY_UID = "pi0 fleet repository THROWAWAY TEST KEY <pi0-fleet-test@invalid>"


def pool_file(out: Path, package: str, file_version: str, arch: str) -> Path:
    return out / "pool" / COMPONENT / package[0] / package / f"{package}_{file_version}_{arch}.deb"


def fields(deb: Path) -> dict[str, str]:
    names = ("Package", "Version", "Architecture")
    result = subprocess.run(["dpkg-deb", "--field", str(deb), *names], capture_output=True, text=True, check=True)
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def publish(out: Path, deb: Path) -> Path:
    """Copy `deb` into the pool; the same file there already is fine, another one under its name is refused."""
    f = fields(deb)
    dest = pool_file(out, f["Package"], check_version(f["Version"]), f["Architecture"])
    if dest.exists():
        if subprocess.run(["cmp", "-s", str(deb), str(dest)]).returncode != 0:
            raise SystemExit(
                f"{f['Package']} {f['Version']} ({f['Architecture']}) is published already, with other contents "
                f"({dest}): a version is published once; give the new build a new version"
            )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(deb, temporary)
    temporary.chmod(0o644)
    os.replace(temporary, dest)
    print(f"published {f['Package']} {f['Version']} ({f['Architecture']})")
    return dest


def already(out: Path, package: str, version: str, arch: str) -> bool:
    if pool_file(out, package, check_version(version), arch).exists():
        print(f"{package} {version} ({arch}) is published already: not built again (a new build needs a new version)")
        return True
    return False


def write_indexes(out: Path, suite: str) -> Path:
    """Packages (and .gz) for every architecture, then the Release file over them; -> Release."""
    dists = out / "dists" / suite
    (out / "pool" / COMPONENT).mkdir(parents=True, exist_ok=True)
    for name in ("Release", "InRelease", "Release.gpg"):
        (dists / name).unlink(missing_ok=True)
    for arch in sorted(PLATFORMS):
        binary = dists / COMPONENT / f"binary-{arch}"
        binary.mkdir(parents=True, exist_ok=True)
        packages = subprocess.run(
            ["apt-ftparchive", "--arch", arch, "packages", f"pool/{COMPONENT}"],
            cwd=out,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (binary / "Packages").write_text(packages)
        with open(binary / "Packages.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(packages.encode())
    options = {
        "Origin": "pi0-appliance",
        "Label": "pi0 fleet",
        "Suite": suite,
        "Codename": suite,
        "Architectures": " ".join(sorted(PLATFORMS)),
        "Components": COMPONENT,
        "Description": "pi0-runtime and pi0 policy bundles",
    }
    command = ["apt-ftparchive"]
    for key, value in options.items():
        command += ["-o", f"APT::FTPArchive::Release::{key}={value}"]
    release = subprocess.run(
        [*command, "release", str(dists.relative_to(out))], cwd=out, capture_output=True, text=True, check=True
    ).stdout
    (dists / "Release").write_text(release)
    return dists / "Release"


def gpg(env: dict[str, str], *args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--batch", "--quiet", *args], env=env, check=check, **kwargs)


@contextmanager
def throwaway_key() -> Iterator[tuple[dict[str, str], str]]:
    """A new signing key without a passphrase in a temporary GNUPGHOME; -> (gpg's environment, fingerprint).
    The home, secret key included, is destroyed afterwards (its agent stopped first)."""
    home = tempfile.mkdtemp(prefix="pi0-repo-gnupg-")  # short: gpg-agent's socket lives there
    env = {**os.environ, "GNUPGHOME": home}
    try:
        gpg(env, "--passphrase", "", "--quick-generate-key", THROWAWAY_UID, "ed25519", "sign", "1m")
        listing = gpg(env, "--with-colons", "--list-secret-keys", capture_output=True, text=True).stdout
        fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        yield env, fingerprint
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)


def sign(release: Path, env: dict[str, str], key: str, throwaway: bool) -> None:
    """InRelease (clear-signed) and Release.gpg (detached) beside Release."""
    unattended = ["--pinentry-mode", "loopback", "--passphrase", ""] if throwaway else []
    common = ["--yes", *unattended, "--local-user", key, "--digest-algo", "SHA512", "--armor"]
    gpg(env, *common, "--clearsign", "--output", str(release.with_name("InRelease")), str(release))
    gpg(env, *common, "--detach-sign", "--output", str(release.with_name("Release.gpg")), str(release))


def export_key(env: dict[str, str], key: str, out: Path) -> Path:
    """The public key as a binary keyring for `signed-by=`; checked against the new InRelease with gpgv."""
    keyring = out / KEYRING
    keyring.write_bytes(gpg(env, "--export", key, capture_output=True).stdout)
    keyring.chmod(0o644)
    return keyring


def check_signature(keyring: Path, release: Path) -> None:
    result = subprocess.run(
        ["gpgv", "--keyring", str(keyring), str(release.with_name("InRelease"))], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"the new InRelease does not verify with {keyring}: {result.stderr.strip()}")


def loud(lines: list[str]) -> None:
    bar = "*" * 100
    print("\n".join([bar, *(f"* {line}" for line in lines), bar]), file=sys.stderr)


def parse_bundle(spec: str) -> tuple[str, Path, str]:
    name, separator, rest = spec.partition("=")
    directory, colon, version = rest.rpartition(":")
    if not (separator and colon and name and directory and version):
        raise SystemExit(f"--bundle {spec!r}: give NAME=DIR:VERSION, e.g. transfer-cube=build/my-bundle:3")
    return name, Path(directory), version


def build_repo(args: argparse.Namespace) -> Path:
    out: Path = args.out
    if args.key and gpg(dict(os.environ), "--list-secret-keys", args.key, check=False, capture_output=True).returncode:
        raise SystemExit(f"REPO_KEY={args.key}: no such secret key in your gpg keyring (gpg --list-secret-keys)")
    out.mkdir(parents=True, exist_ok=True)
    debs: list[Path] = list(args.deb)
    with tempfile.TemporaryDirectory() as tmp:
        if args.runtime:
            arch, version = args.arch or host_arch(), args.runtime_version or project_version()
            if not already(out, PACKAGE, version, arch):
                debs.append(build_deb(arch, args.python, Path(tmp) / "runtime", version))
        for spec in args.bundle:
            name, directory, version = parse_bundle(spec)
            if not already(out, package_name(name), version, "all"):
                debs.append(build_bundle_deb(directory, name, version, Path(tmp) / "bundles"))
        for deb in debs:
            publish(out, deb)
    release = write_indexes(out, args.suite)
    if args.key:
        env = dict(os.environ)
        sign(release, env, args.key, throwaway=False)
        keyring = export_key(env, args.key, out)
        fingerprint = args.key
    else:
        with throwaway_key() as (env, fingerprint):
            sign(release, env, fingerprint, throwaway=True)
            keyring = export_key(env, fingerprint, out)
    check_signature(keyring, release)
    packages = (out / "dists" / args.suite / COMPONENT / f"binary-{args.arch or host_arch()}" / "Packages").read_text()
    listed = [
        " ".join(line.split(": ", 1)[1] for line in stanza.splitlines() if line.startswith(("Package:", "Version:")))
        for stanza in packages.strip().split("\n\n")
        if stanza
    ]
    print(f"{out}: suite {args.suite}, signed by {fingerprint}; {len(listed)} packages for {args.arch or host_arch()}:")
    print("".join(f"  {line}\n" for line in sorted(listed)), end="")
    print(f"on a box: the keyring {keyring.name} as /usr/share/keyrings/{KEYRING}, and")
    print(f"  deb [signed-by=/usr/share/keyrings/{KEYRING}] https://YOUR-SERVER/pi0-repo {args.suite} {COMPONENT}")
    if not args.key:
        loud(
            [
                f"NOTE: no REPO_KEY: {out} is signed with a THROWAWAY key, made for this run and destroyed",
                f"({fingerprint}). It is for testing only. A box trusts the key it was given: the next",
                "`make repo` signs with another throwaway key, and boxes holding this one refuse it.",
                "For a fleet: make repo REPO_KEY=<the id of your signing key> (docs/deploy.md).",
            ]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "repo")
    parser.add_argument("--suite", default=SUITE, help=f"the distribution the boxes name (default {SUITE})")
    parser.add_argument(
        "--key", help="the signing key: a gpg key id with its secret key in your keyring (default: a throwaway key)"
    )
    parser.add_argument("--runtime", action="store_true", help="build and add pi0-runtime (deb.py)")
    parser.add_argument("--arch", default=None, help="the runtime's architecture (default: this machine's)")
    parser.add_argument("--python", default="3.11", help="the device's Python X.Y (default 3.11, Debian 12's)")
    parser.add_argument("--runtime-version", help="pi0-runtime's Debian version (default: the project's)")
    parser.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="NAME=DIR:VERSION",
        help="package the exported bundle DIR as pi0-bundle-NAME at VERSION and add it (repeatable)",
    )
    parser.add_argument("--deb", action="append", default=[], type=Path, help="add a built .deb (repeatable)")
    args = parser.parse_args()
    build_repo(args)


if __name__ == "__main__":
    main()
