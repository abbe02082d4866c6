"""openpi PyTorch checkpoints, as `convert_jax_model_to_pytorch.py` writes them: `model.safetensors` (the
later layout, no `model.` prefix), `config.json` (`action_dim`, `action_horizon`, ...) and
`assets/<id>/norm_stats.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exporter.checkpoint import CheckpointError, LoadedPolicy
from exporter.weights import build_model, check_spec_fits, read_weights
from runtime.spec import NormStats, PolicySpec

NAME = "openpi"
OPENPI_NORM_EPS = 1e-6
OPENPI_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
OPENPI_MAX_TOKEN_LEN = 48  # openpi's Pi0Config.max_token_len for pi0


def detect(directory: Path) -> bool:
    return any((directory / "assets").glob("*/norm_stats.json"))


def load(
    directory: Path,
    dtype: torch.dtype = torch.float32,
    asset_id: str | None = None,
    adapt_to_pi_aloha: bool = False,
    num_steps: int = 10,
) -> LoadedPolicy:
    """openpi keeps the data conventions in its training config, not in the checkpoint: the camera
    slots are openpi's three (base, left wrist, right wrist), images 224x224, and ALOHA's conventions
    are on only when asked for (`adapt_to_pi_aloha`, as openpi's AlohaInputs(adapt_to_pi=True))."""
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    candidates = sorted((directory / "assets").glob("*/norm_stats.json"))
    if asset_id is not None:
        candidates = [c for c in candidates if c.parent.name == asset_id]
    if len(candidates) != 1:
        found = [c.parent.name for c in sorted((directory / "assets").glob("*/norm_stats.json"))]
        raise CheckpointError(f"{directory}: need exactly one assets/<id>/norm_stats.json (asset ids found: {found})")
    norm = json.loads(candidates[0].read_text())["norm_stats"]
    weights, names, extras = read_weights(directory / "model.safetensors")
    if extras:
        raise CheckpointError(f"{directory}: unexpected tensor {next(iter(extras))} in an openpi checkpoint")
    model = build_model(weights, names, dtype)
    action_dim = int(config.get("action_dim", len(norm["actions"]["mean"])))
    spec = PolicySpec(
        camera_keys=OPENPI_CAMERAS,
        camera_shapes=((3, 224, 224),) * len(OPENPI_CAMERAS),
        empty_cameras=0,
        image_size=(224, 224),
        image_pad="center",
        state_dim=action_dim,
        action_dim=action_dim,
        max_state_dim=model.dims.max_state_dim,
        max_action_dim=model.dims.max_action_dim,
        chunk_size=int(config.get("action_horizon", 50)),
        num_steps=num_steps,
        tokenizer_max_length=OPENPI_MAX_TOKEN_LEN,
        prompt_style="openpi",
        adapt_to_pi_aloha=adapt_to_pi_aloha,
        state_norm=NormStats(norm["state"]["mean"], norm["state"]["std"], OPENPI_NORM_EPS),
        action_norm=NormStats(norm["actions"]["mean"], norm["actions"]["std"], OPENPI_NORM_EPS),
    )
    check_spec_fits(spec, model)
    return LoadedPolicy(model=model, spec=spec, source=NAME)
