"""openpi PyTorch checkpoints, pi0 and pi0.5, as `convert_jax_model_to_pytorch.py` writes them:
`model.safetensors` (the later layout, no `model.` prefix), `config.json` (`action_dim`, `action_horizon`,
...) and `assets/<asset id>/norm_stats.json`, the asset id being a repo id that may hold slashes. The rest
is the training config's, named by the user (`exporter.openpi_configs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointError, LoadedPolicy
from exporter.openpi_configs import CONFIG_SOURCE, OPENPI_COMMIT, OpenpiConfig, openpi_config
from exporter.pi0 import Pi0
from exporter.robot_adapter import proof_of, read_adapter
from exporter.source import log
from exporter.weights import build_model, check_spec_fits, read_weights
from runtime.bundle.conventions import OPENPI
from runtime.bundle.robot import Robot
from runtime.bundle.spec import NormStats

FORMAT = SOURCE = "openpi"
NUM_STEPS = 10  # openpi's sample_actions default


def detect(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() and bool(norm_stats_files(directory))


def norm_stats_files(directory: Path) -> dict[str, Path]:
    """assets/<asset id>/norm_stats.json by asset id; an id may hold slashes (a repo id)."""
    assets = directory / "assets"
    return {f.parent.relative_to(assets).as_posix(): f for f in sorted(assets.rglob("norm_stats.json"))}


def read_norm_stats(directory: Path, asset_id: str | None, config_asset_id: str | None = None) -> tuple[str, dict]:
    """The asset id chosen and its statistics: the one named; else the only one; else the training config's."""
    files = norm_stats_files(directory)
    if asset_id is None and len(files) != 1 and config_asset_id in files:
        asset_id = config_asset_id
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
    """What openpi keeps in its training config rather than the checkpoint: the config by name
    (`exporter.openpi_configs`), and the settings a user's copy of it may have changed."""

    openpi_config: str | None = None  # a published config by name, or
    robot: str | None = None  # a robot adapter file of your own (`exporter.robot_adapter`); one is required
    prove_with: str | None = None  # the Python where openpi and the adapter's config are importable
    proof: str | None = None  # or a recording of the config's transforms made earlier (openpi_recorder.py)
    asset_id: str | None = None  # default: the only one in the checkpoint, else the config's
    num_steps: int = NUM_STEPS
    max_token_len: int | None = None  # default: the config's
    action_horizon: int | None = None  # default: the checkpoint's config.json, else the config's


OPTIONS = tuple(f.name for f in fields(OpenpiOptions))  # what `load` takes


def training_config(options: OpenpiOptions) -> OpenpiConfig:
    """The named config, or the one a robot adapter file describes."""
    if options.robot is not None:
        if options.openpi_config is not None:
            raise CheckpointError("name a published openpi config or give a robot adapter file, not both")
        return read_adapter(options.robot)
    if options.prove_with is not None or options.proof is not None:
        raise CheckpointError(
            "--prove-with and --proof prove a robot adapter file (--robot); a named config needs none"
        )
    try:
        return openpi_config(options.openpi_config)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def openpi_policy(model: Pi0, directory: Path, options: OpenpiOptions, chunk_size: int, details: dict) -> LoadedPolicy:
    """Our model with openpi's conventions around it, as the named training config sets them up: its
    robot family's camera slots, state and action dims and ALOHA maps, its delta actions, its token budget
    and `discrete_state_input`; the flow steps from the options. pi0 or pi0.5 is told by the weights; where
    the config's model is the other one (a user's variant, e.g. pi0.5 on `pi0_aloha_sim`'s data config),
    the config's data transforms apply and Pi0Config's defaults follow the weights, as the details say."""
    config = training_config(options)
    family = config.family
    pi05 = model.dims.pi05
    if pi05 != config.pi05:
        trained = "pi05" if config.pi05 else "pi0"
        note = f"{trained}; the weights are {model.dims.model_type}: its data transforms, Pi0Config's defaults for the weights"
        details = {**details, "openpi_config_model": note}
    asset_id, norm = read_norm_stats(directory, options.asset_id, config.asset_id)
    state_norm, action_norm = openpi_stats(norm["state"], pi05), openpi_stats(norm["actions"], pi05)
    spec = config.policy_spec(
        max_state_dim=model.dims.max_state_dim,
        max_action_dim=model.dims.max_action_dim,
        chunk_size=chunk_size,
        num_steps=options.num_steps,
        tokenizer_max_length=options.max_token_len or config.token_budget(pi05),
        state_norm=state_norm,
        action_norm=action_norm,
        state_in_prompt=config.state_in_prompt(pi05),
    )
    check_spec_fits(spec, model)
    custom = family.name == "custom"
    proof = proof_of(config, options.prove_with, options.proof and Path(options.proof), log) if custom else None
    robot = Robot(
        name=config.name,
        family=family.name,
        source=family.source if custom else f"{CONFIG_SOURCE} @ {OPENPI_COMMIT[:8]}; {family.source}",
        proof=proof,
        state_keys=family.state_keys,
        unused_cameras=family.unused_cameras,
        default_prompt=config.default_prompt,
        policy_metadata=dict(config.policy_metadata),
    )
    details = {"asset_id": asset_id, "openpi_config": config.name, **details}
    return LoadedPolicy(model=model, spec=spec, source=SOURCE, details=details, robot=robot)


def chunk_size(options: OpenpiOptions, checkpoint_horizon: int | None) -> int:
    """The action horizon: the one given, else the checkpoint's own record, else the training config's."""
    return options.action_horizon or checkpoint_horizon or training_config(options).action_horizon


def load(directory: Path, dtype: torch.dtype = torch.float32, **options: Any) -> LoadedPolicy:
    """A converted checkpoint: the weights from model.safetensors, `action_horizon` from config.json
    (unless given); the rest as `OpenpiOptions` say."""
    opts = OpenpiOptions(**options)
    training_config(opts)  # refused before the weights are read
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    weights, names, extras = read_weights(directory / "model.safetensors")
    if extras:
        raise CheckpointError(f"{directory}: unexpected tensor {next(iter(extras))} in an openpi checkpoint")
    model = build_model(weights, names, dtype)
    horizon = config.get("action_horizon")
    return openpi_policy(model, directory, opts, chunk_size(opts, None if horizon is None else int(horizon)), {})
