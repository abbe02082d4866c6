"""pi0's tensors as checkpoints store them, mapped onto our module names; the model built from them.

Shared by the checkpoint readers. Dimensions are inferred from tensor shapes, keys are mapped onto our
module names by prefix, and anything we do not recognize is refused by name. Two key layouts exist:
transformers < 4.52 (`paligemma.language_model.model.`, `paligemma.vision_tower.`) and the later one
(`paligemma.model.language_model.`, `paligemma.model.vision_tower.`); LeRobot prefixes both with `model.`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from exporter.checkpoint import CheckpointError
from exporter.dims import SIGLIP_HEADS_BY_WIDTH, GemmaDims, Pi0Dims, VisionDims
from exporter.pi0 import Pi0
from exporter.safetensors_io import SafetensorsFile
from runtime.bundle.spec import PolicySpec

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


# The suffix's own modules, stored under our names: pi0's, and pi0.5's time MLP.
SUFFIX_MODULES = (
    "state_proj",
    "action_in_proj",
    "action_out_proj",
    "action_time_mlp_in",
    "action_time_mlp_out",
    "time_mlp_in",
    "time_mlp_out",
    "condition_embedding",  # classifier-free guidance's learned condition (ours: docs/guidance.md)
)


def canonical_key(key: str) -> str:
    """Strip LeRobot's `model.` prefix and map the later transformers layout onto the earlier one."""
    if key.startswith("model."):
        key = key[len("model.") :]
    for new, old in _LAYOUT_ALIASES:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def module_name(canonical: str) -> str | None:
    for src, dst in _PREFIX_MAP:
        if canonical.startswith(src):
            return dst + canonical[len(src) :]
    top = canonical.split(".")[0]
    if top in SUFFIX_MODULES:
        return canonical
    return None


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
    expert_width = _shape(shapes, "expert.layers.0.self_attn.q_proj.weight")[1]
    pi05 = "time_mlp_in.weight" in shapes  # pi0.5: a time MLP, adaptive norms, no state projection
    max_action_dim = _shape(shapes, "action_in_proj.weight")[1]
    try:
        return Pi0Dims(
            vision=vision,
            language=gemma("llm", lang_width),
            expert=gemma("expert", expert_width),
            vocab_size=vocab_size,
            # pi0.5 has no state projection: its padded state width is the actions' (openpi pads both to action_dim)
            max_state_dim=max_action_dim if pi05 else _shape(shapes, "state_proj.weight")[1],
            max_action_dim=max_action_dim,
            pi05=pi05,
            condition="bias" if "condition_embedding.weight" in shapes else None,
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def read_weights(path: Path) -> tuple[SafetensorsFile, dict[str, str], dict[str, str]]:
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
        name = module_name(canonical)
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
    shapes = {name: weights.shape(key) for name, key in names.items()}
    return model_from(shapes, lambda name: weights.tensor(names[name], dtype), str(weights.path))


def model_from(shapes: dict[str, tuple[int, ...]], tensor: Callable[[str], torch.Tensor], origin: str) -> Pi0:
    """Our model from tensors by our module names: dims from their shapes, built without allocating,
    each name checked (missing, unexpected, wrong shape) before `tensor(name)` is asked for it."""
    dims = infer_dims(shapes)
    with torch.device("meta"):
        model = Pi0(dims)
    expected = model.state_dict()
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise CheckpointError(f"{origin}: missing tensor for {missing[0]} ({len(missing)} missing in all)")
    for name, shape in shapes.items():
        if name not in expected:
            raise CheckpointError(f"{origin}: unexpected tensor {name}")
        if tuple(shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{origin}: tensor {name} has shape {tuple(shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict({name: tensor(name) for name in shapes}, assign=True)
    return model.eval().requires_grad_(False)


def check_spec_fits(spec: PolicySpec, model: Pi0) -> None:
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
