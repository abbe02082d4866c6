"""The flow-matching loop around a backend: the VLM once, then num_steps Euler steps of the expert."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from runtime.pipeline import ModelInputs
from runtime.transforms import euler_times


class Backend(Protocol):
    def prefix(self, inputs: ModelInputs) -> Any: ...

    def velocity(self, cache: Any, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray: ...


def sample(backend: Backend, inputs: ModelInputs, noise: np.ndarray, num_steps: int) -> np.ndarray:
    """x(t=1) = noise -> x(t=0): normalized, padded actions [1, chunk, max_action_dim]."""
    cache = backend.prefix(inputs)
    dt = np.float32(-1.0 / num_steps)
    x = np.asarray(noise, dtype=np.float32)
    for t in euler_times(num_steps):
        x = x + dt * backend.velocity(cache, inputs.state, x, np.array([t], dtype=np.float32))
    return x
