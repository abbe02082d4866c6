"""The robot a bundle was trained for: the part of a training config that no weight records and that the
numbers of `PolicySpec` do not say. Which training config it is (`name`, e.g. openpi's `pi0_aloha`), the
key set its clients send (`family`: openpi's ALOHA, LIBERO or DROID inputs), the fields the state is
assembled from, cameras a client may send that no model slot takes, the prompt served when a request
has none, and what the training config tells the robot (openpi's `policy_metadata`, e.g. ALOHA's
`reset_pose`). The numeric conventions (camera slots, ALOHA maps, delta actions, token budget) are the
`PolicySpec`'s; this says where they came from, and for a user's own adapter file whether it was proven
against the training config it claims to match (`exporter/robot_adapter.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Family = Literal["aloha", "libero", "droid", "custom"]
FAMILIES: tuple[str, ...] = ("aloha", "libero", "droid", "custom")  # custom: a user's robot adapter file


@dataclass(frozen=True)
class Robot:
    name: str  # the training config's name (openpi's `TrainConfig.name`)
    family: Family  # whose input and output transforms (openpi's policies/<family>_policy.py)
    source: str  # where upstream defines it
    state_keys: tuple[str, ...] = ()  # openpi's request fields concatenated into the state, in order
    unused_cameras: tuple[str, ...] = ()  # cameras the family's inputs accept and no model slot takes
    default_prompt: str | None = None  # openpi's `default_prompt` (InjectDefaultPrompt)
    policy_metadata: dict[str, Any] = field(default_factory=dict)  # openpi's server metadata for the robot
    # A user's adapter (family "custom"): how it was proven against the training config's own transforms,
    # or None: unproven (`pi0-export inspect` and the metadata say so). A named config is upstream's own.
    proof: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"robot family must be one of {list(FAMILIES)}, not {self.family!r}")
        object.__setattr__(self, "state_keys", tuple(self.state_keys))
        object.__setattr__(self, "unused_cameras", tuple(self.unused_cameras))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state_keys"], d["unused_cameras"] = list(self.state_keys), list(self.unused_cameras)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Robot:
        return cls(**d)
