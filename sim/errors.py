"""`pi0-sim`'s errors: every failure a user can act on (a missing or wrong path, a bad setting, a policy
for another robot) is a `SimError`, and so a `runtime.errors.ApplianceError`: `pi0-sim` prints it as one
line and exits 2. The checks of the paths the commands take are here, so that each names its flag and
path the same way, before anything slow starts.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ApplianceError


class SimError(ApplianceError):
    """The simulation cannot run as asked; the message says what to change."""


def existing_directory(path: Path, flag: str, holding: str | None = None, what: str = "") -> Path:
    """`path`, if it is a directory (holding the file `holding`, when given); else a SimError naming
    `flag`, the path and, in `what`, what was expected there."""
    expected = f" ({what})" if what else ""
    if not path.is_dir():
        raise SimError(f"{flag} {path}: no such directory{expected}")
    if holding is not None and not (path / holding).is_file():
        raise SimError(f"{flag} {path}: no {holding} in it{expected}")
    return path


def existing_file(path: Path, flag: str, what: str = "") -> Path:
    """`path`, if it is a file; else a SimError naming `flag` and the path."""
    if not path.is_file():
        raise SimError(f"{flag} {path}: no such file{f' ({what})' if what else ''}")
    return path


def bindable(endpoint: str, flag: str = "--endpoint") -> str:
    """`endpoint`, unless it is an ipc socket in a directory that does not exist (ZeroMQ cannot bind it)."""
    if endpoint.startswith("ipc://"):
        directory = Path(endpoint.removeprefix("ipc://")).parent
        if not directory.is_dir():
            raise SimError(f"{flag} {endpoint}: no such directory {directory} for the socket")
    return endpoint
