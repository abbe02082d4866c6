"""A guard against a state the policy never saw in training: the wrong statistics' mistakes at serve time.

Each `infer` request's state is normalized with the bundle's training statistics (`PolicySpec.state_norm`),
as the engine will normalize it (`runtime.pipeline.model_io.model_state`: a few floats), and each dimension
is held to a bound on the normalized value:
- mean_std: |z| <= `state_max_z` (default 10);
- quantiles (q01..q99) and quantile10 (q10..q90): the statistics' range maps to [-1, 1], so the bound is
  a margin beyond it: |v| <= 1 + `state_quantile_margin` (default 3, i.e. |v| <= 4).

What it catches: a state in degrees instead of radians (x 57.3: any joint a few degrees from 0 lands
tens to hundreds of standard deviations out); a state normalized by the client and then again here, where
the statistics are far from mean 0 / std 1 (the second z-score lands near -mean/std, with the spread of
1/std); a wrong unit or offset of the same size. What it cannot: a state normalized twice where the
statistics are close to mean 0 / std 1 (it lands where a raw state would), and any mistake smaller than
the bound. A dimension constant in training (spread <= CONSTANT_SPREAD: its normalization divides by eps)
is not checked, nor those in `state_ignore`.

`out_of_range = "warn"` (default): the reply keeps its actions and names the dimensions; "refuse": an
`out_of_range` refusal, nothing reaches the robot; "off": no check. Settings in the config's [limits].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.bundle.spec import PolicySpec
from runtime.daemon.limits import MAX_REPORTED, LimitsConfigError
from runtime.pipeline.model_io import model_state

MODES = ("warn", "refuse", "off")
# mean_std: a legitimate state beyond 10 standard deviations is rare for any distribution (Chebyshev: at
# most 1 % of the training states; for a skewed dimension only a pose held in under 1 % of the data),
# while degrees for radians put a joint at 0.2 rad (11.5 deg) with std 0.5 at z = 23.
DEFAULT_MAX_Z = 10.0
# quantiles: |v| <= 4 is 1.5 widths of the q01..q99 range beyond its end (a Gaussian's 9 sigma); quantile10's
# q10..q90 is narrower (a Gaussian's 5 sigma at |v| = 4).
DEFAULT_QUANTILE_MARGIN = 3.0
CONSTANT_SPREAD = 1e-6  # std, or hi - lo, at or below this: the dimension never moved in training
SETTINGS = ("out_of_range", "state_max_z", "state_quantile_margin", "state_ignore")


@dataclass(frozen=True)
class StateRangeSettings:
    """The [limits] settings of the state guard, before the policy is known."""

    mode: str = "warn"
    max_z: float = DEFAULT_MAX_Z
    quantile_margin: float = DEFAULT_QUANTILE_MARGIN
    ignore: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StateRangeSettings:
        """The state guard's keys of the [limits] table (others are refused)."""
        unknown = set(config) - set(SETTINGS)
        if unknown:
            raise LimitsConfigError(f"unknown [limits] settings {sorted(unknown)}")
        mode = config.get("out_of_range", "warn")
        if mode not in MODES:
            raise LimitsConfigError(f"[limits] out_of_range must be one of {list(MODES)}, not {mode!r}")
        numbers = {}
        for key, default in (("state_max_z", DEFAULT_MAX_Z), ("state_quantile_margin", DEFAULT_QUANTILE_MARGIN)):
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
                raise LimitsConfigError(f"[limits] {key} must be a positive number, not {value!r}")
            numbers[key] = float(value)
        ignore = config.get("state_ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ignore):
            raise LimitsConfigError("[limits] state_ignore must be a list of state dimension indices (integers)")
        return cls(mode, numbers["state_max_z"], numbers["state_quantile_margin"], tuple(sorted(set(ignore))))


class StateGuard:
    """The check for one policy: `check(state)` -> a report of the dimensions out of range, or None."""

    def __init__(self, spec: PolicySpec, settings: StateRangeSettings) -> None:
        if spec.state_norm is None:
            raise ValueError("a state guard needs the policy's state statistics")
        bad = [i for i in settings.ignore if not 0 <= i < spec.state_dim]
        if bad:
            raise LimitsConfigError(f"[limits] state_ignore {bad}: this policy's state has {spec.state_dim} dims")
        self.spec, self.settings = spec, settings
        stats = spec.state_norm
        self.norm = stats.mode
        self.bound = settings.max_z if stats.mode == "mean_std" else 1.0 + settings.quantile_margin
        first, second = (a[: spec.state_dim] for a in stats.arrays)
        spread = second if stats.mode == "mean_std" else second - first
        self.checked = spread > CONSTANT_SPREAD
        self.checked[list(settings.ignore)] = False

    @classmethod
    def for_engine(cls, engine: Any, settings: StateRangeSettings) -> StateGuard | None:
        """The guard for what the daemon serves: None when turned off, or when the engine has no policy
        spec with state statistics (the sim's scripted oracle; a policy without state normalization)."""
        spec = getattr(engine, "spec", None)
        if settings.mode == "off" or not isinstance(spec, PolicySpec) or spec.state_norm is None:
            return None
        return cls(spec, settings)

    @property
    def refuses(self) -> bool:
        return self.settings.mode == "refuse"

    def describe(self) -> str:
        what = "|z|" if self.norm == "mean_std" else "|normalized|"
        skipped = int(self.spec.state_dim - self.checked.sum())
        unchecked = f", {skipped} dim(s) unchecked" if skipped else ""
        return f"state range: {self.settings.mode} beyond {what} {self.bound:g} ({self.norm} statistics){unchecked}"

    def check(self, state: Any) -> dict[str, Any] | None:
        """The robot's raw state -> None when every checked dimension is within the bound (or the state is
        one the engine refuses anyway: wrong size or dtype, NaN/inf), else the report for the reply:
        {"action", "norm", "bound", "count", "dims": [up to 16 of {"index", "value", "normalized", "bound"}]}."""
        raw = np.asarray(state)
        if raw.size != self.spec.state_dim or not np.issubdtype(raw.dtype, np.floating):
            return None
        raw = raw.reshape(-1)
        if not np.isfinite(raw).all():
            return None
        with np.errstate(all="ignore"):
            normalized = model_state(self.spec, raw)
        out = self.checked & ~(np.abs(normalized) <= self.bound)  # NaN counts as out
        if not out.any():
            return None
        dims = [
            {"index": int(i), "value": float(raw[i]), "normalized": float(normalized[i]), "bound": self.bound}
            for i in np.flatnonzero(out)
        ]
        return {
            "action": self.settings.mode,
            "norm": self.norm,
            "bound": self.bound,
            "count": len(dims),
            "dims": dims[:MAX_REPORTED],
        }
