"""One observation, as every part of the system passes it: the client's request, the daemon's engine,
`pi0-runtime infer`'s .npz file, the sim and the scripted oracle.

Field names on the wire are `pi0_client.protocol`'s (LeRobot's feature names: `observation.images.<camera>`,
`observation.state`, `lang_tokens`, `lang_masks`, `noise`, `prev_actions`, and `prompt`, `seed`, `delay` in
the header). An array
that is none of the named fields is a camera frame, under whatever key the policy's conventions name its
cameras; whether the keys are the policy's own is for the engine to say, which knows them.

Only the kinds of the fields are checked here (a prompt is text, a seed an integer); shapes, dtypes and
values are validated once, by the engine that takes the observation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pi0_client.metadata import Metadata
from pi0_client.protocol import (
    DELAY,
    GUIDANCE_SCALE,
    NOISE,
    PREV_ACTIONS,
    PROMPT,
    SEED,
    STATE,
    TOKEN_MASK,
    TOKENS,
    split_observation,
)
from runtime.bundle.guidance import check_scale
from runtime.errors import ApplianceError
from runtime.pipeline.tokenizer import BOS_ID, PAD_ID

ARRAY_FIELDS = (STATE, TOKENS, TOKEN_MASK, NOISE, PREV_ACTIONS)


class ObservationError(ApplianceError):
    """A request that is not an observation; the message says what was expected."""


def guidance_scale(value: object) -> float | None:
    """A request's `guidance_scale` (None: not given) checked as a number in range, or ObservationError."""
    if value is None:
        return None
    try:
        return check_scale(value)
    except ValueError as e:
        raise ObservationError(str(e)) from e


@dataclass(frozen=True)
class Observation:
    images: dict[str, np.ndarray]  # camera key -> uint8 HxWx3 or 3xHxW (optional leading 1)
    state: np.ndarray  # the robot's raw state
    prompt: str | None = None
    tokens: np.ndarray | None = None  # instead of a prompt: [1, L] token ids
    token_mask: np.ndarray | None = None  # [1, L] bool, with `tokens`
    noise: np.ndarray | None = None  # x at t = 1, for alignment work; else drawn from `seed`
    seed: int | None = None
    # Real-time chunking: the previous chunk's actions not yet executed [R, action_dim] (robot units), and
    # the inference delay d in control steps: the new chunk's first d actions are those (runtime.pipeline.rtc).
    prev_actions: np.ndarray | None = None
    delay: int | None = None
    guidance_scale: float | None = None  # classifier-free guidance's beta; None: the bundle's default

    @classmethod
    def from_request(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Observation:
        """A decoded request (header, arrays by name) -> Observation, or ObservationError."""
        if STATE not in arrays:
            raise ObservationError(f"missing array {STATE!r}")
        prompt, seed = header.get(PROMPT), header.get(SEED)
        if prompt is not None and not isinstance(prompt, str):
            raise ObservationError(f"{PROMPT!r} must be a string")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise ObservationError(f"{SEED!r} must be a non-negative integer")
        delay = header.get(DELAY)
        if delay is not None and (not isinstance(delay, int) or isinstance(delay, bool) or delay < 0):
            raise ObservationError(f"{DELAY!r} must be a non-negative integer (control steps)")
        if (delay is None) != (PREV_ACTIONS not in arrays):
            raise ObservationError(f"real-time chunking needs both {PREV_ACTIONS!r} and {DELAY!r}")
        return cls(
            images={k: v for k, v in arrays.items() if k not in ARRAY_FIELDS},
            state=arrays[STATE],
            prompt=prompt,
            tokens=arrays.get(TOKENS),
            token_mask=arrays.get(TOKEN_MASK),
            noise=arrays.get(NOISE),
            seed=seed,
            prev_actions=arrays.get(PREV_ACTIONS),
            delay=delay,
            guidance_scale=guidance_scale(header.get(GUIDANCE_SCALE)),
        )

    @classmethod
    def from_dict(cls, obs: dict[str, Any]) -> Observation:
        """A client-style flat dict (arrays by field name, `prompt`, `seed`) -> Observation."""
        return cls.from_request(*split_observation(obs))

    def to_request(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """-> (header fields, arrays by field name), as `pi0_client.protocol.encode` takes them."""
        fields = ((PROMPT, self.prompt), (SEED, self.seed), (DELAY, self.delay), (GUIDANCE_SCALE, self.guidance_scale))
        header = {k: v for k, v in fields if v is not None}
        arrays = {**self.images, STATE: self.state}
        optional = (
            (TOKENS, self.tokens),
            (TOKEN_MASK, self.token_mask),
            (NOISE, self.noise),
            (PREV_ACTIONS, self.prev_actions),
        )
        for name, value in optional:
            if value is not None:
                arrays[name] = value
        return header, arrays

    def to_dict(self) -> dict[str, Any]:
        """The client-style flat dict (what `PolicyClient.infer` takes)."""
        header, arrays = self.to_request()
        return {**arrays, **header}

    @classmethod
    def from_npz(cls, path: str | Path) -> Observation:
        """OBS.npz with the request's field names (`prompt` as a string array) -> Observation."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        header = {}
        if PROMPT in arrays:
            header[PROMPT] = str(arrays.pop(PROMPT))
        return cls.from_request(header, arrays)

    def save_npz(self, path: str | Path) -> None:
        header, arrays = self.to_request()
        extra = {PROMPT: np.array(header[PROMPT])} if PROMPT in header else {}
        np.savez(path, **arrays, **extra)

    @classmethod
    def synthetic(cls, metadata: Metadata, seed: int = 0) -> Observation:
        """Random frames at the cameras' trained sizes (HxWx3 uint8), a random state, a BOS-only prompt
        (none when the server reads no prompt). For warm-up and benchmarks."""
        rng = np.random.default_rng(seed)
        images = {c.key: rng.integers(0, 256, (c.shape[1], c.shape[2], 3), dtype=np.uint8) for c in metadata.cameras}
        state = rng.normal(size=metadata.state_dim).astype(np.float32)
        if metadata.prompt.max_tokens is None:
            return cls(images, state, seed=seed)
        tokens = np.full((1, metadata.prompt.max_tokens), PAD_ID, np.int64)
        tokens[0, 0] = BOS_ID
        return cls(images, state, tokens=tokens, token_mask=tokens != PAD_ID, seed=seed)
