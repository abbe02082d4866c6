"""Real-time chunking without gradients (runtime/pipeline/rtc.py): the new chunk's first d actions are the previous
chunk's (inpainted in the model's space at every Euler step, so the network itself lands on them, and
returned exactly), the rest of the overlap is pulled towards it, and a request without the previous
actions is computed exactly as before. pi0 (the pi0-dummy bundle) and pi0.5 (openpi's pi0.5 fixture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, QUIET

from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from pi0_client import PolicyClient, PolicyError
from runtime.backends import BackendOptions
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.engine import Engine, EngineError
from runtime.pipeline.model_io import ModelInputs, postprocess
from runtime.pipeline.observation import Observation
from runtime.pipeline.rtc import rtc_weights

DELAY, EXECUTED = 3, 10  # control steps computed over; actions of the first chunk executed before asking


def test_the_weights_are_the_rtc_papers_soft_mask() -> None:
    w = rtc_weights(delay=3, overlap=10, horizon=16)
    assert (w[:3] == 1).all() and (w[10:] == 0).all()
    assert (np.diff(w[3:10]) < 0).all() and 0 < w[9] < w[3] < 1
    c = 7 / 8  # (overlap - i) / (overlap - delay + 1) at i = delay
    assert w[3] == pytest.approx(c * np.expm1(c) / (np.e - 1), rel=1e-6)


@pytest.fixture(scope="module")
def pi05_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    name = "openpi-pi05-tiny"
    policy = load_checkpoint(FIXTURES / name / "checkpoint", openpi_config="pi0_aloha_sim", max_token_len=80)
    out = tmp_path_factory.mktemp("pi05") / "bundle"
    build_bundle(policy, out, BundleOptions(tokenizer=FIXTURES / name / "tokenizer.model", validate=False), **QUIET)
    return out


def engine_for(bundle: Path) -> Engine:
    loaded = load_bundle(bundle)
    return Engine.from_bundle(loaded, OnnxRuntimeBackend(loaded, BackendOptions(threads=1)))


def two_chunks(engine: Engine, seed: int, rtc: bool, trace: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A chunk; then, EXECUTED steps later, the next one (a new observation, a new seed), with or
    without the previous chunk's remaining actions."""
    meta = engine.metadata()
    chunk, _ = engine.infer(Observation.synthetic(meta, seed=seed))
    later = Observation.synthetic(meta, seed=seed + 1000).to_dict()
    if rtc:
        later.update(prev_actions=chunk[EXECUTED:], delay=DELAY)
    return chunk, engine.infer(Observation.from_dict(later), trace=trace)[0]


@pytest.mark.parametrize("which", ["pi0", "pi0.5"])
def test_the_next_chunk_starts_where_the_robot_is(which: str, dummy_bundle: Path, pi05_bundle: Path) -> None:
    engine = engine_for(dummy_bundle if which == "pi0" else pi05_bundle)
    jumps = {True: [], False: []}
    for seed in range(4):
        for rtc in (True, False):
            trace: dict = {}
            chunk, following = two_chunks(engine, seed, rtc, trace)
            prev = chunk[EXECUTED:]
            if rtc:
                np.testing.assert_allclose(following[:DELAY], prev[:DELAY], atol=1e-6, rtol=0)
                # Not only copied into the reply: the network's own x(t=0) lands on them.
                network = postprocess(engine.spec, trace["x_final"])[0]
                np.testing.assert_allclose(network[:DELAY], prev[:DELAY], atol=1e-4, rtol=0)
            jumps[rtc].append(float(np.abs(following[DELAY] - prev[DELAY]).max()))
    print(f"\n{which}: jump at the first free action, with RTC {jumps[True]}, without {jumps[False]}")
    assert max(jumps[True]) < min(jumps[False])


def test_without_the_previous_actions_nothing_changes(dummy_bundle: Path) -> None:
    """A request without prev_actions is the plain Euler loop, written out here on the backend itself
    (not the engine's loop): any inpainting or copying left on would make the two differ."""
    engine = engine_for(dummy_bundle)
    obs = Observation.synthetic(engine.metadata(), seed=5)
    trace: dict = {}
    actions, _ = engine.infer(obs, trace=trace)
    inputs = ModelInputs(
        **{name: trace[f"input.{name}"] for name in ("images", "image_masks", "tokens", "token_mask", "state")}
    )
    cache = engine.backend.prefix(inputs)
    dt, t, x = np.float32(-1.0 / engine.spec.num_steps), np.float32(1.0), trace["noise"]
    for _ in range(engine.spec.num_steps):
        x = x + dt * engine.backend.velocity(cache, inputs.state, x, np.array([t], dtype=np.float32))
        t = np.float32(t + dt)
    np.testing.assert_allclose(actions, postprocess(engine.spec, x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"delay": 3}, "needs both 'prev_actions' and 'delay'"),
        ({"prev_actions": np.zeros((5, 14), np.float32)}, "needs both"),
        ({"prev_actions": np.zeros((5, 14), np.float32), "delay": 6}, "delay 6 exceeds the 5 prev_actions"),
        ({"prev_actions": np.zeros((5, 13), np.float32), "delay": 2}, r"prev_actions must be \[n, 14\]"),
        ({"prev_actions": np.full((5, 14), np.nan, np.float32), "delay": 2}, "finite"),
        ({"prev_actions": np.zeros((5, 14), np.float32), "delay": -1}, "non-negative"),
    ],
)
def test_bad_rtc_requests_are_refused_by_the_daemon(daemon, dummy_bundle: Path, change: dict, message: str) -> None:
    obs = Observation.synthetic(engine_for(dummy_bundle).metadata(), seed=1).to_dict()
    with PolicyClient(daemon.endpoint, timeout_s=30, retries=0) as client:
        with pytest.raises(PolicyError, match=message) as info:
            client.infer({**obs, **change})
        assert info.value.code == "bad_request"
        chunk = client.infer(obs)["actions"]
        joined = client.infer({**obs, "prev_actions": chunk[EXECUTED:], "delay": DELAY})["actions"]
    np.testing.assert_allclose(joined[:DELAY], chunk[EXECUTED : EXECUTED + DELAY], atol=1e-6, rtol=0)


def test_the_engine_refuses_a_bad_delay_directly(dummy_bundle: Path) -> None:
    engine = engine_for(dummy_bundle)
    obs = Observation.synthetic(engine.metadata(), seed=1)
    with pytest.raises(EngineError, match="exceeds"):
        engine.infer(Observation(obs.images, obs.state, tokens=obs.tokens, token_mask=obs.token_mask,
                                 prev_actions=np.zeros((2, 14), np.float32), delay=3))  # fmt: skip
