"""A model bundle as a Debian package, for rolling it out with apt (`repo.py`, `make repo`).

    pi0-bundle-NAME_VERSION_all.deb
        /usr/share/pi0-bundles/NAME/            the bundle's files, as exported (manifest.json and what it names)
        /usr/share/doc/pi0-bundle-NAME/         copyright, changelog

One package name per bundle name, so apt upgrades and downgrades it; `Depends: pi0-runtime`. The package
does not serve its files from /usr/share: its maintainer scripts (appliance/debian/pi0-bundle.*) put them
into the runtime's bundle store through `pi0-runtime install-bundle` (verified against the manifest,
copied, the copy verified, `current` switched atomically, the service restarted), or `pi0-runtime
rollback` when the store's `previous` is this very bundle (a downgrade); removing the package serves the
previous bundle again. docs/deploy.md, "Fleet rollout over apt", has the whole recipe.

The bundle is verified here before it is packaged (the same check as on the box), so a package never
carries a bundle that does not match its manifest. Compressed with gzip: model weights gain little from
xz, which would take minutes on a full-size VLM.

    python packaging/bundle_deb.py --bundle my-bundle --name transfer-cube --version 3 --out dist
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import tempfile
from pathlib import Path

from deb import APPLIANCE, MAINTAINER, build_package, changelog, check_version, gzip_file, source_date_epoch

from runtime.bundle.manifest import BundleError, load_bundle

PREFIX = "pi0-bundle-"
BUNDLES = Path("usr/share/pi0-bundles")  # on the box: /usr/share/pi0-bundles/NAME
NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*")  # what a Debian package name allows after the prefix
COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: {package}
Comment: A pi0 policy bundle exported by pi0-export from {source}. The model's weights keep
 the license of the checkpoint they were exported from.

Files: *
Copyright: {year} pi0 appliance developers (the packaging); the authors of the checkpoint {source} (the model)
License: other
 The license of the checkpoint the bundle was exported from; this package is for
 the team's own devices.
"""


def package_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise SystemExit(
            f"bundle name {name!r}: lower-case letters, digits and + - . only, starting with a letter or digit"
        )
    return PREFIX + name


def script(kind: str, name: str) -> str:
    return (APPLIANCE / "debian" / f"pi0-bundle.{kind}").read_text().replace("#NAME#", name)


def control(package: str, version: str, source: str, precision: str, installed_kib: int) -> str:
    return (
        f"Package: {package}\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {installed_kib}\n"
        "Depends: pi0-runtime\n"
        "Section: misc\n"
        "Priority: optional\n"
        f"Description: pi0 policy bundle {package[len(PREFIX) :]} for pi0-runtime\n"
        f" A pi0 policy exported from {source} ({precision}). Installing the package\n"
        " adds the bundle to the pi0-runtime bundle store (verified against its\n"
        " manifest, switched atomically) and serves it; removing it, or installing an\n"
        " older version, serves the previous bundle again.\n"
    )


def build_bundle_deb(bundle: Path, name: str, version: str, out: Path) -> Path:
    """`pi0-bundle-NAME_VERSION_all.deb` in `out`, from the exported bundle directory `bundle`."""
    package = package_name(name)
    file_version = check_version(version)
    try:
        loaded = load_bundle(bundle)  # every file against the manifest's sha256
    except BundleError as e:
        raise SystemExit(f"{bundle}: {e}; not packaged") from e
    links = [p for p in Path(bundle).rglob("*") if p.is_symlink()]
    if links:
        raise SystemExit(f"{bundle}: {links[0].relative_to(bundle)} is a symlink; bundles hold plain files only")
    source = " ".join(str(loaded.manifest.source).split()) or "an unknown checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        shutil.copytree(bundle, root / BUNDLES / name)
        for path in (root / BUNDLES / name).rglob("*"):
            if path.is_file():
                path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)  # atc.sh stays runnable
        doc = root / "usr" / "share" / "doc" / package
        (doc / "copyright").parent.mkdir(parents=True)
        year = datetime.datetime.fromtimestamp(int(source_date_epoch()), datetime.timezone.utc).year
        (doc / "copyright").write_text(COPYRIGHT.format(package=package, source=source, year=year))
        note = f"The bundle exported from {source} ({loaded.precision}), packaged by `make repo`."
        gzip_file(changelog(version, package, note), doc / "changelog.gz")
        deb = out / f"{package}_{file_version}_all.deb"
        scripts = {kind: script(kind, name) for kind in ("postinst", "prerm")}
        return build_package(
            root,
            lambda kib: control(package, version, source, loaded.precision, kib),
            deb,
            scripts,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="an exported bundle directory (pi0-export bundle)")
    parser.add_argument("--name", required=True, help="the bundle's name: the package is pi0-bundle-NAME")
    parser.add_argument("--version", required=True, help="the package's Debian version (e.g. 3, 2026.12.07)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(build_bundle_deb(args.bundle, args.name, args.version, args.out))


if __name__ == "__main__":
    main()
