"""Action limits from the daemon's config: per-joint bounds and a maximum step between consecutive
actions of a chunk, in the robot's units (after de-normalization).

Violations are reported in the reply; the actions are changed only when `clamp` is set (an explicit
opt-in; the reply then says so). Non-finite actions never get this far: the engine refuses them.
The same [limits] table holds the state guard's settings (runtime.daemon.state_guard).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import ApplianceError

MAX_REPORTED = 16  # violations listed in a reply; the count covers them all
ACTION_SETTINGS = ("joint_min", "joint_max", "max_step", "clamp")  # the [limits] keys for actions


class LimitsConfigError(ApplianceError):
    """The [limits] settings do not fit the policy."""


@dataclass(frozen=True)
class ActionLimits:
    joint_min: np.ndarray | None = None
    joint_max: np.ndarray | None = None
    max_step: np.ndarray | None = None
    clamp: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], action_dim: int) -> ActionLimits:
        unknown = set(config) - set(ACTION_SETTINGS)
        if unknown:
            raise LimitsConfigError(f"unknown [limits] settings {sorted(unknown)}")
        arrays = {}
        for key in ("joint_min", "joint_max", "max_step"):
            value = config.get(key)
            if value is None:
                continue
            array = np.asarray(value, dtype=np.float32)
            if array.shape != (action_dim,) or not np.isfinite(array).all():
                raise LimitsConfigError(f"[limits] {key} must be {action_dim} finite numbers, one per action dimension")
            arrays[key] = array
        if "joint_min" in arrays and "joint_max" in arrays and (arrays["joint_min"] > arrays["joint_max"]).any():
            raise LimitsConfigError("[limits] joint_min must not exceed joint_max")
        if "max_step" in arrays and (arrays["max_step"] <= 0).any():
            raise LimitsConfigError("[limits] max_step must be positive")
        clamp = config.get("clamp", False)
        if not isinstance(clamp, bool):
            raise LimitsConfigError("[limits] clamp must be true or false")
        return cls(**arrays, clamp=clamp)

    @property
    def active(self) -> bool:
        return any(x is not None for x in (self.joint_min, self.joint_max, self.max_step))

    def apply(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """-> (actions, report). Without `clamp` the actions are returned as they are."""
        found: list[dict[str, Any]] = []
        out = actions.copy() if self.clamp else actions
        for step in range(len(out)):
            row = out[step]
            for kind, limit, bad in (
                ("joint_min", self.joint_min, None if self.joint_min is None else row < self.joint_min),
                ("joint_max", self.joint_max, None if self.joint_max is None else row > self.joint_max),
            ):
                if bad is None or not bad.any():
                    continue
                for joint in np.flatnonzero(bad):
                    found.append(
                        {
                            "kind": kind,
                            "step": step,
                            "joint": int(joint),
                            "value": float(row[joint]),
                            "limit": float(limit[joint]),
                        }
                    )
                if self.clamp:
                    row[bad] = limit[bad]
            if self.max_step is not None and step > 0:
                delta = row - out[step - 1]
                bad = np.abs(delta) > self.max_step
                for joint in np.flatnonzero(bad):
                    found.append(
                        {
                            "kind": "max_step",
                            "step": step,
                            "joint": int(joint),
                            "value": float(delta[joint]),
                            "limit": float(self.max_step[joint]),
                        }
                    )
                if self.clamp and bad.any():
                    row[bad] = out[step - 1][bad] + np.sign(delta[bad]) * self.max_step[bad]
        report = {"violations": len(found), "first": found[:MAX_REPORTED], "clamped": bool(self.clamp and found)}
        return out, report
