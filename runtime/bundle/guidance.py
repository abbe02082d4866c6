"""Classifier-free guidance as a bundle declares it (docs/guidance.md).

Per Euler step the policy serves `v = v_u + beta (v_c - v_u)`: v_c the conditioned branch's velocity,
v_u the unconditioned one's, beta (`guidance_scale`) per request, the bundle's `default_scale` when a
request names none. beta = 1 is the conditioned branch alone, computed alone. Two kinds of condition:

- `prompt` (pi*0.6's RECAP): the conditioned prompt is the task followed by `condition_text`, exactly
  (e.g. ", Advantage: positive"); the unconditioned prompt is the task alone. Two prefixes, one batched
  VLM call (the `vlm_guided` graph).
- `embedding` (seed 003's "bias" mode): a learned two-way embedding added to every action token; the
  prefix is the same for both branches.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

PROMPT_CONDITION, LEARNED_CONDITION = "prompt", "embedding"
GUIDANCE_KINDS = (PROMPT_CONDITION, LEARNED_CONDITION)
MAX_GUIDANCE_SCALE = 10.0  # far beyond what CFGRL and RECAP use (1.5 - 3): a larger beta is a typo, not a setting


def check_scale(scale: object, what: str = "guidance_scale") -> float:
    """A guidance scale as a float in [0, MAX_GUIDANCE_SCALE], or ValueError saying what is accepted."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{what} must be a number, got {scale!r}")
    if not 0.0 <= scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(
            f"{what} must be between 0 and {MAX_GUIDANCE_SCALE:g} (1: the conditioned branch alone), got {scale}"
        )
    return float(scale)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Guidance:
    kind: str  # one of GUIDANCE_KINDS
    default_scale: float = 1.0
    condition_text: str | None = None  # `prompt` kind: appended to the task to make the conditioned prompt

    def __post_init__(self) -> None:
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"guidance kind {self.kind!r}: the kinds are {GUIDANCE_KINDS}")
        check_scale(self.default_scale, "the default guidance scale")
        if (self.kind == PROMPT_CONDITION) != bool(self.condition_text):
            raise ValueError("a condition in the prompt needs its text, and only it has one")

    def conditioned(self, prompt: str) -> str:
        """The conditioned prompt of a task (`prompt` kind)."""
        assert self.condition_text is not None
        return prompt + self.condition_text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Guidance:
        return cls(**d)
