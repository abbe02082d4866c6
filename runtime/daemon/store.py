"""The device's bundle store: versioned bundles, a `current` link the daemon serves, a `previous` link.

    /var/lib/pi0-runtime/bundles/
        20261122T051500Z-3f9a1c2b7d4e/     one directory per installed bundle (never modified)
        current -> 20261122T051500Z-3f9a1c2b7d4e
        previous -> 20261101T093000Z-88e01d5a9c10

`install` verifies the source bundle (every file against its sha256), copies it into a hidden
directory of the store, verifies the copy, renames it into place and only then switches the links:
each link is replaced with one `rename(2)`, so a reader sees the old target or the new one, never
none. A bundle that fails verification changes nothing; one the service cannot start on is taken
out again with `undo_install`. `rollback` swaps `current` and `previous`.
Bundles that are neither current nor previous can be removed with `prune`.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle.manifest import MANIFEST, BundleError, load_bundle, sha256_file
from runtime.errors import ApplianceError
from runtime.npu import check_om_soc

DEFAULT_STORE = Path("/var/lib/pi0-runtime/bundles")
CURRENT, PREVIOUS = "current", "previous"


class StoreError(ApplianceError):
    """The store cannot do what was asked; nothing was changed."""


@dataclass(frozen=True)
class Installed:
    name: str
    source: str
    precision: str
    current: bool
    previous: bool


class BundleStore:
    def __init__(self, root: Path = DEFAULT_STORE) -> None:
        self.root = Path(root)

    def _link(self, name: str) -> str | None:
        link = self.root / name
        return os.readlink(link) if link.is_symlink() else None

    def _point(self, name: str, target: str | None) -> None:
        """Make link `name` point at `target` (a directory name in the store) atomically; None removes it."""
        link = self.root / name
        if target is None:
            link.unlink(missing_ok=True)
            return
        temporary = self.root / f".{name}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, link)

    @property
    def current(self) -> str | None:
        return self._link(CURRENT)

    @property
    def previous(self) -> str | None:
        return self._link(PREVIOUS)

    def install(self, source: Path) -> str:
        """Verify, copy, verify the copy, switch `current` to it (the old one becomes `previous`)."""
        check_om_soc(load_bundle(source))  # BundleError / SocMismatchError name what is wrong; nothing is touched yet
        if not self.root.is_dir():
            raise StoreError(f"bundle store {self.root} does not exist (the package creates it: systemd-tmpfiles)")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"{stamp}-{sha256_file(Path(source) / MANIFEST)[:12]}"
        if (self.root / name).exists():
            raise StoreError(f"{name} is already in the store")
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            copy = staging / "bundle"
            shutil.copytree(source, copy, symlinks=True)
            load_bundle(copy)  # what landed on this disk is what was exported
            copy.chmod(0o755)
            os.rename(copy, self.root / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rmdir()
        old = self.current
        if old is not None and old != name:
            self._point(PREVIOUS, old)
        self._point(CURRENT, name)
        return name

    def undo_install(self, name: str, current: str | None, previous: str | None) -> None:
        """Put the links back as they were before `install` of `name`, and remove it (it did not serve)."""
        self._point(CURRENT, current)
        self._point(PREVIOUS, previous)
        shutil.rmtree(self.root / name, ignore_errors=True)

    def rollback(self) -> str:
        """Serve `previous` again; the bundle it replaces becomes `previous`."""
        current, previous = self.current, self.previous
        if previous is None or not (self.root / previous).is_dir():
            raise StoreError(f"nothing to roll back to: no `{PREVIOUS}` bundle in {self.root}")
        try:
            load_bundle(self.root / previous)
        except BundleError as e:
            raise StoreError(f"the previous bundle {previous} no longer verifies: {e}") from e
        self._point(CURRENT, previous)
        self._point(PREVIOUS, current)
        return previous

    def installed(self) -> list[Installed]:
        """Every bundle in the store, oldest first."""
        result = []
        directories = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "."]
        for path in sorted(directories, key=lambda p: (p.stat().st_mtime_ns, p.name)):
            try:
                bundle = load_bundle(path, verify=False)
                source, precision = bundle.manifest.source, bundle.precision
            except BundleError as e:
                source, precision = f"unreadable: {e}", "?"
            result.append(
                Installed(path.name, source, precision, path.name == self.current, path.name == self.previous)
            )
        return result

    def prune(self) -> list[str]:
        """Remove every bundle that is neither current nor previous; returns their names."""
        keep = {self.current, self.previous}
        removed = [b.name for b in self.installed() if b.name not in keep]
        for name in removed:
            shutil.rmtree(self.root / name)
        return removed
