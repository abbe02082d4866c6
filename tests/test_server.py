"""The runtime daemon as systemd runs it: a real process, real ZeroMQ (ipc and tcp on loopback), a
NOTIFY_SOCKET this test binds, and the client a controller imports."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import FIXTURES, QUIET, Golden

from devtools.supervise import Daemon
from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.presets import build_preset
from exporter.torch_backend import reference_engine
from pi0_client import ActionChunkBroker, protocol
from pi0_client.client import BusyError, PolicyClient, PolicyError, ServerUnavailableError
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.engine import Engine, EngineError
from runtime.pipeline.observation import Observation

RUNTIME = Path(sys.executable).with_name("pi0-runtime")


@pytest.fixture(scope="module")
def golden_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "bundle"
    build_bundle(load_checkpoint(FIXTURES / "lerobot-pi0-tiny" / "checkpoint"), out, BundleOptions(), **QUIET)
    return out


def observation(spec, rng: np.random.Generator, layout: str = "hwc") -> dict:
    obs = {}
    for key, (_, h, w) in zip(spec.camera_keys, spec.camera_shapes, strict=True):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        obs[key] = image if layout == "hwc" else image.transpose(2, 0, 1).copy()
    obs["observation.state"] = rng.normal(size=spec.state_dim).astype(np.float32)
    return obs


def test_engine_matches_the_reference_and_lerobot(golden_bundle: Path) -> None:
    golden = Golden("lerobot-pi0-tiny")
    bundle = load_bundle(golden_bundle)
    engine = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle))
    actions, timing = engine.infer(
        Observation(golden.images, golden.state, tokens=golden.tokens, token_mask=golden.token_mask, noise=golden.noise)
    )
    assert np.abs(actions - golden.actions_fp32[0]).max() <= 1e-4
    reference = reference_engine(load_checkpoint(golden.checkpoint))
    rng = np.random.default_rng(3)
    images = {k: rng.integers(0, 256, (97, 131, 3), dtype=np.uint8) for k in bundle.spec.camera_keys}  # odd sizes
    state = rng.normal(size=bundle.spec.state_dim).astype(np.float32)
    ours, _ = engine.infer(Observation(images, state, tokens=golden.tokens, token_mask=golden.token_mask, seed=11))
    noise = np.random.default_rng(11).standard_normal((1, 16, 32), dtype=np.float32)
    theirs, _ = reference.infer(
        Observation(images, state, tokens=golden.tokens, token_mask=golden.token_mask, noise=noise)
    )
    assert np.abs(ours - theirs).max() <= 1e-4
    assert set(timing) == {"preprocess_ms", "vlm_ms", "expert_ms", "expert_step_ms", "postprocess_ms", "total_ms"}


def test_num_steps_at_serve_time_equals_a_bundle_exported_with_it(
    golden_bundle: Path, tmp_path: Path, start_daemon
) -> None:
    """`pi0-runtime serve --num-steps 3` serves what a bundle exported with --num-steps 3 computes."""
    three = tmp_path / "three"
    build_bundle(
        load_checkpoint(FIXTURES / "lerobot-pi0-tiny" / "checkpoint"), three, BundleOptions(num_steps=3), **QUIET
    )
    bundle = load_bundle(three)
    assert bundle.spec.num_steps == 3 and load_bundle(golden_bundle).spec.num_steps == 10
    length = bundle.spec.tokenizer_max_length
    obs = {**observation(bundle.spec, np.random.default_rng(5)), "lang_tokens": np.ones(length, np.int64)}
    obs["lang_masks"], obs["seed"] = np.ones(length, bool), 17
    expected, _ = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)).infer(Observation.from_dict(obs))
    daemon = start_daemon(golden_bundle, "--num-steps", "3")
    with PolicyClient(daemon.endpoint) as client:
        assert client.metadata().num_steps == 3
        served = client.infer(obs)["actions"]
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
    ten, _ = Engine.from_bundle(load_bundle(golden_bundle), OnnxRuntimeBackend(bundle)).infer(
        Observation.from_dict(obs)
    )
    assert np.abs(ten - expected).max() > 1e-3  # the step count matters: the check above can fail


def test_non_finite_output_is_an_error(tmp_path: Path) -> None:
    policy = build_preset("pi0-dummy")
    policy.model.action_out_proj.bias.data[0] = float("nan")
    build_bundle(policy, tmp_path / "b", BundleOptions(validate=False), **QUIET)
    bundle = load_bundle(tmp_path / "b")
    engine = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle))
    obs = Observation.synthetic(engine.metadata())
    with pytest.raises(EngineError, match="non-finite") as info:
        engine.infer(obs)
    assert info.value.code == "bad_output"


def test_ready_after_warm_up_then_watchdog_and_status(dummy_bundle: Path, start_daemon) -> None:
    d = start_daemon(dummy_bundle)
    assert "warm-up" in d.log(), "READY=1 came before the warm-up inference"
    d.read_notify(1.0)
    assert sum(m == "WATCHDOG=1" for m in d.messages) >= 3
    assert any(m.startswith("STATUS=") for m in d.messages)
    assert d.stop() == 0


def test_serves_over_ipc_and_tcp(golden_bundle: Path, start_daemon) -> None:
    golden = Golden("lerobot-pi0-tiny")
    d = start_daemon(golden_bundle, endpoint=f"tcp://127.0.0.1:{free_port()}")
    try:
        with PolicyClient(d.endpoint, timeout_s=30) as client:
            meta = client.metadata()
            assert list(meta.camera_keys) == list(golden.images)
            assert meta.noise_shape == (1, 16, 32) and meta.precision == "fp32" and meta.backend == "onnxruntime"
            obs = {
                **golden.images,
                "observation.state": golden.state,
                "lang_tokens": golden.tokens,
                "lang_masks": golden.token_mask,
                "noise": golden.noise,
            }
            result = client.infer(obs)
            assert np.abs(result["actions"] - golden.actions_fp32[0]).max() <= 1e-4
            assert result["timing"]["total_ms"] > 0 and result["timing"]["queue_ms"] >= 0
            assert client.stats()["counts"]["ok"] == 1
    finally:
        assert d.stop() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prompt_text_and_fixed_prompts(daemon: Daemon, dummy_bundle: Path) -> None:
    spec = load_bundle(dummy_bundle).spec
    rng = np.random.default_rng(1)
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        fixed = client.infer({**observation(spec, rng), "prompt": "transfer the cube", "seed": 4})
        typed = client.infer({**observation(spec, rng, layout="chw"), "prompt": "pick up the red block", "seed": 4})
        assert fixed["actions"].shape == typed["actions"].shape == (50, 14)
        again = client.infer({**observation(spec, np.random.default_rng(1)), "prompt": "transfer the cube", "seed": 4})
        np.testing.assert_array_equal(again["actions"], fixed["actions"])


BAD_REQUESTS = {
    "missing camera": (lambda o: {k: v for k, v in o.items() if "images" not in k}, "bad_request", "missing"),
    "extra camera": (
        lambda o: {**o, "observation.images.wrist": o["observation.images.top"]},
        "bad_request",
        "unexpected",
    ),
    "float image": (
        lambda o: {**o, "observation.images.top": o["observation.images.top"].astype(np.float32)},
        "bad_request",
        "expected uint8",
    ),
    "wrong image shape": (
        lambda o: {**o, "observation.images.top": np.zeros((480, 640, 4), np.uint8)},
        "bad_request",
        "HxWx3 or 3xHxW",
    ),
    "too thin an image": (  # found by the fuzzer: its resized height rounded to 0 (was an `internal` error)
        lambda o: {**o, "observation.images.top": np.zeros((1, 700, 3), np.uint8)},
        "bad_request",
        r"camera observation.images.top: .*too thin",
    ),
    "too narrow an image": (  # found by the fuzzer too, once frames were checked for letterboxes
        lambda o: {**o, "observation.images.top": np.zeros((500, 1, 3), np.uint8)},
        "bad_request",
        r"camera observation.images.top: .*too thin",
    ),
    "NaN state": (lambda o: {**o, "observation.state": np.full(14, np.nan, np.float32)}, "bad_request", "NaN"),
    "short state": (lambda o: {**o, "observation.state": np.zeros(3, np.float32)}, "bad_request", "14 floats"),
    "bad noise": (lambda o: {**o, "noise": np.zeros((2, 2), np.float32)}, "bad_request", "noise must be"),
    "no prompt": (lambda o: {k: v for k, v in o.items() if k != "prompt"}, "bad_request", "give a prompt"),
    "unknown array": (
        lambda o: {**o, "observation.joy": np.zeros(1, np.float32)},
        "bad_request",
        r"unexpected arrays \['observation.joy'\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_error_replies_and_the_next_is_served(daemon: Daemon, dummy_bundle: Path, case: str) -> None:
    spec = load_bundle(dummy_bundle).spec
    mutate, code, message = BAD_REQUESTS[case]
    with PolicyClient(daemon.endpoint, timeout_s=30, retries=0) as client:
        good = {**observation(spec, np.random.default_rng(2)), "prompt": "transfer the cube"}
        with pytest.raises(PolicyError, match=message) as info:
            client.infer(mutate(good))
        assert info.value.code == code
        assert client.infer(good)["actions"].shape == (50, 14)


@pytest.mark.parametrize(
    "frames,code",
    [
        ([b"\xc1"], "bad_request"),
        ([protocol.wire.pack({"v": 99, "kind": "infer"})], "unsupported_version"),
        ([protocol.wire.pack({"v": 1, "kind": "dance", "id": 7})], "unknown_kind"),
        (
            [
                protocol.wire.pack(
                    {"v": 1, "kind": "infer", "arrays": [{"name": "a", "dtype": "uint8", "shape": [9]}]}
                ),
                b"1",
            ],
            "bad_request",
        ),
    ],
)
def test_malformed_messages_get_error_replies(daemon: Daemon, frames: list[bytes], code: str) -> None:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    sock.send_multipart(frames)
    assert sock.poll(10_000)
    header, _ = protocol.decode(sock.recv_multipart())
    sock.close()
    assert header["ok"] is False and header["error"]["code"] == code and header["error"]["message"]
    with PolicyClient(daemon.endpoint, timeout_s=10) as client:
        assert client.ping()


def test_full_queue_answers_busy_and_loses_nothing(dummy_bundle: Path, tmp_path: Path, start_daemon) -> None:
    config = tmp_path / "runtime.toml"
    config.write_text("[runtime]\nqueue_size = 1\n")
    d = start_daemon(dummy_bundle, "--config", str(config))
    try:
        spec = load_bundle(dummy_bundle).spec
        obs = observation(spec, np.random.default_rng(0))
        context = zmq.Context.instance()
        sockets = []
        for i in range(8):  # eight controllers at once, each with its own DEALER socket
            s = context.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.endpoint)
            s.send_multipart([b"", *protocol.encode({"kind": "infer", "prompt": "transfer the cube", "id": i}, obs)])
            sockets.append(s)
        outcomes = []
        for s in sockets:
            assert s.poll(30_000), "a request got no reply"
            header, _ = protocol.decode(s.recv_multipart()[1:])
            outcomes.append("ok" if header["ok"] else header["error"]["code"])
            s.close()
        assert len(outcomes) == 8 and set(outcomes) <= {"ok", "busy"}
        assert "busy" in outcomes and "ok" in outcomes
    finally:
        assert d.stop() == 0


def test_sigterm_delivers_the_reply_in_flight(dummy_bundle: Path, start_daemon) -> None:
    d = start_daemon(dummy_bundle)
    spec = load_bundle(dummy_bundle).spec
    result = {}

    def call() -> None:
        with PolicyClient(d.endpoint, timeout_s=30, retries=0) as client:
            result["reply"] = client.infer(
                {**observation(spec, np.random.default_rng(0)), "prompt": "transfer the cube"}
            )

    caller = threading.Thread(target=call)
    caller.start()
    with PolicyClient(d.endpoint, timeout_s=10) as observer:  # wait until the server has taken the request
        while observer.stats()["counts"].get("kind:infer", 0) < 1:
            time.sleep(0.002)
    d.process.send_signal(signal.SIGTERM)
    caller.join(timeout=30)
    assert result["reply"]["actions"].shape == (50, 14)
    assert d.process.wait(timeout=30) == 0
    d.read_notify(0.5)
    assert "STOPPING=1" in d.messages
    assert "stopped" in d.log()


def test_client_reconnects_to_a_daemon_that_starts_late(dummy_bundle: Path, tmp_path: Path, start_daemon) -> None:
    endpoint = f"ipc://{tmp_path}/late.sock"
    client = PolicyClient(endpoint, timeout_s=0.3, retries=1)
    with pytest.raises(ServerUnavailableError):
        client.ping()
    d = start_daemon(dummy_bundle, endpoint=endpoint)
    try:
        client.timeout_ms = 10_000
        assert client.ping()
    finally:
        client.close()
        assert d.stop() == 0


def test_client_needs_only_numpy_and_pyzmq() -> None:
    code = (
        "import sys\n"
        "for m in ('msgpack', 'onnxruntime', 'sentencepiece', 'torch', 'onnx'): sys.modules[m] = None\n"
        "from pi0_client.client import PolicyClient, PolicyError, BusyError\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_chunk_broker_over_the_daemon(daemon, dummy_bundle: Path) -> None:
    """The broker on the real client: one request per `actions_per_chunk` ticks, actions in chunk order."""
    spec = load_bundle(dummy_bundle).spec
    obs = {**observation(spec, np.random.default_rng(5)), "prompt": "transfer the cube", "seed": 7}
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        chunk = client.infer(obs)["actions"]
        broker = ActionChunkBroker(client, actions_per_chunk=5)
        ticks = [broker.act(obs) for _ in range(12)]
        assert client.stats()["counts"]["kind:infer"] == 1 + 3
    np.testing.assert_array_equal(np.stack(ticks[:5]), chunk[:5])
    np.testing.assert_array_equal(ticks[5], chunk[0])  # the same observation and seed: the same chunk again


def test_a_busy_reply_raises_busy_error() -> None:
    """The client maps the server's `busy` code to BusyError, a PolicyError a controller may retry on."""
    context = zmq.Context.instance()
    server = context.socket(zmq.REP)
    port = server.bind_to_random_port("tcp://127.0.0.1")

    def answer_busy() -> None:
        header, _ = protocol.decode(server.recv_multipart())
        server.send_multipart(protocol.encode(protocol.error_header(header["id"], "busy", "4 requests are waiting")))

    thread = threading.Thread(target=answer_busy)
    thread.start()
    with PolicyClient(f"tcp://127.0.0.1:{port}", timeout_s=10, retries=0) as client, pytest.raises(BusyError) as info:
        client.ping()
    thread.join()
    server.close(linger=0)
    assert isinstance(info.value, PolicyError) and info.value.code == "busy" and "waiting" in info.value.message


def test_infer_cli_with_dump(golden_bundle: Path, tmp_path: Path) -> None:
    golden = Golden("lerobot-pi0-tiny")
    obs = tmp_path / "obs.npz"
    np.savez(
        obs,
        **{k: v[None] for k, v in golden.images.items()},
        **{"observation.state": golden.state[None]},
        lang_tokens=golden.tokens,
        lang_masks=golden.token_mask,
    )
    np.save(tmp_path / "noise.npy", golden.noise)
    out = subprocess.run(
        [
            str(RUNTIME),
            "infer",
            "--bundle",
            str(golden_bundle),
            "--obs",
            str(obs),
            "--noise",
            str(tmp_path / "noise.npy"),
            "--out",
            str(tmp_path / "actions.npy"),
            "--dump",
            str(tmp_path / "dump"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    actions = np.load(tmp_path / "actions.npy")
    assert np.abs(actions - golden.actions_fp32[0]).max() <= 1e-4
    dumped = {p.stem for p in (tmp_path / "dump").iterdir()}
    assert {"input.images", "input.state", "noise", "step00.x_t", "step09.v_t", "x_final", "actions"} <= dumped
    np.testing.assert_array_equal(np.load(tmp_path / "dump" / "actions.npy"), actions)


def test_check_reports_the_device_and_the_bundle(golden_bundle: Path, ascend_tools: Path) -> None:
    out = subprocess.run(
        [str(RUNTIME), "check", "--bundle", str(golden_bundle)], capture_output=True, text=True, check=True
    )
    import json

    report = json.loads(out.stdout)
    assert report["onnxruntime"] is True and report["npu_smi_soc"] == "Ascend310P3"  # the stand-in's chip
    assert report["bundle"]["om_compiled"] is False and report["bundle"]["om_matches_device"] is None  # no OM


def test_bench_cli(dummy_bundle: Path) -> None:
    out = subprocess.run(
        [str(RUNTIME), "bench", "--bundle", str(dummy_bundle), "--n", "3", "--through-server"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("vlm_ms", "expert_step_ms", "total_ms", "round_trip_ms", "service_overhead_ms"):
        assert row in out.stdout


def test_bench_sends_a_state_inside_the_training_range(dummy_bundle: Path) -> None:
    """What `bench --through-server` times is the served path, not the state guard's warning: it sends a state
    the daemon's default guard accepts (the random synthetic one is out of the dummy's range), and none
    where the policy's statistics leave neither the zero pose nor their centre in range."""
    import dataclasses

    from runtime.bundle.spec import NormStats
    from runtime.daemon.bench import typical_state
    from runtime.daemon.state_guard import StateGuard, StateRangeSettings

    bundle = load_bundle(dummy_bundle)
    spec = bundle.spec
    guard = StateGuard(spec, StateRangeSettings())
    synthetic = Observation.synthetic(Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)).metadata())
    assert guard.check(synthetic.state) is not None  # why the benchmark does not send it
    state = typical_state(spec)
    assert state is not None and state.shape == (spec.state_dim,) and guard.check(state) is None

    # ALOHA's adapter flips joints 1, 2, 8, 9: with a mean 100 standard deviations from zero, neither the zero
    # pose nor the un-adapted mean lands in range.
    std = np.full(spec.state_norm.size, 0.01, np.float32)
    far = dataclasses.replace(spec, state_norm=NormStats(mean=std * 100, std=std), adapt_to_pi_aloha=True)
    assert typical_state(far) is None
