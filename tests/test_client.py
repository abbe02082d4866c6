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


class SlowPolicy(CountingPolicy):
    """CountingPolicy whose replies take `seconds`; records what each request carried."""

    def __init__(self, chunk: int, seconds: float) -> None:
        super().__init__(chunk)
        self.seconds = seconds

    def infer(self, obs: dict) -> dict:
        import time

        time.sleep(self.seconds)
        return super().infer(obs)


def test_prefetch_asks_early_and_the_controller_never_waits() -> None:
    import time

    policy = SlowPolicy(chunk=10, seconds=0.0)
    broker = ActionChunkBroker(policy, actions_per_chunk=6, prefetch=3, rtc=True)
    actions = []
    for tick in range(15):
        actions.append(tuple(broker.act({"tick": tick})))
        time.sleep(0.02)  # a 50 Hz control loop: 3 ticks (60 ms) cover the background request many times over
    assert broker.stalls == 0
    # The first chunk from tick 0; the next asked at tick 3 (3 left), taking over at its index 3 at tick 6,
    # where 3 are left again: the one after is asked at once.
    assert [r["tick"] for r in policy.requests] == [0, 3, 6, 9, 12]
    assert actions[:9] == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)]
    second = policy.requests[1]
    assert second["delay"] == 3 and second["prev_actions"].tolist() == [[1, r] for r in range(3, 10)]
    broker.close()


def test_prefetch_counts_the_ticks_that_had_to_wait() -> None:
    broker = ActionChunkBroker(SlowPolicy(chunk=10, seconds=0.05), actions_per_chunk=4, prefetch=1)
    for tick in range(8):
        broker.act({"tick": tick})  # no pause between ticks: every switch waits for its chunk
    assert broker.stalls == 2 and "prev_actions" not in broker.policy.requests[1]  # no RTC asked for
    with pytest.raises(ValueError, match="at most half"):
        ActionChunkBroker(CountingPolicy(), actions_per_chunk=4, prefetch=3)
    broker.close()
    with pytest.raises(ValueError, match="rtc needs prefetch"):
        ActionChunkBroker(CountingPolicy(), actions_per_chunk=4, rtc=True)


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
