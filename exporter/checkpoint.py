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

from exporter.errors import ExportError
from exporter.readers import READERS
from runtime.bundle.robot import Robot
from runtime.bundle.spec import PolicySpec

if TYPE_CHECKING:
    from exporter.lora import Adapters
    from exporter.pi0 import Pi0


class CheckpointError(ExportError):
    """A checkpoint we cannot load, with the reason in words."""


@dataclass
class LoadedPolicy:
    model: Pi0
    spec: PolicySpec
    source: str  # the framework ("lerobot", "openpi") or "preset:<name>"
    details: dict[str, Any] = field(default_factory=dict)  # what else the reader found (e.g. the asset id)
    adapters: Adapters | None = None  # LoRA adapters merged into `model`, kept for the unmerged reference
    robot: Robot | None = None  # the training config's robot, where the reader knows it (openpi)


def checkpoint_directory(path: str | Path) -> Path:
    """`path` as a checkpoint directory, or a CheckpointError naming it."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; a checkpoint is one")
    return directory


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, source_format: str = "auto", **options: Any
) -> LoadedPolicy:
    """Load a checkpoint directory with the reader of `source_format`, or with the first reader that recognizes
    it. `options` go to that reader; one it does not list in its `OPTIONS` is refused by name. A ValueError
    while reading (a config.json that is not JSON, statistics `PolicySpec` refuses) is a CheckpointError."""
    directory = checkpoint_directory(path)
    if source_format != "auto" and source_format not in READERS:
        raise CheckpointError(f"unknown checkpoint format {source_format!r}; choose auto or one of {sorted(READERS)}")
    try:
        for name in [source_format] if source_format != "auto" else list(READERS):
            reader = importlib.import_module(READERS[name])
            if source_format == "auto" and not reader.detect(directory):
                continue
            unknown = sorted(set(options) - set(reader.OPTIONS))
            if unknown:
                takes = f"they take {sorted(reader.OPTIONS)}" if reader.OPTIONS else "they take none"
                raise CheckpointError(f"options {unknown} do not apply to {name} checkpoints ({takes})")
            return reader.load(directory, dtype, **options)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from e
    raise CheckpointError(
        f'{directory} is neither a LeRobot pi0/pi05 checkpoint (config.json with "type") nor an openpi one '
        "(model.safetensors with assets/<asset id>/norm_stats.json)"
    )
