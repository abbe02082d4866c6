"""LeRobot v0.3 pi0 checkpoints: `config.json` (`"type": "pi0"`) + `model.safetensors`, keys under `model.`
in either transformers layout; the normalization statistics are buffers in the same file. Also the
writer of that format (tests and benchmarks make their checkpoints with it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointError, LoadedPolicy
from exporter.safetensors_io import SafetensorsFile, write_safetensors
from exporter.weights import build_model, check_spec_fits, lerobot_key, read_weights
from runtime.bundle.conventions import LEROBOT_03
from runtime.bundle.spec import NormStats, PolicySpec

FORMAT = "lerobot-0.3"
SOURCE = "lerobot"
OPTIONS: tuple[str, ...] = ()  # `load` takes none
PREPROCESSOR = "policy_preprocessor.json"  # what LeRobot >= 0.4 saves beside the weights


def detect(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and not (directory / PREPROCESSOR).is_file() and "type" in json.loads(config.read_text())


def _stats(weights: SafetensorsFile, extras: dict[str, str], prefix: str, eps: float) -> NormStats | None:
    mean_key, std_key = f"{prefix}.mean", f"{prefix}.std"
    if mean_key not in extras or std_key not in extras:
        return None
    return NormStats(
        mean=weights.tensor(mean_key, torch.float32).numpy(),
        std=weights.tensor(std_key, torch.float32).numpy(),
        eps=eps,
    )


def _lerobot_spec(config: dict[str, Any], stats: dict[str, NormStats | None]) -> PolicySpec:
    mapping = config.get("normalization_mapping", {})
    for kind in ("STATE", "ACTION"):
        if mapping.get(kind, "MEAN_STD") != "MEAN_STD":
            raise CheckpointError(f"{kind} normalization {mapping[kind]!r} is not supported (only MEAN_STD)")
    if mapping.get("VISUAL", "IDENTITY") != "IDENTITY":
        raise CheckpointError(f"VISUAL normalization {mapping['VISUAL']!r} is not supported (only IDENTITY)")
    if config.get("use_delta_joint_actions_aloha"):
        raise CheckpointError("use_delta_joint_actions_aloha is not supported (LeRobot does not implement it either)")
    features = config["input_features"]
    empty = re.compile(r"^observation\.images\.empty_camera_\d+$")
    cameras = [k for k, v in features.items() if v["type"] == "VISUAL" and not empty.match(k)]
    if mapping.get("STATE") and stats["state"] is None:
        raise CheckpointError("the checkpoint has no state statistics (normalize_inputs.buffer_observation_state.*)")
    if mapping.get("ACTION") and stats["action"] is None:
        raise CheckpointError("the checkpoint has no action statistics (unnormalize_outputs.buffer_action.*)")
    height, width = config.get("resize_imgs_with_padding") or (224, 224)
    return PolicySpec(
        conventions=LEROBOT_03.name,
        camera_keys=tuple(cameras),
        camera_shapes=tuple(tuple(features[k]["shape"]) for k in cameras),
        empty_cameras=int(config.get("empty_cameras", 0)),
        image_size=(height, width),
        state_dim=features["observation.state"]["shape"][0],
        action_dim=config["output_features"]["action"]["shape"][0],
        max_state_dim=config["max_state_dim"],
        max_action_dim=config["max_action_dim"],
        # LeRobot v0.3 denoises n_action_steps tokens (it sizes noise and masks with it, not chunk_size).
        chunk_size=config["n_action_steps"],
        num_steps=config["num_steps"],
        tokenizer_max_length=config["tokenizer_max_length"],
        adapt_to_pi_aloha=bool(config.get("adapt_to_pi_aloha", False)),
        state_norm=stats["state"],
        action_norm=stats["action"],
    )


def load(directory: Path, dtype: torch.dtype = torch.float32) -> LoadedPolicy:
    if (directory / PREPROCESSOR).is_file():
        raise CheckpointError(
            f"{directory} is a LeRobot >= 0.4 checkpoint ({PREPROCESSOR} beside the weights): read it as "
            "lerobot-0.4 or lerobot-0.6 (let the format be detected: it tells the two apart)"
        )
    config = json.loads((directory / "config.json").read_text())
    if config.get("type") != "pi0":
        raise CheckpointError(f"{directory}/config.json is a LeRobot {config.get('type')!r} policy, not pi0")
    weights, names, extras = read_weights(directory / "model.safetensors")
    model = build_model(weights, names, dtype)
    stats = {
        "state": _stats(weights, extras, "normalize_inputs.buffer_observation_state", LEROBOT_03.norm_eps),
        "action": _stats(weights, extras, "unnormalize_outputs.buffer_action", LEROBOT_03.norm_eps),
    }
    spec = _lerobot_spec(config, stats)
    check_spec_fits(spec, model)
    return LoadedPolicy(model=model, spec=spec, source=SOURCE)


def save_lerobot(policy: LoadedPolicy, directory: str | Path, layout: str = "old") -> Path:
    """Write a policy as a LeRobot v0.3 pi0 checkpoint (config.json + model.safetensors)."""
    spec = policy.spec
    if spec.conventions != LEROBOT_03.name or spec.state_in_prompt or spec.optional_cameras:
        raise ValueError("only a policy with LeRobot's conventions can be saved as a LeRobot checkpoint")
    if spec.state_norm is None or spec.action_norm is None:
        raise ValueError("a LeRobot pi0 checkpoint carries MEAN_STD statistics for state and action")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {lerobot_key(name, layout): t for name, t in policy.model.state_dict().items()}
    for prefix, stats, dim in (
        ("normalize_inputs.buffer_observation_state", spec.state_norm, spec.state_dim),
        ("normalize_targets.buffer_action", spec.action_norm, spec.action_dim),
        ("unnormalize_outputs.buffer_action", spec.action_norm, spec.action_dim),
    ):
        tensors[f"{prefix}.mean"] = torch.from_numpy(stats.mean[:dim].copy())
        tensors[f"{prefix}.std"] = torch.from_numpy(stats.std[:dim].copy())
    write_safetensors(out / "model.safetensors", tensors)
    features: dict[str, Any] = {
        k: {"type": "VISUAL", "shape": list(s)} for k, s in zip(spec.camera_keys, spec.camera_shapes, strict=True)
    }
    features["observation.state"] = {"type": "STATE", "shape": [spec.state_dim]}
    for i in range(spec.empty_cameras):
        features[f"observation.images.empty_camera_{i}"] = {"type": "VISUAL", "shape": list(spec.camera_shapes[0])}
    config = {
        "type": "pi0",
        "n_obs_steps": 1,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        "input_features": features,
        "output_features": {"action": {"type": "ACTION", "shape": [spec.action_dim]}},
        "chunk_size": spec.chunk_size,
        "n_action_steps": spec.chunk_size,
        "max_state_dim": spec.max_state_dim,
        "max_action_dim": spec.max_action_dim,
        "resize_imgs_with_padding": list(spec.image_size),
        "empty_cameras": spec.empty_cameras,
        "adapt_to_pi_aloha": spec.adapt_to_pi_aloha,
        "use_delta_joint_actions_aloha": False,
        "tokenizer_max_length": spec.tokenizer_max_length,
        "proj_width": policy.model.dims.expert.width,
        "num_steps": spec.num_steps,
        "use_cache": True,
        "attention_implementation": "eager",
    }
    (out / "config.json").write_text(json.dumps(config, indent=4))
    return out
