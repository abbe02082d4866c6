"""The exporter's one error base. Every failure of `pi0-export` a user can act on (a checkpoint we cannot
read, a bundle we cannot write or that fails validation, atc missing or failing, a bad flag value) is an
`ExportError`, and so an `ApplianceError`: `run_command` prints it as one line and exits 2.
"""

from __future__ import annotations

from runtime.errors import ApplianceError


class ExportError(ApplianceError):
    """A failure of the export the user can act on, with the reason in words."""
