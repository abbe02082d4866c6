"""The transforms around the pi0 network, in numpy, written once.

The daemon calls them on every request and the exporter's PyTorch reference pipeline calls the very
same functions, so "the daemon preprocesses like the reference" holds by construction. Where the
frameworks differ, the conventions set (`runtime.bundle.conventions`) says which arithmetic applies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from runtime.bundle.conventions import Conventions, PadMode
from runtime.bundle.spec import NormStats

# --- images -------------------------------------------------------------------------------------


def to_chw(image: np.ndarray) -> np.ndarray:
    """Accept one image as HxWx3 or 3xHxW (the layouts robot cameras and LeRobot use); return CHW."""
    if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
        raise ValueError(f"expected an HxWx3 or 3xHxW image, got shape {image.shape}")
    if image.shape[0] == 3:
        return image
    return image.transpose(2, 0, 1)


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise ValueError(f"images must be uint8 or float in [0, 1], got {image.dtype}")


@functools.lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False, no antialias)."""
    scale = np.float32(in_size / out_size)
    # PyTorch computes scale * (i + 0.5) - 0.5 in float32 as one fused multiply-add (a single
    # rounding); float64 then one cast does the same. Two float32 roundings would move a source
    # coordinate near 300 by up to 3e-5 px, i.e. pixel values by ~1e-5.
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0.astype(np.float32)
    w0 = np.float32(1.0) - w1
    return i0, i1, w0, w1


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a CHW image (uint8, or float in [0, 1]) to float32 [0, 1] like
    `torch.nn.functional.interpolate(mode="bilinear")` on the float image.

    The four taps are gathered before the conversion to float: a camera frame is converted only where
    it is sampled (a third of a 480x640 frame for 224x224), with the same values, since gathering
    commutes with the elementwise conversion.
    """
    _, in_h, in_w = image.shape
    if (in_h, in_w) == (height, width):
        return to_unit_float(image)
    y0, y1, wy0, wy1 = _bilinear_taps(in_h, height)
    x0, x1, wx0, wx1 = _bilinear_taps(in_w, width)

    def blend_columns(rows: np.ndarray) -> np.ndarray:
        return to_unit_float(rows[:, :, x0]) * wx0 + to_unit_float(rows[:, :, x1]) * wx1

    top, bottom = blend_columns(image[:, y0, :]), blend_columns(image[:, y1, :])
    return top * wy0[:, None] + bottom * wy1[:, None]


def fitted_size(cur_h: int, cur_w: int, height: int, width: int) -> tuple[int, int]:
    """The size a cur_h x cur_w image is resized to inside height x width, keeping its aspect ratio
    (LeRobot's and openpi's arithmetic). An image so thin that a side would round to 0 is refused."""
    ratio = max(cur_w / width, cur_h / height)
    resized_h, resized_w = int(cur_h / ratio), int(cur_w / ratio)
    if min(resized_h, resized_w) < 1:
        raise ValueError(f"a {cur_h}x{cur_w} image fits {height}x{width} as {resized_h}x{resized_w}: too thin")
    return resized_h, resized_w


def resize_with_pad(image: np.ndarray, height: int, width: int, pad: PadMode, value: float = 0.0) -> np.ndarray:
    """Fit a CHW image (uint8, or float in [0, 1]) into height x width keeping its aspect ratio, as
    float32 [0, 1] padded with `value` (0: black; LeRobot >= 0.4 pads with -1 here, before its x * 2 - 1).

    LeRobot v0.3 pads on the left and top ("left_top"); LeRobot >= 0.4 both sides, the odd pixel at the
    bottom and right ("center").
    """
    _, cur_h, cur_w = image.shape
    resized_h, resized_w = fitted_size(cur_h, cur_w, height, width)
    resized = resize_bilinear(image, resized_h, resized_w)
    pad_h, pad_w = max(0, height - resized_h), max(0, width - resized_w)
    if pad == "left_top":
        top, left = pad_h, pad_w
    elif pad == "center":
        top, left = pad_h // 2, pad_w // 2
    else:
        raise ValueError(f"unknown pad mode {pad!r}")
    return np.pad(resized, ((0, 0), (top, pad_h - top), (left, pad_w - left)), constant_values=np.float32(value))


def resize_with_pad_pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi's resize_with_pad (openpi_client/image_tools.py): a uint8 HxWx3 image fitted into height x
    width with Pillow's bilinear filter (which antialiases when it shrinks) and pasted centered on black;
    an image already at that size is returned as it is. Pillow itself does the arithmetic."""
    from PIL import Image

    cur_h, cur_w = image.shape[:2]
    if (cur_h, cur_w) == (height, width):
        return image
    resized_h, resized_w = fitted_size(cur_h, cur_w, height, width)
    resized = np.asarray(Image.fromarray(image).resize((resized_w, resized_h), resample=Image.BILINEAR))
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = max(0, int((height - resized_h) / 2)), max(0, int((width - resized_w) / 2))
    out[top : top + resized_h, left : left + resized_w] = resized
    return out


def to_symmetric(image: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1], the range SigLIP takes."""
    return image * np.float32(2.0) - np.float32(1.0)


def prepare_image(image: np.ndarray, size: tuple[int, int], conventions: Conventions) -> np.ndarray:
    """One camera frame (uint8, HWC or CHW; LeRobot's path also takes float in [0, 1]) -> float32
    3xHxW in [-1, 1], resized and padded as the conventions say."""
    chw = to_chw(np.asarray(image))
    if conventions.resize == "pil-bilinear":
        if chw.dtype != np.uint8:
            raise ValueError(f"{conventions.name} resizes uint8 images, got {chw.dtype}")
        hwc = resize_with_pad_pil(np.ascontiguousarray(chw.transpose(1, 2, 0)), size[0], size[1])
        return to_symmetric(to_unit_float(hwc.transpose(2, 0, 1)))
    return to_symmetric(resize_with_pad(chw, size[0], size[1], conventions.pad, conventions.pad_value))


def empty_camera_image(size: tuple[int, int]) -> np.ndarray:
    """The image LeRobot feeds for an empty camera slot: all -1 (its mask is false)."""
    return np.full((3, size[0], size[1]), -1.0, dtype=np.float32)


# --- vectors ------------------------------------------------------------------------------------


def pad_vector(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to `dim` (state and actions are padded to the model's 32)."""
    if x.shape[-1] > dim:
        raise ValueError(f"vector of size {x.shape[-1]} does not fit in {dim}")
    widths = [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])]
    return np.pad(x.astype(np.float32, copy=False), widths)


def _quantile_range(stats: NormStats, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi - lo) over the first n dims, with the eps where the framework puts it."""
    lo, hi = (a[:n] for a in stats.arrays)
    span = hi - lo
    eps = np.float32(stats.eps)
    return lo, (np.where(span == 0, eps, span) if stats.eps_rule == "lerobot" else span + eps)


def normalize(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """mean_std: (x - mean) / (std + eps) (LeRobot's eps 1e-8, openpi's 1e-6); quantiles / quantile10:
    openpi's (x - q01) / (q99 - q01 + eps) * 2 - 1, LeRobot's 2 (x - lo) / (hi - lo) - 1."""
    n = x.shape[-1]
    two, one = np.float32(2.0), np.float32(1.0)
    if stats.mode == "mean_std":
        return ((x - stats.mean[:n]) / (stats.std[:n] + np.float32(stats.eps))).astype(np.float32)
    lo, span = _quantile_range(stats, n)
    if stats.eps_rule == "lerobot":
        return (two * (x - lo) / span - one).astype(np.float32)
    return ((x - lo) / span * two - one).astype(np.float32)


def unnormalize(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """Inverse of `normalize`; LeRobot's mean_std inverse multiplies by std alone."""
    n = x.shape[-1]
    two, one = np.float32(2.0), np.float32(1.0)
    if stats.mode == "mean_std":
        std = stats.std[:n] if stats.eps_rule == "lerobot" else stats.std[:n] + np.float32(stats.eps)
        return (x * std + stats.mean[:n]).astype(np.float32)
    lo, span = _quantile_range(stats, n)
    if stats.eps_rule == "lerobot":
        return ((x + one) * span / two + lo).astype(np.float32)
    return ((x + one) / two * span + lo).astype(np.float32)


def unnormalize_inv(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """Exact inverse of `unnormalize` (robot-space actions back into the model's space)."""
    n = x.shape[-1]
    two, one = np.float32(2.0), np.float32(1.0)
    if stats.mode == "mean_std":
        std = stats.std[:n] if stats.eps_rule == "lerobot" else stats.std[:n] + np.float32(stats.eps)
        return ((x - stats.mean[:n]) / std).astype(np.float32)
    lo, span = _quantile_range(stats, n)
    return ((x - lo) * two / span - one).astype(np.float32)


# --- ALOHA conventions (LeRobot's adapt_to_pi_aloha, openpi's AlohaInputs/Outputs(adapt_to_pi=True)) ---
# ALOHA reports grippers as linear positions and some joints with the opposite sign to the ones pi0
# was pretrained with. Indices are for the 14-dim bimanual state: 6 joints + gripper, twice. The two
# frameworks read the gripper's angular range differently (runtime.bundle.conventions: gripper_in/out).

ALOHA_FLIPPED_JOINTS = (1, 2, 8, 9)
ALOHA_GRIPPERS = (6, 13)
ALOHA_GRIPPER_JOINT = (-0.6213, 1.4910)  # PUPPET_GRIPPER_JOINT_OPEN/CLOSE of the ALOHA code


def _to_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (x - lo) / (hi - lo)


def _from_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return x * (hi - lo) + lo


def aloha_gripper_to_angular(x: np.ndarray, angular: tuple[float, float]) -> np.ndarray:
    """ALOHA's linear gripper position -> pi0's angular space, normalized to [0, 1] over `angular`."""
    # PUPPET_GRIPPER_POSITION_OPEN/CLOSED of the ALOHA code.
    linear = _from_unit(x, 0.01844, 0.05800)
    # Inverse of Interbotix's angular-to-linear transform (arm length 0.036, horn radius 0.022).
    arm, horn = 0.036, 0.022
    radians = np.arcsin(np.clip((horn**2 + linear**2 - arm**2) / (2 * horn * linear), -1.0, 1.0))
    return _to_unit(radians, *angular)


def aloha_gripper_from_angular(x: np.ndarray, angular: tuple[float, float]) -> np.ndarray:
    """pi0's gripper value, read over `angular` -> ALOHA's gripper joint range."""
    return _to_unit(_from_unit(x, *angular), *ALOHA_GRIPPER_JOINT)


def aloha_gripper_from_angular_inv(x: np.ndarray, angular: tuple[float, float]) -> np.ndarray:
    """Exact inverse of `aloha_gripper_from_angular` (for training targets)."""
    return _to_unit(_from_unit(x, *ALOHA_GRIPPER_JOINT), *angular)


def _aloha_map(x: np.ndarray, gripper_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = np.array(x, dtype=np.float32, copy=True)
    out[..., list(ALOHA_FLIPPED_JOINTS)] *= -1
    for i in ALOHA_GRIPPERS:
        out[..., i] = gripper_fn(out[..., i])
    return out


def aloha_decode_state(state: np.ndarray, conventions: Conventions) -> np.ndarray:
    """ALOHA state -> pi0 state (before normalization)."""
    return _aloha_map(state, lambda g: aloha_gripper_to_angular(g, conventions.gripper_in))


def aloha_encode_actions(actions: np.ndarray, conventions: Conventions) -> np.ndarray:
    """pi0 actions (after de-normalization) -> ALOHA commands."""
    return _aloha_map(actions, lambda g: aloha_gripper_from_angular(g, conventions.gripper_out))


def aloha_encode_actions_inv(actions: np.ndarray, conventions: Conventions) -> np.ndarray:
    """ALOHA commands -> pi0 actions: the inverse of `aloha_encode_actions`."""
    return _aloha_map(actions, lambda g: aloha_gripper_from_angular_inv(g, conventions.gripper_out))


# --- pi0.5: the state as prompt tokens ----------------------------------------------------------


def discretize_state(state: np.ndarray) -> np.ndarray:
    """openpi's pi0.5 bins of the normalized state: `np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1`,
    -1 below -1 and 255 at or above the top bin's start (models/tokenizer.py)."""
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


# --- flow matching ------------------------------------------------------------------------------


def euler_times(num_steps: int) -> list[np.float32]:
    """The times pi0's sampler visits: t = 1, 1 + dt, ... down to dt, accumulated in float32 as
    LeRobot does (`while time >= -dt / 2: ...; time += dt`), with dt = -1 / num_steps."""
    dt = np.float32(-1.0 / num_steps)
    t, times = np.float32(1.0), []
    while t >= -dt / 2:
        times.append(t)
        t = np.float32(t + dt)
    return times
