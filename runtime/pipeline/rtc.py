"""Real-time chunking without gradients: the new chunk joins the one the robot is still executing.

While a chunk is computed (d control steps), the robot keeps executing the previous chunk, so the new
chunk's first d actions are already decided: they are the previous chunk's. RTC (Black et al., 2025,
"Real-Time Execution of Action Chunking Flow Policies") guides the flow towards them with a
vector-Jacobian product, which needs gradients through the expert at every step; our expert is a fixed
forward graph (ONNX/OM). Instead, between steps, on the host, the Euler loop inpaints: x_t is pulled
towards where the previous actions A would be at time t on the flow's straight path, t * noise +
(1 - t) * A, with the RTC paper's weights: 1 on the first d actions (hard: at t = 0 they are A
exactly), an exponentially decaying weight over the rest of the overlap, 0 beyond it. The expert graph
is unchanged and the cost is a few vector operations per step, for pi0 and pi0.5 alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def rtc_weights(delay: int, overlap: int, horizon: int) -> np.ndarray:
    """[horizon] guidance weights: 1 for i < delay; c (e^c - 1) / (e - 1) with c = (overlap - i) /
    (overlap - delay + 1) for delay <= i < overlap (the RTC paper's soft mask); 0 from overlap on."""
    i = np.arange(horizon, dtype=np.float64)
    c = (overlap - i) / (overlap - delay + 1)
    soft = c * np.expm1(c) / (math.e - 1)
    weights = np.where(i < delay, 1.0, np.where(i < overlap, soft, 0.0))
    return weights.astype(np.float32)


@dataclass(frozen=True)
class Inpainting:
    """Holds a chunk to the previous one: `target` [1, H, A] (the previous actions in the model's
    space, zero where there are none), `weights` [H], `noise` x(t=1)."""

    target: np.ndarray
    weights: np.ndarray
    noise: np.ndarray

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """x at time t -> x pulled towards t * noise + (1 - t) * target by the weights."""
        w = self.weights[None, :, None]
        return (w * (t * self.noise + (1.0 - t) * self.target) + (1.0 - w) * x).astype(np.float32)


def inpainting(prev_model: np.ndarray, delay: int, horizon: int, noise: np.ndarray) -> Inpainting:
    """`prev_model` [R, A]: the previous chunk's remaining actions in the model's space (R <= horizon)."""
    overlap = prev_model.shape[0]
    target = np.zeros_like(noise)
    target[0, :overlap] = prev_model
    return Inpainting(target, rtc_weights(delay, overlap, horizon), noise)
