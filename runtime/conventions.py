"""Each framework's conventions around the network, as named sets of data. A checkpoint's reader names
its set; the bundle carries the name; every transform reads the set, so two frameworks are never mixed.
When two frameworks disagree, both are right for their own checkpoints.

| what | lerobot-0.3 | openpi |
|---|---|---|
| image resize | bilinear on the float image, no antialias (`F.interpolate`) | Pillow's bilinear on the uint8 HWC image (antialiases when shrinking); an image already at size is not touched |
| padding | left and top, 0 (black) | centered (`int(pad / 2)` before), 0 (black) |
| a missing camera | refused (every input feature is required) | ALOHA wrists: a zero image with mask False (`AlohaInputs`) |
| MEAN_STD | `(x - mean) / (std + 1e-8)` | `(x - mean) / (std + 1e-6)` |
| quantiles | (LeRobot 0.3 has none) | `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1` (pi0.5) |
| prompt | text + "\\n" if missing, BOS first | stripped, `_`/newlines to spaces, BOS first, then the "\\n" token (pi0); pi0.5: `Task: ..., State: <bins>;\\nAction: ` |
| ALOHA gripper in | linear -> radians -> unit over (0.4, 1.5) | linear -> radians -> unit over (0.5476, 1.6296) |
| ALOHA gripper out | unit over (0.4, 1.5) -> radians -> unit over (-0.6213, 1.4910) | `x + 0.5476` -> unit over (-0.6213, 1.4910) |

Sources: LeRobot 0.3.3 `lerobot/policies/pi0/modeling_pi0.py` (resize_with_pad, aloha_gripper_*,
prepare_language), `lerobot/policies/normalize.py`; openpi `packages/openpi-client/src/openpi_client/image_tools.py`
(resize_with_pad), `src/openpi/policies/aloha_policy.py` (AlohaInputs/Outputs), `src/openpi/transforms.py`
(Normalize/Unnormalize), `src/openpi/models/tokenizer.py` (PaligemmaTokenizer.tokenize).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PadMode = Literal["left_top", "center"]
Resize = Literal["float-bilinear", "pil-bilinear"]
PromptStyle = Literal["lerobot", "openpi"]


@dataclass(frozen=True)
class Conventions:
    name: str
    resize: Resize
    pad: PadMode
    prompt: PromptStyle
    norm_eps: float  # added to std (MEAN_STD) or to q99 - q01 (quantiles)
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
    gripper_in=(0.4, 1.5),
    gripper_out=(0.4, 1.5),
    sources=("lerobot 0.3.3: lerobot/policies/pi0/modeling_pi0.py", "lerobot 0.3.3: lerobot/policies/normalize.py"),
)
OPENPI = Conventions(
    name="openpi",
    resize="pil-bilinear",
    pad="center",
    prompt="openpi",
    norm_eps=1e-6,
    gripper_in=(0.5476, 1.6296),
    gripper_out=(0.5476, 1.5476),
    sources=(
        "openpi: packages/openpi-client/src/openpi_client/image_tools.py",
        "openpi: src/openpi/policies/aloha_policy.py",
        "openpi: src/openpi/transforms.py",
        "openpi: src/openpi/models/tokenizer.py",
    ),
)
CONVENTIONS = {c.name: c for c in (LEROBOT_03, OPENPI)}


def conventions_named(name: str) -> Conventions:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown conventions {name!r}; this runtime knows {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]
