"""Random-weight pi0 policies with built-in dimensions: `pi0` (real size) and `pi0-dummy` (tiny).

Their data conventions are those of ALOHA in simulation (gym-aloha): one 480x640 `top` camera and
two empty slots, a 14-dim state and action, ALOHA's joint and gripper conventions, chunks of 50,
10 flow steps. The statistics are the identity (mean 0, std 1): nothing was trained.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.checkpoint import LoadedPolicy
from exporter.dims import PRESETS
from exporter.pi0 import Pi0
from runtime.spec import NormStats, PolicySpec

ALOHA_DIM = 14


def preset_spec(max_state_dim: int = 32, max_action_dim: int = 32) -> PolicySpec:
    identity = NormStats(mean=np.zeros(ALOHA_DIM), std=np.ones(ALOHA_DIM), eps=1e-8)
    return PolicySpec(
        camera_keys=("observation.images.top",),
        camera_shapes=((3, 480, 640),),
        empty_cameras=2,
        image_size=(224, 224),
        image_pad="left_top",
        state_dim=ALOHA_DIM,
        action_dim=ALOHA_DIM,
        max_state_dim=max_state_dim,
        max_action_dim=max_action_dim,
        chunk_size=50,
        num_steps=10,
        tokenizer_max_length=48,
        prompt_style="lerobot",
        adapt_to_pi_aloha=True,
        state_norm=identity,
        action_norm=identity,
    )


def build_preset(name: str, seed: int = 0) -> LoadedPolicy:
    """A pi0 with PyTorch's default initialization under `seed`, in float32."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    torch.manual_seed(seed)
    model = Pi0(PRESETS[name]).eval().requires_grad_(False)
    return LoadedPolicy(model=model, spec=preset_spec(), source=f"preset:{name}")
