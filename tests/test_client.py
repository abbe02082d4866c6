"""The controller's package on its own: the chunk broker's hand-out and request schedule, and the typed
metadata's round trip (a newer server's extra fields are kept, not dropped)."""

from __future__ import annotations

import numpy as np
import pytest

from pi0_client import ActionChunkBroker, Camera, Metadata, PromptInfo


class CountingPolicy:
    """Answers each request with a chunk whose rows say which request and which row they are."""

    def __init__(self, chunk: int = 5) -> None:
        self.chunk = chunk
        self.requests: list[dict] = []

    def infer(self, obs: dict) -> dict:
        self.requests.append(obs)
        n = len(self.requests)
        return {"actions": np.array([[n, row] for row in range(self.chunk)], dtype=np.float32)}


def test_broker_hands_out_one_action_per_tick_and_asks_when_the_chunk_is_used_up() -> None:
    policy = CountingPolicy(chunk=5)
    broker = ActionChunkBroker(policy, actions_per_chunk=3)
    actions = [broker.act({"tick": tick}) for tick in range(7)]
    assert [tuple(a) for a in actions] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]
    assert [r["tick"] for r in policy.requests] == [0, 3, 6], "each request carries the newest observation"
    assert broker.fresh and broker.reply["actions"][0, 0] == 3


def test_broker_uses_whole_chunks_by_default_and_reset_starts_over() -> None:
    policy = CountingPolicy(chunk=4)
    broker = ActionChunkBroker(policy)
    for _ in range(4):
        broker.act({})
    assert len(policy.requests) == 1
    broker.reset()
    assert tuple(broker.act({})) == (2, 0)
    with pytest.raises(ValueError, match="actions_per_chunk"):
        ActionChunkBroker(policy, actions_per_chunk=0)


def test_metadata_round_trip_keeps_unknown_fields() -> None:
    metadata = Metadata(
        cameras=(Camera("observation.images.top", (3, 480, 640)),),
        state_dim=14,
        action_dim=14,
        chunk_size=50,
        prompt=PromptInfo(max_tokens=48, tokenizer=False, fixed=("transfer the cube",)),
        backend="onnxruntime",
        source="lerobot",
        num_steps=10,
        noise_shape=(1, 50, 32),
        precision="fp16",
    )
    wire = {**metadata.to_dict(), "rtc": {"max_delay": 10}}
    again = Metadata.from_dict(wire)
    assert again.extra == {"rtc": {"max_delay": 10}} and again.to_dict() == wire
    assert again.camera_keys == ("observation.images.top",)
    assert Metadata.from_dict(metadata.to_dict()) == metadata
