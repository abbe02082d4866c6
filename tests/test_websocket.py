"""openpi's websocket protocol, spoken by `openpi-client` from PyPI, unchanged, against the real daemon
(`pi0-runtime serve --websocket`): metadata on connect, inference with openpi's ALOHA key set (the same
actions as over ZeroMQ for the same seed), its ActionChunkBroker, errors as a text frame and close 1011,
reconnects, /healthz, API keys, the one-at-a-time queue shared with ZeroMQ, and a fuzz pass."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import websockets.sync.client
from conftest import free_port
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from openpi_client import msgpack_numpy
from openpi_client.action_chunk_broker import ActionChunkBroker as OpenpiBroker
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from devtools.supervise import Daemon
from pi0_client import PolicyClient

PROMPT = "transfer the cube"
EXAMPLES = max(60, int(os.environ.get("PI0_FUZZ_EXAMPLES", "60")) // 100)  # `make fuzz` runs more


@pytest.fixture(scope="module")
def served(dummy_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """The daemon on the pi0-dummy bundle, ZeroMQ over ipc and openpi's websocket on loopback."""
    port = free_port()
    daemon = Daemon.serve(dummy_bundle, "--websocket", f"127.0.0.1:{port}", quiet=True, watchdog_usec=200_000)
    daemon.start()
    yield daemon, port
    daemon.stop()


def aloha_obs(seed: int) -> dict:
    """What openpi's ALOHA robot code sends: CHW uint8 frames under openpi's camera names, the state, the prompt."""
    rng = np.random.default_rng(seed)
    return {
        "images": {"cam_high": rng.integers(0, 256, (3, 480, 640), dtype=np.uint8)},
        "state": rng.normal(size=14).astype(np.float32),
        "prompt": PROMPT,
    }


pytestmark = pytest.mark.system


def test_openpi_client_infers_what_zeromq_gives(served) -> None:
    daemon, port = served
    policy = WebsocketClientPolicy("127.0.0.1", port)
    meta = policy.get_server_metadata()
    assert meta["cameras"][0]["key"] == "observation.images.top" and meta["action_dim"] == 14
    obs = {**aloha_obs(1), "seed": 7}
    result = policy.infer(obs)
    assert result["actions"].shape == (50, 14) and result["actions"].dtype == np.float32
    assert result["server_timing"]["infer_ms"] > 0 and result["policy_timing"]["infer_ms"] > 0
    frame = np.ascontiguousarray(obs["images"]["cam_high"].transpose(1, 2, 0))
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        want = client.infer(
            {"observation.images.top": frame, "observation.state": obs["state"], "prompt": PROMPT, "seed": 7}
        )
    np.testing.assert_array_equal(result["actions"], want["actions"])
    second = policy.infer({**aloha_obs(2), "seed": 7})
    assert "prev_total_ms" in second["server_timing"]


def test_openpi_action_chunk_broker_asks_once_per_horizon(served) -> None:
    daemon, port = served
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        before = client.stats()["counts"].get("kind:infer", 0)
        broker = OpenpiBroker(WebsocketClientPolicy("127.0.0.1", port), action_horizon=10)
        actions = [broker.infer(aloha_obs(i))["actions"] for i in range(25)]
        after = client.stats()["counts"]["kind:infer"]
    assert all(a.shape == (14,) for a in actions) and after - before == 3


def test_openpis_broker_wraps_our_zeromq_client_too(served, dummy_bundle: Path) -> None:
    """openpi's ActionChunkBroker takes a PolicyClient as its policy (openpi's BasePolicy surface)."""
    daemon, _ = served
    from conftest import observation_for

    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        broker = OpenpiBroker(client, action_horizon=10)
        obs = observation_for(dummy_bundle, PROMPT)
        assert all(broker.infer(obs)["actions"].shape == (14,) for _ in range(12))
        broker.reset()


def test_errors_are_a_text_frame_then_close_1011_and_a_new_connection_is_served(served) -> None:
    _, port = served
    policy = WebsocketClientPolicy("127.0.0.1", port)
    with pytest.raises(RuntimeError, match=r"Error in inference server:\nbad_request: the observation has no state"):
        policy.infer({"images": aloha_obs(0)["images"], "prompt": PROMPT})
    with pytest.raises(websockets.exceptions.ConnectionClosedError) as closed:
        policy.infer(aloha_obs(0))
    assert closed.value.rcvd.code == 1011
    with pytest.raises(RuntimeError, match=r"camera 'cam_left' is neither one of this policy's .* nor ALOHA's"):
        WebsocketClientPolicy("127.0.0.1", port).infer(
            {"images": {"cam_left": np.zeros((3, 8, 8), np.uint8)}, "state": np.zeros(14)}
        )
    assert WebsocketClientPolicy("127.0.0.1", port).infer(aloha_obs(3))["actions"].shape == (50, 14)


def test_alohas_whole_camera_set_and_float_frames_are_taken_as_openpi_takes_them(served) -> None:
    """openpi's AlohaInputs accepts cam_high, cam_low, cam_left_wrist, cam_right_wrist and leaves unused what
    no model slot takes; its `_parse_image` takes float frames in [0, 1] as 255 x frame cast to uint8."""
    _, port = served
    policy = WebsocketClientPolicy("127.0.0.1", port)
    obs = {**aloha_obs(4), "seed": 3}
    binary = (obs["images"]["cam_high"] >= 128).astype(np.uint8) * np.uint8(255)  # exact in float: 0.0 and 1.0
    want = policy.infer({**obs, "images": {"cam_high": binary}})["actions"]
    low = np.zeros((3, 480, 640), np.uint8)
    as_float = {"cam_high": binary.astype(np.float32) / np.float32(255), "cam_low": low}
    np.testing.assert_array_equal(policy.infer({**obs, "images": as_float})["actions"], want)


def test_health_check(served) -> None:
    _, port = served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"OK\n"


def test_a_restarted_daemon_is_reached_again(dummy_bundle: Path, start_daemon) -> None:
    port = free_port()
    first = start_daemon(dummy_bundle, "--websocket", f"127.0.0.1:{port}")
    before = WebsocketClientPolicy("127.0.0.1", port).infer({**aloha_obs(4), "seed": 1})["actions"]
    first.stop()
    start_daemon(dummy_bundle, "--websocket", f"127.0.0.1:{port}")
    after = WebsocketClientPolicy("127.0.0.1", port).infer({**aloha_obs(4), "seed": 1})["actions"]
    np.testing.assert_array_equal(before, after)


def test_api_keys_off_loopback(dummy_bundle: Path, start_daemon, tmp_path: Path) -> None:
    port = free_port()
    keys = tmp_path / "api_keys"
    keys.write_text("# one per line\nrobot-7f3a\n")
    config = tmp_path / "runtime.toml"
    config.write_text(f'websocket_endpoint = "0.0.0.0:{port}"\n')
    refused = start_daemon(dummy_bundle, "--config", str(config), wait_ready=False)
    assert refused.process.wait(timeout=60) == 2 and "no API keys are configured" in refused.log()
    config.write_text(f'websocket_endpoint = "0.0.0.0:{port}"\nwebsocket_api_keys = "{keys}"\n')
    start_daemon(dummy_bundle, "--config", str(config))
    with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
        WebsocketClientPolicy("127.0.0.1", port)
    with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
        WebsocketClientPolicy("127.0.0.1", port, api_key="robot-0000")
    assert WebsocketClientPolicy("127.0.0.1", port, api_key="robot-7f3a").infer(aloha_obs(5))["actions"].shape == (
        50,
        14,
    )


def test_real_time_chunking_over_the_websocket(served) -> None:
    _, port = served
    policy = WebsocketClientPolicy("127.0.0.1", port)
    chunk = policy.infer({**aloha_obs(6), "seed": 2})["actions"]
    joined = policy.infer({**aloha_obs(7), "seed": 3, "prev_actions": chunk[10:], "delay": 4})["actions"]
    np.testing.assert_allclose(joined[:4], chunk[10:14], atol=1e-6, rtol=0)


# --- fuzz: whatever arrives, one answer (actions, or a text error and close 1011), the daemon serving on ---

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=20) | st.binary(max_size=64)
    | st.builds(lambda n, d: np.zeros(n, d), st.integers(0, 64), st.sampled_from(["u1", "f4", "i8", "?"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
near_miss = st.fixed_dictionaries(
    {"images": st.dictionaries(st.sampled_from(["cam_high", "cam_x"]), values, max_size=2), "state": values},
    optional={"prompt": values, "seed": values, "delay": values, "prev_actions": values, "noise": values},
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize="PI0_FUZZ_EXAMPLES" not in os.environ,  # `make test`: the same messages each run; `make fuzz`: new ones
)
@given(st.one_of(values, near_miss, st.binary(max_size=200)))
@example({"images": {}, "state": [None, []]})  # found by it: numpy's ValueError escaped the mapping (1011, no reason)
def test_fuzz_every_message_gets_one_answer(served, message) -> None:
    _, port = served
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        msgpack_numpy.unpackb(ws.recv())  # the metadata
        ws.send(message if isinstance(message, bytes) else msgpack_numpy.packb(message))
        reply = ws.recv(timeout=30)
        if isinstance(reply, str):
            assert reply.split(":")[0] in ("bad_request", "bad_output"), reply
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1011
        else:
            assert np.isfinite(msgpack_numpy.unpackb(reply)["actions"]).all()
    assert WebsocketClientPolicy("127.0.0.1", port).infer(aloha_obs(0))["actions"].shape == (50, 14)


def test_libero_and_droid_key_sets_map_onto_the_bundles_cameras() -> None:
    """openpi's LIBERO and DROID observations (policies/libero_policy.py, droid_policy.py): images to the
    base and wrist cameras in order, DROID's state as joint positions then the gripper."""
    from pi0_client.metadata import Camera, Metadata, PromptInfo
    from runtime.daemon.openpi_compat import decode, encode, observation
    from runtime.pipeline.observation import ObservationError

    cams = (Camera("base_0_rgb", (3, 224, 224)), Camera("left_wrist_0_rgb", (3, 224, 224), optional=True))
    meta = Metadata(cams, 8, 7, 10, PromptInfo(48, True), "onnxruntime", "test")
    image, wrist = np.zeros((224, 224, 3), np.uint8), np.ones((224, 224, 3), np.uint8)
    libero = observation(
        {
            "observation/image": image,
            "observation/wrist_image": wrist,
            "observation/state": np.arange(8.0),
            "prompt": "p",
        },
        meta,
    )
    assert set(libero.images) == {"base_0_rgb", "left_wrist_0_rgb"} and libero.images["left_wrist_0_rgb"][0, 0, 0] == 1
    droid = decode(encode({
        "observation/exterior_image_1_left": image, "observation/wrist_image_left": wrist,
        "observation/joint_position": np.arange(7.0), "observation/gripper_position": np.array([0.5]), "prompt": "p",
    }))  # fmt: skip
    mapped = observation(droid, meta)
    assert mapped.state.tolist() == [0, 1, 2, 3, 4, 5, 6, 0.5] and mapped.images["base_0_rgb"].shape == (224, 224, 3)
    with pytest.raises(ObservationError, match="unexpected observation keys"):
        observation({**droid, "observation/cartesian_position": np.zeros(6)}, meta)
    with pytest.raises(ObservationError, match="unknown observation keys"):
        observation({"obs": 1}, meta)
