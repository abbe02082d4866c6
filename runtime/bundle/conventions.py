"""Each framework's conventions around the network, as named sets of data. A checkpoint's reader names
its set; the bundle carries the name; every transform reads the set, so two frameworks are never mixed.
When two frameworks disagree, both are right for their own checkpoints.

The whole table, each choice with the upstream file it comes from, is docs/conventions.md: image resize
and padding, what a missing camera becomes, the normalization arithmetic, the prompt's format, pi0.5's
state in the prompt, ALOHA's joint and gripper maps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

PadMode = Literal["left_top", "center"]
Resize = Literal["float-bilinear", "pil-bilinear"]
PromptStyle = Literal["lerobot", "openpi"]
PromptState = Literal["robot", "padded"]


@dataclass(frozen=True)
class Conventions:
    name: str
    resize: Resize
    pad: PadMode
    prompt: PromptStyle
    norm_eps: float  # the default eps of its normalization (a checkpoint may state its own)
    pad_value: float  # what resize-with-pad fills with, in [0, 1] units (before the scaling to [-1, 1])
    prompt_state: PromptState  # pi0.5: the state's values written into the prompt (the robot's, or padded)
    # ALOHA grippers (with adapt_to_pi_aloha): the angular range the normalized gripper input is scaled
    # over, and the one the model's gripper output is read in (openpi's output is only shifted: width 1).
    gripper_in: tuple[float, float]
    gripper_out: tuple[float, float]
    sources: tuple[str, ...]


LEROBOT_03 = Conventions(
    name="lerobot-0.3",
    resize="float-bilinear",
    pad="left_top",
    prompt="lerobot",
    norm_eps=1e-8,
    pad_value=0.0,
    prompt_state="robot",
    gripper_in=(0.4, 1.5),
    gripper_out=(0.4, 1.5),
    sources=("lerobot 0.3.3: lerobot/policies/pi0/modeling_pi0.py", "lerobot 0.3.3: lerobot/policies/normalize.py"),
)
# LeRobot >= 0.4 keeps 0.3's resize arithmetic, prompt and eps; it pads evenly, with -1 before scaling,
# writes pi0.5's state padded, and has no ALOHA conversion (the gripper ranges are never read).
LEROBOT_04 = replace(
    LEROBOT_03,
    name="lerobot-0.4",
    pad="center",
    pad_value=-1.0,
    prompt_state="padded",
    sources=(
        "lerobot 0.4.4: lerobot/policies/pi0/modeling_pi0.py (resize_with_pad_torch, _preprocess_images)",
        "lerobot 0.4.4: lerobot/processor/normalize_processor.py",
        "lerobot 0.4.4: lerobot/policies/pi0/processor_pi0.py (pi0_new_line_processor)",
        "lerobot 0.4.4: lerobot/policies/pi05/processor_pi05.py (pi05_prepare_state_tokenizer_processor_step)",
    ),
)
# LeRobot >= 0.5 (0.5.x and 0.6.x) pads with 0 in [0, 1] units, as openpi does (the padded rows reach SigLIP
# as -1), and writes pi0.5's state into the prompt with the robot's own dims, not padded to max_state_dim.
LEROBOT_06 = replace(
    LEROBOT_04,
    name="lerobot-0.6",
    pad_value=0.0,
    prompt_state="robot",
    sources=(
        "lerobot 0.6.1: lerobot/policies/common/vla_utils.py (resize_with_pad_torch)",
        "lerobot 0.6.1: lerobot/policies/pi0/modeling_pi0.py (_preprocess_images)",
        "lerobot 0.6.1: lerobot/processor/normalize_processor.py",
        "lerobot 0.6.1: lerobot/policies/pi0/processor_pi0.py (pi0_new_line_processor)",
        "lerobot 0.6.1: lerobot/policies/pi05/processor_pi05.py (pi05_prepare_state_tokenizer_processor_step)",
        "lerobot 0.6.1: lerobot/processor/relative_action_processor.py (relative_actions_processor, "
        "absolute_actions_processor)",
    ),
)
OPENPI = Conventions(
    name="openpi",
    resize="pil-bilinear",
    pad="center",
    prompt="openpi",
    norm_eps=1e-6,
    pad_value=0.0,
    prompt_state="robot",
    gripper_in=(0.5476, 1.6296),
    gripper_out=(0.5476, 1.5476),
    sources=(
        "openpi: packages/openpi-client/src/openpi_client/image_tools.py",
        "openpi: src/openpi/policies/aloha_policy.py",
        "openpi: src/openpi/transforms.py",
        "openpi: src/openpi/models/tokenizer.py",
    ),
)
CONVENTIONS = {c.name: c for c in (LEROBOT_03, LEROBOT_04, LEROBOT_06, OPENPI)}


def conventions_named(name: str) -> Conventions:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown conventions {name!r}; this runtime knows {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]
