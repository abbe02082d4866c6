"""Random-weight pi0 policies with built-in dimensions: `pi0` (real size) and `pi0-dummy` (tiny).

Their data conventions are those of ALOHA in simulation (gym-aloha): one 480x640 `top` camera and
two empty slots, a 14-dim state and action, ALOHA's joint and gripper conventions, chunks of 50,
10 flow steps. Nothing was trained, but the normalization statistics are real ones: those of the
scripted oracle's transfer-cube demonstrations (`assets/aloha_sim_stats.json`, made by
`pi0-sim record --episodes 10 --out D && pi0-sim stats D --out ...`), so the random network's actions
land around the robot's working poses, as a fine-tuned checkpoint's would, and the sim stays stable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exporter.checkpoint import LoadedPolicy
from exporter.dims import PRESETS
from exporter.pi0 import Pi0
from runtime.bundle.conventions import LEROBOT_03
from runtime.bundle.spec import NormStats, PolicySpec

ALOHA_DIM = 14
ALOHA_SIM_STATS = Path(__file__).parent / "assets" / "aloha_sim_stats.json"


def preset_spec(max_state_dim: int = 32, max_action_dim: int = 32, image_size: int = 224) -> PolicySpec:
    stats = json.loads(ALOHA_SIM_STATS.read_text())
    return PolicySpec(
        conventions=LEROBOT_03.name,
        camera_keys=("observation.images.top",),
        camera_shapes=((3, 480, 640),),
        empty_cameras=2,
        image_size=(image_size, image_size),
        state_dim=ALOHA_DIM,
        action_dim=ALOHA_DIM,
        max_state_dim=max_state_dim,
        max_action_dim=max_action_dim,
        chunk_size=50,
        num_steps=10,
        tokenizer_max_length=48,
        adapt_to_pi_aloha=True,
        state_norm=NormStats.from_dict(stats["observation.state"]),
        action_norm=NormStats.from_dict(stats["action"]),
    )


def build_preset(name: str, seed: int = 0) -> LoadedPolicy:
    """A pi0 with PyTorch's default initialization under `seed`, in float32."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    torch.manual_seed(seed)
    model = Pi0(PRESETS[name]).eval().requires_grad_(False)
    spec = preset_spec(image_size=PRESETS[name].vision.image_size)
    return LoadedPolicy(model=model, spec=spec, source=f"preset:{name}")
