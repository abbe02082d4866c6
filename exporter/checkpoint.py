"""Load a pi0 checkpoint into our `Pi0` and its `PolicySpec`, whichever framework wrote it.

Nothing is patched and nothing is downloaded. Each source format has its reader in `exporter/readers/`;
`load_checkpoint` tells them apart by their files.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runtime.spec import PolicySpec

if TYPE_CHECKING:
    from exporter.pi0 import Pi0

READERS = ("exporter.readers.lerobot_v03", "exporter.readers.openpi_pytorch")  # asked in this order


class CheckpointError(ValueError):
    """A checkpoint we cannot load, with the reason in words."""


@dataclass
class LoadedPolicy:
    model: Pi0
    spec: PolicySpec
    source: str  # the reader's NAME ("lerobot", "openpi") or "preset:<name>"
    details: dict[str, Any] = field(default_factory=dict)  # what else the reader found (e.g. the asset id)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, **options: Any) -> LoadedPolicy:
    """Load a checkpoint directory with the first reader that recognizes it; `options` go to that reader
    (and are refused by one that takes none)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for module in READERS:
        reader = importlib.import_module(module)
        if reader.detect(directory):
            try:
                return reader.load(directory, dtype, **options)
            except TypeError as e:
                if options and "unexpected keyword argument" in str(e):
                    raise CheckpointError(f"options {sorted(options)} do not apply to {reader.NAME} checkpoints") from e
                raise
    raise CheckpointError(
        f'{directory} is neither a LeRobot pi0 checkpoint (config.json with "type": "pi0") nor an openpi '
        "one (model.safetensors with assets/<id>/norm_stats.json)"
    )
