"""openpi PyTorch checkpoints, pi0 and pi0.5, as `convert_jax_model_to_pytorch.py` writes them:
`model.safetensors` (the later layout, no `model.` prefix), `config.json` (`action_dim`, `action_horizon`,
...) and `assets/<asset id>/norm_stats.json`, the asset id being a repo id that may hold slashes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointError, LoadedPolicy
from exporter.pi0 import Pi0
from exporter.weights import build_model, check_spec_fits, read_weights
from runtime.bundle.conventions import OPENPI
from runtime.bundle.spec import NormStats, PolicySpec

FORMAT = SOURCE = "openpi"
# openpi's camera slots, and the ALOHA cameras its AlohaInputs maps onto them (cam_high is required,
# a missing wrist camera is a zero image with mask False; policies/aloha_policy.py).
OPENPI_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
ALOHA_CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
ALOHA_OPTIONAL = ("cam_left_wrist", "cam_right_wrist")
ALOHA_FRAME = (3, 480, 640)
# openpi's Pi0Config.max_token_len: 48 for pi0, 200 for pi0.5; a training config may set another.
MAX_TOKEN_LEN = {"pi0": 48, "pi05": 200}
NUM_STEPS = 10  # openpi's sample_actions default


def detect(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() and bool(norm_stats_files(directory))


def norm_stats_files(directory: Path) -> dict[str, Path]:
    """assets/<asset id>/norm_stats.json by asset id; an id may hold slashes (a repo id)."""
    assets = directory / "assets"
    return {f.parent.relative_to(assets).as_posix(): f for f in sorted(assets.rglob("norm_stats.json"))}


def read_norm_stats(directory: Path, asset_id: str | None) -> tuple[str, dict]:
    """The asset id chosen and its statistics; the only one when there is one, else the one named."""
    files = norm_stats_files(directory)
    if asset_id is None and len(files) != 1:
        raise CheckpointError(
            f"{directory} has norm stats for several assets {sorted(files)}: name one with --asset-id"
        )
    asset_id = asset_id if asset_id is not None else next(iter(files))
    if asset_id not in files:
        raise CheckpointError(f"{directory}: no assets/{asset_id}/norm_stats.json; asset ids found: {sorted(files)}")
    return asset_id, json.loads(files[asset_id].read_text())["norm_stats"]


def openpi_stats(stats: dict, quantiles: bool) -> NormStats:
    """openpi's NormStats (mean, std, q01, q99) in the mode the model uses: quantiles for pi0.5."""
    if quantiles:
        if stats.get("q01") is None or stats.get("q99") is None:
            raise CheckpointError("a pi0.5 policy normalizes with quantiles, but the norm stats have no q01/q99")
        return NormStats(q01=stats["q01"], q99=stats["q99"], eps=OPENPI.norm_eps, mode="quantiles")
    return NormStats(mean=stats["mean"], std=stats["std"], eps=OPENPI.norm_eps)


@dataclass(frozen=True)
class OpenpiOptions:
    """What openpi keeps in its training config rather than the checkpoint, as the caller tells it."""

    asset_id: str | None = None
    adapt_to_pi_aloha: bool = False  # openpi's AlohaInputs/Outputs(adapt_to_pi=True)
    num_steps: int = NUM_STEPS
    max_token_len: int | None = None  # default: openpi's for the model type
    action_horizon: int | None = None


OPTIONS = tuple(f.name for f in fields(OpenpiOptions))  # what `load` takes


def openpi_policy(model: Pi0, directory: Path, options: OpenpiOptions, chunk_size: int, details: dict) -> LoadedPolicy:
    """Our model with openpi's conventions around it: pi0 or pi0.5 from the weights, the robot's state and
    action dims from the norm stats, ALOHA's inputs and outputs when asked (else the three camera slots by
    openpi's names, all required), the token budget and the flow steps from the options."""
    asset_id, norm = read_norm_stats(directory, options.asset_id)
    pi05 = model.dims.pi05
    state_norm, action_norm = openpi_stats(norm["state"], pi05), openpi_stats(norm["actions"], pi05)
    aloha = options.adapt_to_pi_aloha
    cameras = ALOHA_CAMERAS if aloha else OPENPI_SLOTS
    spec = PolicySpec(
        conventions=OPENPI.name,
        camera_keys=cameras,
        camera_shapes=(ALOHA_FRAME if aloha else (3, 224, 224),) * len(cameras),
        optional_cameras=ALOHA_OPTIONAL if aloha else (),
        empty_cameras=0,
        image_size=(224, 224),
        state_dim=state_norm.size,
        action_dim=action_norm.size,
        max_state_dim=model.dims.max_state_dim,
        max_action_dim=model.dims.max_action_dim,
        chunk_size=chunk_size,
        num_steps=options.num_steps,
        tokenizer_max_length=options.max_token_len or MAX_TOKEN_LEN[model.dims.model_type],
        adapt_to_pi_aloha=aloha,
        state_norm=state_norm,
        action_norm=action_norm,
        state_in_prompt=pi05,
    )
    check_spec_fits(spec, model)
    return LoadedPolicy(model=model, spec=spec, source=SOURCE, details={"asset_id": asset_id, **details})


def load(directory: Path, dtype: torch.dtype = torch.float32, **options: Any) -> LoadedPolicy:
    """A converted checkpoint: the weights from model.safetensors, `action_horizon` from config.json
    (unless given); the rest as `OpenpiOptions` say."""
    opts = OpenpiOptions(**options)
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    weights, names, extras = read_weights(directory / "model.safetensors")
    if extras:
        raise CheckpointError(f"{directory}: unexpected tensor {next(iter(extras))} in an openpi checkpoint")
    model = build_model(weights, names, dtype)
    return openpi_policy(model, directory, opts, opts.action_horizon or int(config.get("action_horizon", 50)), {})
