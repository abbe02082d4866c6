"""One action per control tick out of chunked replies, like openpi-client's `ActionChunkBroker`, and
optionally without ever making the controller wait.

    broker = ActionChunkBroker(client, actions_per_chunk=25, prefetch=4, rtc=True)
    action = broker.act(observation)   # every control tick, with the newest observation

Without `prefetch` the broker asks for a new chunk when the previous one has handed out
`actions_per_chunk` actions (at most the chunk's length), and the controller waits for it. With
`prefetch` d, it asks (on a background thread) when d actions are left, from the observation of that
tick, and keeps handing out the old chunk's actions meanwhile; the new chunk takes over at its index d
(the d ticks that passed; so d is at most half of `actions_per_chunk`). With `rtc`, the request carries the old chunk's remaining actions and the
delay d: the server makes the new chunk's first d actions exactly those, so the switch has no jump
(real-time chunking, docs/protocol.md). A tick that finds the next chunk not there yet waits for it and
is counted in `stalls`: choose d above the inference time in ticks. `reset()` forgets everything (a new
episode).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np


class ChunkPolicy(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...


class ActionChunkBroker:
    def __init__(
        self, policy: ChunkPolicy, actions_per_chunk: int | None = None, prefetch: int = 0, rtc: bool = False
    ) -> None:
        if actions_per_chunk is not None and actions_per_chunk < 1:
            raise ValueError(f"actions_per_chunk must be >= 1, not {actions_per_chunk}")
        if (
            prefetch < 0
            or (actions_per_chunk is not None and 2 * prefetch > actions_per_chunk)
            or (rtc and not prefetch)
        ):
            raise ValueError("prefetch must be >= 0 and at most half of actions_per_chunk; rtc needs prefetch > 0")
        self.policy = policy
        self.actions_per_chunk = actions_per_chunk
        self.prefetch, self.rtc = prefetch, rtc
        self.chunk: np.ndarray | None = None
        self.reply: dict[str, Any] = {}
        self.index = 0
        self.stalls = 0
        self._fresh = False
        self._pending: Future | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker") if prefetch else None

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The next action [action_dim]; sends `obs` to the policy when a new chunk is due."""
        self._fresh = False
        if self.chunk is None:
            self._take(self.policy.infer(obs), 0)
        if self.index >= self._usable():
            if self._pending is not None:
                if not self._pending.done():
                    self.stalls += 1
                pending, self._pending = self._pending, None
                self._take(pending.result(), self.prefetch)
            else:
                self._take(self.policy.infer(obs), 0)
        if self._executor is not None and self._pending is None and self.index == self._usable() - self.prefetch:
            request = dict(obs)
            if self.rtc:
                request.update(prev_actions=self.chunk[self.index :], delay=self.prefetch)
            self._pending = self._executor.submit(self.policy.infer, request)
        action = self.chunk[self.index]
        self.index += 1
        return action

    def _take(self, reply: dict[str, Any], index: int) -> None:
        self.reply, self.chunk, self.index = reply, np.asarray(reply["actions"]), index
        self._fresh = True

    @property
    def fresh(self) -> bool:
        """True right after `act` started a new chunk (its reply is in `reply`)."""
        return self._fresh

    def _usable(self) -> int:
        assert self.chunk is not None
        n = len(self.chunk)
        return n if self.actions_per_chunk is None else min(n, self.actions_per_chunk)

    def reset(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self.chunk, self.reply, self.index, self._pending = None, {}, 0, None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
