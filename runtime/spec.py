"""What surrounds the network: the policy's input/output conventions, as plain data.

A `PolicySpec` is read from a checkpoint by the exporter and written into the bundle manifest; the
runtime rebuilds it from JSON with nothing but numpy. Every transform in `runtime.transforms` is
parameterized by it, so the exporter's reference pipeline and the daemon agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

PadMode = Literal["left_top", "center"]
PromptStyle = Literal["lerobot", "openpi"]


@dataclass(frozen=True, eq=False)
class NormStats:
    """MEAN_STD statistics: `normalize(x) = (x - mean) / (std + eps)`, `unnormalize` its inverse."""

    mean: np.ndarray
    std: np.ndarray
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", np.asarray(self.mean, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "std", np.asarray(self.std, dtype=np.float32).reshape(-1))
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean {self.mean.shape} and std {self.std.shape} differ in shape")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()):
            raise ValueError("normalization statistics contain non-finite values (never set?)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NormStats):
            return NotImplemented
        return self.eps == other.eps and np.array_equal(self.mean, other.mean) and np.array_equal(self.std, other.std)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "eps": self.eps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        return cls(mean=np.asarray(d["mean"]), std=np.asarray(d["std"]), eps=float(d["eps"]))


@dataclass(frozen=True)
class PolicySpec:
    """Everything the pipeline needs to know that is not a network weight.

    camera_keys are the cameras a client sends, in the order the model sees them; `empty_cameras`
    slots follow them, fed as images of -1 with a false mask (LeRobot's convention).
    chunk_size is the number of action tokens the model denoises per call.
    """

    camera_keys: tuple[str, ...]
    camera_shapes: tuple[tuple[int, int, int], ...]  # source shapes, CHW
    empty_cameras: int
    image_size: tuple[int, int]  # (height, width) the vision tower takes
    image_pad: PadMode
    state_dim: int
    action_dim: int
    max_state_dim: int
    max_action_dim: int
    chunk_size: int
    num_steps: int
    tokenizer_max_length: int
    prompt_style: PromptStyle
    adapt_to_pi_aloha: bool
    state_norm: NormStats | None = field(default=None)
    action_norm: NormStats | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_keys", tuple(self.camera_keys))
        object.__setattr__(self, "camera_shapes", tuple(tuple(int(v) for v in s) for s in self.camera_shapes))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if len(self.camera_keys) != len(self.camera_shapes):
            raise ValueError("camera_keys and camera_shapes differ in length")
        if not self.camera_keys:
            raise ValueError("a pi0 policy needs at least one camera")
        if self.image_pad not in ("left_top", "center"):
            raise ValueError(f"image_pad must be 'left_top' or 'center', not {self.image_pad!r}")
        if self.prompt_style not in ("lerobot", "openpi"):
            raise ValueError(f"prompt_style must be 'lerobot' or 'openpi', not {self.prompt_style!r}")
        if self.state_dim > self.max_state_dim or self.action_dim > self.max_action_dim:
            raise ValueError(
                f"state/action dims ({self.state_dim}, {self.action_dim}) exceed the model's padded "
                f"dims ({self.max_state_dim}, {self.max_action_dim})"
            )
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, not {self.num_steps}")
        if self.adapt_to_pi_aloha and (self.state_dim != 14 or self.action_dim != 14):
            raise ValueError("adapt_to_pi_aloha needs the 14-dim ALOHA state and action")
        for name, stats, dim in (
            ("state", self.state_norm, self.state_dim),
            ("action", self.action_norm, self.action_dim),
        ):
            if stats is not None and stats.mean.shape[0] < dim:
                raise ValueError(f"{name} statistics have {stats.mean.shape[0]} entries, need {dim}")

    @property
    def num_camera_slots(self) -> int:
        return len(self.camera_keys) + self.empty_cameras

    def to_dict(self) -> dict[str, Any]:
        return {
            "camera_keys": list(self.camera_keys),
            "camera_shapes": [list(s) for s in self.camera_shapes],
            "empty_cameras": self.empty_cameras,
            "image_size": list(self.image_size),
            "image_pad": self.image_pad,
            "state_dim": self.state_dim,
            "action_dim": self.action_dim,
            "max_state_dim": self.max_state_dim,
            "max_action_dim": self.max_action_dim,
            "chunk_size": self.chunk_size,
            "num_steps": self.num_steps,
            "tokenizer_max_length": self.tokenizer_max_length,
            "prompt_style": self.prompt_style,
            "adapt_to_pi_aloha": self.adapt_to_pi_aloha,
            "state_norm": None if self.state_norm is None else self.state_norm.to_dict(),
            "action_norm": None if self.action_norm is None else self.action_norm.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicySpec:
        d = dict(d)
        for key in ("state_norm", "action_norm"):
            d[key] = None if d.get(key) is None else NormStats.from_dict(d[key])
        d["camera_shapes"] = tuple(tuple(s) for s in d["camera_shapes"])
        return cls(**d)
