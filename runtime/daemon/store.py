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

Power loss in the middle of a change (docs/deploy.md, "Power loss during an update"). The order on
disk is what a reader after a crash sees, so every step is flushed before the next one is made:
- the copy: every file and every directory of it is fsynced (`fsync_tree`) before it is renamed into
  place, and the store directory is fsynced after that rename, so a name in the store is never a
  bundle whose data is still only in the page cache;
- each link switch (`previous` first, then `current`) is followed by an fsync of the store directory,
  so `current` can never be on disk before the bundle it names, nor `previous` lost after `current`
  moved on;
- a bundle taken out (`undo_install`, `prune`) is first renamed to a hidden `.removing-*` name (and the
  directory fsynced), so a half-deleted bundle never sits under a visible name.
What an interrupted change leaves behind is hidden (`.incoming-*` copies, `.removing-*` bundles,
`.current.<pid>` / `.previous.<pid>` temporary links): `installed()` ignores it, nothing serves it, and
the next change of the store removes it (under the store's lock: one change at a time).
A bundle renamed into place whose links were never switched is an ordinary older bundle (`prune`
removes it; installing the same bundle again replaces it).

At start, `load_served_bundle` is how the daemon (and `pi0-runtime check`) picks what to serve: the
store's `current` when it verifies, else `previous`, said in one warning line and recorded in a
`ServedBundle` (`fell_back_from`, `reason`) for the service to expose.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle.manifest import MANIFEST, Bundle, BundleError, load_bundle, sha256_file
from runtime.errors import ApplianceError, describe
from runtime.npu import check_om_soc

log = logging.getLogger("pi0-runtime")

DEFAULT_STORE = Path("/var/lib/pi0-runtime/bundles")
CURRENT, PREVIOUS = "current", "previous"
INCOMING, REMOVING = ".incoming-", ".removing-"  # what an interrupted change can leave behind


class StoreError(ApplianceError):
    """The store cannot do what was asked; nothing was changed."""


@dataclass(frozen=True)
class Installed:
    name: str
    source: str
    precision: str
    current: bool
    previous: bool


@dataclass(frozen=True)
class ServedBundle:
    """Which bundle the daemon serves, and whether it fell back to it.

    `name`: the bundle directory's name (in the store: the link's target); `path`: the directory loaded.
    `fell_back_from`: the store's `current` bundle (its target's name, or `current` when the link is
    missing) that failed verification, when `previous` is served instead; `reason`: why it failed, in
    words. Both None when what was asked for is what is served. `pi0-runtime serve` logs it and labels the
    metrics with it (`pi0_bundle_info{fell_back_from}`); `pi0-runtime check` prints it (`served`)."""

    name: str
    path: Path
    fell_back_from: str | None = None
    reason: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.fell_back_from is not None

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "path": str(self.path), "fell_back_from": self.fell_back_from, "reason": self.reason}


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every regular file under `root`, then every directory, deepest first and `root` last.
    A symbolic link is not opened: its entry is flushed with its directory."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


class BundleStore:
    def __init__(self, root: Path = DEFAULT_STORE) -> None:
        self.root = Path(root)

    def _link(self, name: str) -> str | None:
        link = self.root / name
        return os.readlink(link) if link.is_symlink() else None

    def _point(self, name: str, target: str | None) -> None:
        """Make link `name` point at `target` (a directory name in the store) atomically, and flush the
        store directory so the switch is on disk before whatever comes next; None removes the link."""
        link = self.root / name
        if target is None:
            link.unlink(missing_ok=True)
        else:
            temporary = self.root / f".{name}.{os.getpid()}"
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(target)
            os.replace(temporary, link)
        fsync_dir(self.root)

    def _remove(self, name: str) -> None:
        """Take bundle `name` out of the store: renamed to a hidden name first (flushed), then deleted,
        so that a crash part-way leaves no half-deleted bundle under a visible name."""
        path = self.root / name
        if not path.is_dir() or path.is_symlink():
            return
        doomed = Path(tempfile.mkdtemp(prefix=REMOVING, dir=self.root))
        os.rename(path, doomed / name)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        """Remove what an interrupted change left behind: staging copies, bundles being removed,
        temporary links. Called with the store's lock held, so none of it belongs to a change under way."""
        removed = False
        for entry in self.root.iterdir():
            if entry.is_symlink() and entry.name.startswith((f".{CURRENT}.", f".{PREVIOUS}.")):
                entry.unlink()
                removed = True
            elif entry.is_dir() and not entry.is_symlink() and entry.name.startswith((INCOMING, REMOVING)):
                log.info("removing %s, left by an interrupted change of the store", entry.name)
                shutil.rmtree(entry, ignore_errors=True)
                removed = True
        if removed:
            fsync_dir(self.root)

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """One change of the store at a time (an exclusive lock on its directory), leftovers of an
        interrupted one removed first."""
        if not self.root.is_dir():
            raise StoreError(f"bundle store {self.root} does not exist (the package creates it: systemd-tmpfiles)")
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                message = f"another install-bundle or rollback is changing {self.root}; try again when it is done"
                raise StoreError(message) from None
            self._clean_leftovers()
            yield
        finally:
            os.close(fd)  # releases the lock

    @property
    def current(self) -> str | None:
        return self._link(CURRENT)

    @property
    def previous(self) -> str | None:
        return self._link(PREVIOUS)

    def install(self, source: Path) -> str:
        """Verify, copy, verify the copy, flush it, rename it into place, then switch `current` to it
        (the old one becomes `previous`)."""
        check_om_soc(load_bundle(source))  # BundleError / SocMismatchError name what is wrong; nothing is touched yet
        with self._changing():
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            name = f"{stamp}-{sha256_file(Path(source) / MANIFEST)[:12]}"
            if name in (self.current, self.previous):
                raise StoreError(f"{name} is already in the store")
            self._remove(name)  # the same bundle, renamed into place by an install interrupted before its links
            staging = Path(tempfile.mkdtemp(prefix=INCOMING, dir=self.root))
            try:
                copy = staging / "bundle"
                shutil.copytree(source, copy, symlinks=True)
                load_bundle(copy)  # what landed on this disk is what was exported
                copy.chmod(0o755)
                fsync_tree(copy)  # its data and names on disk before its name appears in the store
                os.rename(copy, self.root / name)
                fsync_dir(self.root)
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
        with self._changing():
            self._point(CURRENT, current)
            self._point(PREVIOUS, previous)
            if name not in (current, previous):
                self._remove(name)

    def rollback(self) -> str:
        """Serve `previous` again; the bundle it replaces becomes `previous`."""
        with self._changing():
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

    def holding(self, source: Path) -> str | None:
        """`current` or `previous` when that link names a bundle with the same manifest as `source` (the
        manifest holds every file's sha256: the same manifest, the same files once verified), else None."""
        try:
            wanted = (Path(source) / MANIFEST).read_bytes()
        except OSError:
            return None
        for link in (CURRENT, PREVIOUS):
            try:
                if self._link(link) is not None and (self.root / link / MANIFEST).read_bytes() == wanted:
                    return link
            except OSError:
                continue
        return None

    def verified(self, link: str) -> tuple[Bundle, ServedBundle]:
        """The bundle behind `link` (`current`, `previous`), verified and loaded from the directory it names
        (resolved once: a link switched meanwhile cannot mix two bundles). BundleError / OSError say why not."""
        target = self._link(link)
        if target is None:
            missing = not (self.root / link).exists()
            raise BundleError(f"there is no `{link}` link" if missing else f"`{link}` is not a link")
        directory = self.root / target
        if not directory.is_dir():
            raise BundleError(f"`{link}` points at {target}, which is not in the store")
        return load_bundle(directory), ServedBundle(target, directory)

    def installed(self) -> list[Installed]:
        """Every bundle in the store, oldest first (hidden entries, what an interrupted change left, are not)."""
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
        with self._changing():
            keep = {self.current, self.previous}
            removed = [b.name for b in self.installed() if b.name not in keep]
            for name in removed:
                self._remove(name)
        return removed


def load_served_bundle(path: str | Path) -> tuple[Bundle, ServedBundle]:
    """The bundle to serve for `path`, verified, and the record of what is served.

    `path` is a bundle directory, or a store's `current` link (the unit's config: bundles/current). For
    the link, a `current` that does not verify (a file missing or altered, its directory gone, the link
    dangling or missing: a power loss, a failing disk, a hand) is not served: `previous` is, when it
    verifies, with one warning line naming both and the reason, and `ServedBundle.fell_back_from` /
    `reason` set. Neither verifying is one StoreError naming both reasons.

    The links are left as they are, on purpose: the daemon runs with the store read-only
    (`ReadOnlyPaths=` in the unit) and could not switch them; rewriting them would also hide the failure
    and change what the operator's `pi0-runtime bundles` shows behind their back. What is served, and why,
    is logged at every start, in the metrics (`pi0_bundle_info{fell_back_from}`) and in `pi0-runtime check`;
    `pi0-runtime rollback` (or installing a good bundle) is the operator's decision."""
    path = Path(path)
    if path.name != CURRENT or (path.is_dir() and not path.is_symlink()):
        bundle = load_bundle(path)
        return bundle, ServedBundle(path.name, path)
    store = BundleStore(path.parent)
    try:
        return store.verified(CURRENT)
    except (BundleError, OSError) as e:
        failed, reason = store.current or CURRENT, describe(e)
    try:
        if store.previous is not None and store.previous == store.current:
            raise BundleError("it is the same bundle as `current`")
        bundle, served = store.verified(PREVIOUS)
    except (BundleError, OSError) as e:
        raise StoreError(
            f"no bundle in {store.root} verifies: current {failed}: {reason}; previous {store.previous or '(none)'}: "
            f"{describe(e)}"
        ) from e
    log.warning(
        "current bundle %s does not verify (%s): serving the previous bundle %s instead; the links are unchanged "
        "(`pi0-runtime rollback` makes it current, or install a good bundle)",
        failed,
        reason,
        served.name,
    )
    return bundle, ServedBundle(served.name, served.path, fell_back_from=failed, reason=reason)
