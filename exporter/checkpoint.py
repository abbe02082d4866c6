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
    from exporter.lora import Adapters
    from exporter.pi0 import Pi0

# Each reader's FORMAT -> its module; `detect` is asked in this order.
READERS = {
    "lerobot-0.4": "exporter.readers.lerobot_v04",
    "lerobot-0.3": "exporter.readers.lerobot_v03",
    "openpi": "exporter.readers.openpi_pytorch",
    "openpi-jax": "exporter.readers.openpi_jax",
}


class CheckpointError(ValueError):
    """A checkpoint we cannot load, with the reason in words."""


@dataclass
class LoadedPolicy:
    model: Pi0
    spec: PolicySpec
    source: str  # the framework ("lerobot", "openpi") or "preset:<name>"
    details: dict[str, Any] = field(default_factory=dict)  # what else the reader found (e.g. the asset id)
    adapters: Adapters | None = None  # LoRA adapters merged into `model`, kept for the unmerged reference


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, source_format: str = "auto", **options: Any
) -> LoadedPolicy:
    """Load a checkpoint directory with the reader of `source_format`, or with the first reader that recognizes
    it; `options` go to that reader (and are refused by one that takes none)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if source_format != "auto" and source_format not in READERS:
        raise CheckpointError(f"unknown checkpoint format {source_format!r}; choose auto or one of {sorted(READERS)}")
    chosen = [READERS[source_format]] if source_format != "auto" else list(READERS.values())
    for module in chosen:
        reader = importlib.import_module(module)
        if source_format != "auto" or reader.detect(directory):
            try:
                return reader.load(directory, dtype, **options)
            except TypeError as e:
                if options and "unexpected keyword argument" in str(e):
                    raise CheckpointError(
                        f"options {sorted(options)} do not apply to {reader.FORMAT} checkpoints"
                    ) from e
                raise
    raise CheckpointError(
        f'{directory} is neither a LeRobot pi0/pi05 checkpoint (config.json with "type") nor an openpi one '
        "(model.safetensors with assets/<asset id>/norm_stats.json)"
    )
