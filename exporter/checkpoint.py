"""Load a pi0 checkpoint (LeRobot v0.3.x or openpi PyTorch) into our `Pi0` and its `PolicySpec`.

Nothing is patched and nothing is downloaded. Dimensions are inferred from tensor shapes, keys are
mapped onto our module names by prefix, and anything we do not recognize is refused by name.

Formats:
- LeRobot: `config.json` (`"type": "pi0"`) + `model.safetensors`, keys under `model.` in the layout of
  transformers < 4.52 (`paligemma.language_model.model.`, `paligemma.vision_tower.`) or the later one
  (`paligemma.model.language_model.`, `paligemma.model.vision_tower.`); normalization statistics are
  buffers in the same file.
- openpi: what `convert_jax_model_to_pytorch.py` writes: `model.safetensors` (the later layout, no
  `model.` prefix), `config.json` (`action_dim`, `action_horizon`, ...) and `assets/<id>/norm_stats.json`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.dims import SIGLIP_HEADS_BY_WIDTH, GemmaDims, Pi0Dims, VisionDims
from exporter.pi0 import Pi0
from exporter.safetensors_io import SafetensorsFile, write_safetensors
from runtime.spec import NormStats, PolicySpec

LEROBOT_NORM_EPS = 1e-8
OPENPI_NORM_EPS = 1e-6
OPENPI_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
OPENPI_MAX_TOKEN_LEN = 48  # openpi's Pi0Config.max_token_len for pi0

_PG = "paligemma_with_expert.paligemma."
_EXPERT = "paligemma_with_expert.gemma_expert."

# The later transformers layout -> the earlier one (LeRobot's _transform_state_dict_keys, reversed).
_LAYOUT_ALIASES = (
    (_PG + "model.language_model.", _PG + "language_model.model."),
    (_PG + "model.vision_tower.", _PG + "vision_tower."),
    (_PG + "model.multi_modal_projector.", _PG + "multi_modal_projector."),
    (_PG + "lm_head.", _PG + "language_model.lm_head."),
)

# Earlier layout -> our module names. Inside blocks, the names are HF's and carry over unchanged.
_PREFIX_MAP = (
    (_PG + "vision_tower.vision_model.embeddings.", "vision."),
    (_PG + "vision_tower.vision_model.encoder.layers.", "vision.layers."),
    (_PG + "vision_tower.vision_model.post_layernorm.", "vision.post_layernorm."),
    (_PG + "multi_modal_projector.linear.", "projector."),
    (_PG + "language_model.model.embed_tokens.", "embed_tokens."),
    (_PG + "language_model.model.layers.", "llm.layers."),
    (_EXPERT + "model.layers.", "expert.layers."),
    (_EXPERT + "model.norm.", "expert.norm."),
)

# Stored, but never read at inference: the language-model head (tied to the embedding), the
# expert's unused head, the language model's final norm (the prefix's outputs are never read),
# LeRobot's training-target statistics.
_UNUSED = (
    re.compile(r"^paligemma_with_expert\.paligemma\.language_model\.lm_head\."),
    re.compile(r"^paligemma_with_expert\.gemma_expert\.lm_head\."),
    re.compile(r"^paligemma_with_expert\.paligemma\.language_model\.model\.norm\."),
    re.compile(r"^normalize_targets\."),
)


class CheckpointError(ValueError):
    """A checkpoint we cannot load, with the reason in words."""


@dataclass
class LoadedPolicy:
    model: Pi0
    spec: PolicySpec
    source: str  # "lerobot", "openpi" or "preset:<name>"


def canonical_key(key: str) -> str:
    """Strip LeRobot's `model.` prefix and map the later transformers layout onto the earlier one."""
    if key.startswith("model."):
        key = key[len("model.") :]
    for new, old in _LAYOUT_ALIASES:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _module_name(canonical: str) -> str | None:
    for src, dst in _PREFIX_MAP:
        if canonical.startswith(src):
            return dst + canonical[len(src) :]
    top = canonical.split(".")[0]
    if top in ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"):
        return canonical
    return None


def _count_layers(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    if not indices:
        raise CheckpointError(f"no layers found under {prefix}*")
    if indices != set(range(len(indices))):
        raise CheckpointError(f"layers under {prefix}* are not numbered 0..{len(indices) - 1}: {sorted(indices)}")
    return len(indices)


def _shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(f"missing tensor {name}")
    return shapes[name]


def infer_dims(shapes: dict[str, tuple[int, ...]]) -> Pi0Dims:
    """Pi0 dimensions from the shapes of tensors named as our modules (see `_PREFIX_MAP`)."""
    patch = _shape(shapes, "vision.patch_embedding.weight")
    width = patch[0]
    if width not in SIGLIP_HEADS_BY_WIDTH:
        raise CheckpointError(f"SigLIP width {width} is not in the ViT width table {sorted(SIGLIP_HEADS_BY_WIDTH)}")
    num_patches = _shape(shapes, "vision.position_embedding.weight")[0]
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise CheckpointError(f"{num_patches} vision positions do not form a square grid")
    vision = VisionDims(
        width=width,
        depth=_count_layers(shapes, "vision.layers."),
        mlp_dim=_shape(shapes, "vision.layers.0.mlp.fc1.weight")[0],
        num_heads=SIGLIP_HEADS_BY_WIDTH[width],
        patch_size=patch[2],
        image_size=side * patch[2],
    )

    def gemma(prefix: str, width: int) -> GemmaDims:
        head_dim = _shape(shapes, f"{prefix}.layers.0.self_attn.k_proj.weight")[0]
        return GemmaDims(
            width=width,
            depth=_count_layers(shapes, f"{prefix}.layers."),
            mlp_dim=_shape(shapes, f"{prefix}.layers.0.mlp.gate_proj.weight")[0],
            num_heads=_shape(shapes, f"{prefix}.layers.0.self_attn.q_proj.weight")[0] // head_dim,
            head_dim=head_dim,
        )

    vocab_size, lang_width = _shape(shapes, "embed_tokens.weight")
    expert_width = _shape(shapes, "expert.layers.0.input_layernorm.weight")[0]
    try:
        return Pi0Dims(
            vision=vision,
            language=gemma("llm", lang_width),
            expert=gemma("expert", expert_width),
            vocab_size=vocab_size,
            max_state_dim=_shape(shapes, "state_proj.weight")[1],
            max_action_dim=_shape(shapes, "action_in_proj.weight")[1],
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _read_weights(path: Path) -> tuple[SafetensorsFile, dict[str, str], dict[str, str]]:
    """Open the weights; return the file, {module name: stored key} and {kept non-weight key: stored key}."""
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    weights = SafetensorsFile(path)
    names: dict[str, str] = {}
    extras: dict[str, str] = {}
    for key in weights.tensor_names():
        canonical = canonical_key(key)
        if any(p.match(canonical) for p in _UNUSED):
            continue
        if key.startswith(("normalize_inputs.", "unnormalize_outputs.")):
            extras[key] = key
            continue
        name = _module_name(canonical)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {key} (not part of pi0 as we know it)")
        if name in names:
            raise CheckpointError(f"{path}: tensors {names[name]} and {key} both map to {name}")
        names[name] = key
    # A tied head may be stored in place of the embedding it shares memory with.
    if "embed_tokens.weight" not in names:
        for key in weights.tensor_names():
            if canonical_key(key) == _PG + "language_model.lm_head.weight":
                names["embed_tokens.weight"] = key
    return weights, names, extras


def build_model(weights: SafetensorsFile, names: dict[str, str], dtype: torch.dtype) -> Pi0:
    """Infer the dimensions, build the model without allocating, and assign the mapped tensors."""
    dims = infer_dims({name: weights.shape(key) for name, key in names.items()})
    with torch.device("meta"):
        model = Pi0(dims)
    expected = model.state_dict()
    missing = [name for name in expected if name not in names]
    if missing:
        raise CheckpointError(f"{weights.path}: missing tensor for {missing[0]} ({len(missing)} missing in all)")
    for name, key in names.items():
        if name not in expected:
            raise CheckpointError(f"{weights.path}: unexpected tensor {key}")
        if weights.shape(key) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{weights.path}: tensor {key} has shape {weights.shape(key)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict({name: weights.tensor(key, dtype) for name, key in names.items()}, assign=True)
    return model.eval().requires_grad_(False)


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
        camera_keys=tuple(cameras),
        camera_shapes=tuple(tuple(features[k]["shape"]) for k in cameras),
        empty_cameras=int(config.get("empty_cameras", 0)),
        image_size=(height, width),
        image_pad="left_top",
        state_dim=features["observation.state"]["shape"][0],
        action_dim=config["output_features"]["action"]["shape"][0],
        max_state_dim=config["max_state_dim"],
        max_action_dim=config["max_action_dim"],
        # LeRobot v0.3 denoises n_action_steps tokens (it sizes noise and masks with it, not chunk_size).
        chunk_size=config["n_action_steps"],
        num_steps=config["num_steps"],
        tokenizer_max_length=config["tokenizer_max_length"],
        prompt_style="lerobot",
        adapt_to_pi_aloha=bool(config.get("adapt_to_pi_aloha", False)),
        state_norm=stats["state"],
        action_norm=stats["action"],
    )


def load_lerobot(directory: Path, dtype: torch.dtype = torch.float32) -> LoadedPolicy:
    config = json.loads((directory / "config.json").read_text())
    if config.get("type") != "pi0":
        raise CheckpointError(f"{directory}/config.json is a LeRobot {config.get('type')!r} policy, not pi0")
    weights, names, extras = _read_weights(directory / "model.safetensors")
    model = build_model(weights, names, dtype)
    stats = {
        "state": _stats(weights, extras, "normalize_inputs.buffer_observation_state", LEROBOT_NORM_EPS),
        "action": _stats(weights, extras, "unnormalize_outputs.buffer_action", LEROBOT_NORM_EPS),
    }
    spec = _lerobot_spec(config, stats)
    _check_spec_fits(spec, model)
    return LoadedPolicy(model=model, spec=spec, source="lerobot")


def load_openpi(
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
    weights, names, extras = _read_weights(directory / "model.safetensors")
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
    _check_spec_fits(spec, model)
    return LoadedPolicy(model=model, spec=spec, source="openpi")


def _check_spec_fits(spec: PolicySpec, model: Pi0) -> None:
    dims = model.dims
    if (spec.max_state_dim, spec.max_action_dim) != (dims.max_state_dim, dims.max_action_dim):
        raise CheckpointError(
            f"config pads state/actions to ({spec.max_state_dim}, {spec.max_action_dim}) but the weights "
            f"take ({dims.max_state_dim}, {dims.max_action_dim})"
        )
    if spec.image_size != (dims.vision.image_size, dims.vision.image_size):
        raise CheckpointError(
            f"config resizes images to {spec.image_size}, the vision tower takes {dims.vision.image_size}"
        )


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, **openpi_options: Any) -> LoadedPolicy:
    """Load a LeRobot or openpi pi0 checkpoint directory, telling the two apart by their files."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    config_path = directory / "config.json"
    if config_path.is_file() and "type" in json.loads(config_path.read_text()):
        if openpi_options:
            raise CheckpointError(f"options {sorted(openpi_options)} apply to openpi checkpoints only")
        return load_lerobot(directory, dtype)
    if any((directory / "assets").glob("*/norm_stats.json")):
        return load_openpi(directory, dtype, **openpi_options)
    raise CheckpointError(
        f'{directory} is neither a LeRobot pi0 checkpoint (config.json with "type": "pi0") nor an openpi '
        "one (model.safetensors with assets/<id>/norm_stats.json)"
    )


def lerobot_key(name: str, layout: str = "old") -> str:
    """Our module name -> the key LeRobot stores it under, in the `old` (< 4.52) or `new` layout."""
    for src, dst in _PREFIX_MAP:
        if name.startswith(dst):
            key = src + name[len(dst) :]
            break
    else:
        key = name
    if layout == "new":
        for new, old in _LAYOUT_ALIASES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
    elif layout != "old":
        raise ValueError(f"layout must be 'old' or 'new', not {layout!r}")
    return "model." + key


def save_lerobot(policy: LoadedPolicy, directory: str | Path, layout: str = "old") -> Path:
    """Write a policy as a LeRobot v0.3 pi0 checkpoint (config.json + model.safetensors)."""
    spec = policy.spec
    if spec.image_pad != "left_top" or spec.prompt_style != "lerobot":
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
