"""The project's one error base, and how a command line turns it into one line and exit status 2.

Every failure a user can act on (a missing or wrong file, a bad flag value, a bundle we refuse, a
checkpoint we cannot read) is an `ApplianceError`; each package derives its own from it (`BundleError`,
`exporter.errors.ExportError`, `sim.errors.SimError`, ...). A CLI's `main` runs its command through
`run_command`, which prints such an error, or an OSError about a path, as one line and returns 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable

USAGE_ERROR = 2  # argparse's own status for a bad command line; ours for every user mistake


class ApplianceError(Exception):
    """A failure the user can act on; its message says what was wrong and what to give instead."""


class ConfigError(ApplianceError):
    """A setting (a flag, a config file's key) that cannot be acted on."""


def describe(error: BaseException) -> str:
    """One line for the user: an OSError as `path: reason`, anything else as its message."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def run_command(command: Callable[[], int], report: Callable[[str], None]) -> int:
    """`command()`, or USAGE_ERROR after `report`ing an ApplianceError or OSError in one line."""
    try:
        return command()
    except (ApplianceError, OSError) as e:
        report(describe(e))
        return USAGE_ERROR
