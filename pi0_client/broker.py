"""One action per control tick out of chunked replies, like openpi-client's `ActionChunkBroker`.

    broker = ActionChunkBroker(client, actions_per_chunk=10)
    action = broker.act(observation)   # a request only when the current chunk is used up

The controller calls `act` every tick with its newest observation; the broker asks the policy for a new
chunk when the previous one has handed out `actions_per_chunk` actions (at most the chunk's length),
and `reset()` forgets the chunk (a new episode).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class ChunkPolicy(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...


class ActionChunkBroker:
    def __init__(self, policy: ChunkPolicy, actions_per_chunk: int | None = None) -> None:
        if actions_per_chunk is not None and actions_per_chunk < 1:
            raise ValueError(f"actions_per_chunk must be >= 1, not {actions_per_chunk}")
        self.policy = policy
        self.actions_per_chunk = actions_per_chunk
        self.chunk: np.ndarray | None = None
        self.reply: dict[str, Any] = {}
        self.index = 0

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The next action [action_dim]; sends `obs` to the policy when a new chunk is due."""
        if self.chunk is None or self.index >= self._usable():
            self.reply = self.policy.infer(obs)
            self.chunk = np.asarray(self.reply["actions"])
            self.index = 0
        action = self.chunk[self.index]
        self.index += 1
        return action

    @property
    def fresh(self) -> bool:
        """True right after `act` started a new chunk (its reply is in `reply`)."""
        return self.index == 1

    def _usable(self) -> int:
        assert self.chunk is not None
        n = len(self.chunk)
        return n if self.actions_per_chunk is None else min(n, self.actions_per_chunk)

    def reset(self) -> None:
        self.chunk, self.reply, self.index = None, {}, 0
