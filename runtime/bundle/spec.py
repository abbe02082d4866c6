"""What surrounds the network: the policy's input/output conventions, as plain data.

A `PolicySpec` is read from a checkpoint by the exporter and written into the bundle manifest; the
runtime rebuilds it from JSON with nothing but numpy. Every transform in `runtime.pipeline.transforms` is
parameterized by it and by its named conventions set (`runtime.bundle.conventions`), so the exporter's
reference pipeline and the daemon agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from runtime.bundle.conventions import Conventions, conventions_named

NormMode = Literal["mean_std", "quantiles", "quantile10"]
# Which state delta (relative) actions are relative to: openpi's AbsoluteActions adds the state after the
# robot's input adapter (AlohaInputs' decoded joints and grippers), before normalization; LeRobot 0.6's
# AbsoluteActionsProcessorStep the raw state the robot sent (LeRobot has no input adapter).
DeltaReference = Literal["adapted_state", "raw_state"]
EpsRule = Literal["add", "lerobot"]
STATS_OF_MODE = {"mean_std": ("mean", "std"), "quantiles": ("q01", "q99"), "quantile10": ("q10", "q90")}


def _vector(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float32).reshape(-1)


@dataclass(frozen=True, eq=False)
class NormStats:
    """mean_std: `(x - mean) / (std + eps)`; quantiles (q01, q99) and quantile10 (q10, q90): `(x - lo) /
    (hi - lo) * 2 - 1`. Where the eps goes is the framework's (`eps_rule`): openpi's "add" puts it on both
    sides of mean_std and into every quantile range; LeRobot's "lerobot" leaves it out of the inverse of
    mean_std and uses it only in place of a zero quantile range. `unnormalize` is the inverse of each."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    eps: float = 0.0
    mode: NormMode = "mean_std"
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    q10: np.ndarray | None = None
    q90: np.ndarray | None = None
    eps_rule: EpsRule = "add"

    def __post_init__(self) -> None:
        for name in ("mean", "std", "q01", "q99", "q10", "q90"):
            object.__setattr__(self, name, _vector(getattr(self, name)))
        if self.mode not in STATS_OF_MODE:
            raise ValueError(f"normalization mode must be one of {sorted(STATS_OF_MODE)}, not {self.mode!r}")
        if self.eps_rule not in ("add", "lerobot"):
            raise ValueError(f"eps_rule must be 'add' or 'lerobot', not {self.eps_rule!r}")
        a, b = self.arrays
        if a is None or b is None:
            raise ValueError(f"{self.mode} normalization needs {' and '.join(STATS_OF_MODE[self.mode])}")
        if a.shape != b.shape:
            raise ValueError(f"normalization statistics of shapes {a.shape} and {b.shape} differ")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError("normalization statistics contain non-finite values (never set?)")

    @property
    def arrays(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(mean, std), (q01, q99) or (q10, q90): the two the mode uses."""
        first, second = STATS_OF_MODE[self.mode]
        return getattr(self, first), getattr(self, second)

    @property
    def size(self) -> int:
        return int(self.arrays[0].shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NormStats):
            return NotImplemented
        return (self.mode, self.eps, self.eps_rule) == (other.mode, other.eps, other.eps_rule) and all(
            np.array_equal(a, b) for a, b in zip(self.arrays, other.arrays, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        a, b = self.arrays
        first, second = STATS_OF_MODE[self.mode]
        return {"mode": self.mode, first: a.tolist(), second: b.tolist(), "eps": self.eps, "eps_rule": self.eps_rule}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        arrays = {k: d.get(k) for k in ("mean", "std", "q01", "q99", "q10", "q90")}
        return cls(**arrays, eps=float(d["eps"]), mode=d.get("mode", "mean_std"), eps_rule=d.get("eps_rule", "add"))


@dataclass(frozen=True)
class PolicySpec:
    """Everything the pipeline needs to know that is not a network weight.

    camera_keys are the cameras a client sends, in the order of the model's camera slots; a key in
    `optional_cameras` may be left out (its slot is then an empty image with a false mask, as openpi's
    ALOHA inputs do). `empty_cameras` slots follow them, always empty (LeRobot's convention).
    chunk_size is the number of action tokens the model denoises per call. `state_in_prompt` (pi0.5):
    the normalized state reaches the model as discretized tokens in the prompt.
    `delta_action_mask` (delta / relative actions): True for each action dim the model predicts relative
    to the state (the same dim of the state `delta_reference` names), False for an absolute one (a
    gripper); dims past its length are absolute. None: every dim absolute.
    """

    conventions: str  # the name of a set in runtime.bundle.conventions
    camera_keys: tuple[str, ...]
    camera_shapes: tuple[tuple[int, int, int], ...]  # source shapes, CHW
    empty_cameras: int
    image_size: tuple[int, int]  # (height, width) the vision tower takes
    state_dim: int
    action_dim: int
    max_state_dim: int
    max_action_dim: int
    chunk_size: int
    num_steps: int
    tokenizer_max_length: int
    adapt_to_pi_aloha: bool
    state_norm: NormStats | None = field(default=None)
    action_norm: NormStats | None = field(default=None)
    optional_cameras: tuple[str, ...] = ()
    state_in_prompt: bool = False
    delta_action_mask: tuple[bool, ...] | None = None
    delta_reference: DeltaReference = "adapted_state"

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_keys", tuple(self.camera_keys))
        if self.delta_action_mask is not None:
            object.__setattr__(self, "delta_action_mask", tuple(bool(v) for v in self.delta_action_mask))
        object.__setattr__(self, "optional_cameras", tuple(self.optional_cameras))
        object.__setattr__(self, "camera_shapes", tuple(tuple(int(v) for v in s) for s in self.camera_shapes))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        conventions_named(self.conventions)
        if len(self.camera_keys) != len(self.camera_shapes):
            raise ValueError("camera_keys and camera_shapes differ in length")
        if not self.camera_keys or set(self.camera_keys) <= set(self.optional_cameras):
            raise ValueError("a pi0 policy needs at least one camera that is always sent")
        if not set(self.optional_cameras) <= set(self.camera_keys):
            raise ValueError(f"optional cameras {self.optional_cameras} are not among {self.camera_keys}")
        if self.state_dim > self.max_state_dim or self.action_dim > self.max_action_dim:
            raise ValueError(
                f"state/action dims ({self.state_dim}, {self.action_dim}) exceed the model's padded "
                f"dims ({self.max_state_dim}, {self.max_action_dim})"
            )
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, not {self.num_steps}")
        if self.adapt_to_pi_aloha and (self.state_dim != 14 or self.action_dim != 14):
            raise ValueError("adapt_to_pi_aloha needs the 14-dim ALOHA state and action")
        if self.state_in_prompt and self.state_norm is None:
            raise ValueError("a state given as prompt tokens is discretized after normalization: it needs statistics")
        self._check_delta_actions()
        for name, stats, dim in (
            ("state", self.state_norm, self.state_dim),
            ("action", self.action_norm, self.action_dim),
        ):
            if stats is not None and stats.size < dim:
                raise ValueError(f"{name} statistics have {stats.size} entries, need {dim}")

    def _check_delta_actions(self) -> None:
        if self.delta_reference not in ("adapted_state", "raw_state"):
            raise ValueError(f"delta_reference must be 'adapted_state' or 'raw_state', not {self.delta_reference!r}")
        mask = self.delta_action_mask
        if mask is None:
            return
        if len(mask) > min(self.action_dim, self.state_dim):
            raise ValueError(
                f"the delta action mask has {len(mask)} entries; the actions have {self.action_dim} dims and the "
                f"state {self.state_dim}: each relative dim needs both"
            )
        if self.delta_reference == "raw_state" and self.adapt_to_pi_aloha:
            raise ValueError("actions relative to the raw state with ALOHA's input adapter: no framework does that")

    @property
    def delta_dims(self) -> tuple[int, ...]:
        """The action dims predicted relative to the state."""
        return tuple(i for i, relative in enumerate(self.delta_action_mask or ()) if relative)

    @property
    def convention_set(self) -> Conventions:
        return conventions_named(self.conventions)

    @property
    def prompt_state_dim(self) -> int:
        """How many state values a pi0.5 prompt writes (see `runtime.pipeline.model_io.prompt_state`)."""
        return self.max_state_dim if self.convention_set.prompt_state == "padded" else self.state_dim

    @property
    def num_camera_slots(self) -> int:
        return len(self.camera_keys) + self.empty_cameras

    def to_dict(self) -> dict[str, Any]:
        return {
            "conventions": self.conventions,
            "camera_keys": list(self.camera_keys),
            "camera_shapes": [list(s) for s in self.camera_shapes],
            "optional_cameras": list(self.optional_cameras),
            "empty_cameras": self.empty_cameras,
            "image_size": list(self.image_size),
            "state_dim": self.state_dim,
            "action_dim": self.action_dim,
            "max_state_dim": self.max_state_dim,
            "max_action_dim": self.max_action_dim,
            "chunk_size": self.chunk_size,
            "num_steps": self.num_steps,
            "tokenizer_max_length": self.tokenizer_max_length,
            "state_in_prompt": self.state_in_prompt,
            "adapt_to_pi_aloha": self.adapt_to_pi_aloha,
            "state_norm": None if self.state_norm is None else self.state_norm.to_dict(),
            "action_norm": None if self.action_norm is None else self.action_norm.to_dict(),
            "delta_action_mask": None if self.delta_action_mask is None else list(self.delta_action_mask),
            "delta_reference": self.delta_reference,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicySpec:
        d = dict(d)
        for key in ("state_norm", "action_norm"):
            d[key] = None if d.get(key) is None else NormStats.from_dict(d[key])
        d["camera_shapes"] = tuple(tuple(s) for s in d["camera_shapes"])
        return cls(**d)
