"""The dimensions of a pi0 network, as frozen dataclasses with named presets.

pi0 = SigLIP (vision) + Gemma (language) over the prefix, and a smaller Gemma (the action expert)
over the suffix; the two Gemmas share depth, head count and head size because they attend jointly.
pi0.5 (`pi05`) is the same towers with a time-conditioned action expert (adaptive norms, a time MLP)
and the state in the prompt instead of a state token.
"""

from __future__ import annotations

from dataclasses import dataclass

# SigLIP's head count is not in its weights; it follows the ViT width table (openpi's siglip.py).
SIGLIP_HEADS_BY_WIDTH = {
    32: 2,
    192: 3,
    384: 6,
    512: 8,
    768: 12,
    1024: 16,
    1152: 16,
    1280: 16,
    1536: 16,
    1664: 16,
    1792: 16,
}


CONDITION_MODES = (None, "bias")


@dataclass(frozen=True)
class VisionDims:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 224

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaDims:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    head_dim: int
    num_kv_heads: int = 1  # every pi0 Gemma is multi-query


@dataclass(frozen=True)
class Pi0Dims:
    vision: VisionDims
    language: GemmaDims
    expert: GemmaDims
    vocab_size: int
    max_state_dim: int = 32
    max_action_dim: int = 32
    pi05: bool = False
    # A learned two-way condition (classifier-free guidance, seed 003's "bias" mode): `condition_embedding`
    # [2, expert width], row 0 the unconditioned branch, row 1 the positive one, added to every action token.
    condition: str | None = None

    @property
    def model_type(self) -> str:
        return "pi05" if self.pi05 else "pi0"

    def __post_init__(self) -> None:
        lang, exp = self.language, self.expert
        if (lang.depth, lang.num_heads, lang.head_dim, lang.num_kv_heads) != (
            exp.depth,
            exp.num_heads,
            exp.head_dim,
            exp.num_kv_heads,
        ):
            raise ValueError(f"the language model {lang} and the action expert {exp} cannot attend jointly")
        if self.condition not in CONDITION_MODES:
            raise ValueError(f"condition {self.condition!r}: the modes served are {CONDITION_MODES}")
        if self.vision.width % self.vision.num_heads:
            raise ValueError(f"vision width {self.vision.width} is not divisible by {self.vision.num_heads} heads")

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches


PRESETS: dict[str, Pi0Dims] = {
    # PaliGemma 3B (SigLIP So400m/14 + Gemma 2B) and the Gemma 300M action expert.
    "pi0": Pi0Dims(
        vision=VisionDims(width=1152, depth=27, mlp_dim=4304, num_heads=16),
        language=GemmaDims(width=2048, depth=18, mlp_dim=16384, num_heads=8, head_dim=256),
        expert=GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, head_dim=256),
        vocab_size=257152,
    ),
    # openpi's "dummy" Gemma and "mu" SigLIP: the whole network in about a megabyte, for demos and tests.
    "pi0-dummy": Pi0Dims(
        vision=VisionDims(width=32, depth=2, mlp_dim=128, num_heads=2),
        language=GemmaDims(width=64, depth=4, mlp_dim=128, num_heads=8, head_dim=16),
        expert=GemmaDims(width=32, depth=4, mlp_dim=64, num_heads=8, head_dim=16),
        vocab_size=512,
    ),
    # Sized for training on a CPU (`pi0-sim train`): the same pieces, narrow and shallow (~3 M parameters).
    "pi0-cpu": Pi0Dims(
        # ViT-Ti's width (checkpoints load by it); 112 px: 64 patches, a quarter of 224's cost, and gym-aloha's
        # cube still covers about 4x4 pixels of the resized top camera.
        vision=VisionDims(width=192, depth=4, mlp_dim=768, num_heads=3, image_size=112),
        language=GemmaDims(width=128, depth=4, mlp_dim=256, num_heads=4, head_dim=32),
        expert=GemmaDims(width=64, depth=4, mlp_dim=128, num_heads=4, head_dim=32),
        vocab_size=512,
    ),
}
