"""The ACL backend against the pyACL stand-in (tests/stubs/acl.py): same actions as onnxruntime, the
prefix cache never copied per step, everything freed in order."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, QUIET, STUBS, Golden

from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.presets import build_preset
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.engine import Engine
from runtime.pipeline.observation import Observation


@pytest.fixture
def om_bundle(tmp_path: Path, ascend_tools: Path) -> Path:
    out = tmp_path / "bundle"
    build_bundle(build_preset("pi0-dummy"), out, BundleOptions(precision="fp16", atc_mode="always"), **QUIET)
    return out


def observation(spec, seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    images = {
        k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for k, (_, h, w) in zip(spec.camera_keys, spec.camera_shapes, strict=True)
    }
    ids = np.zeros((1, spec.tokenizer_max_length), np.int64)
    ids[0, :3] = [2, 40, 41]
    state = rng.normal(size=spec.state_dim).astype(np.float32)
    return Observation(images, state, tokens=ids, token_mask=ids != 0, seed=seed)


def test_acl_gives_the_same_actions_as_onnxruntime(acl, om_bundle: Path) -> None:
    from runtime.backends.acl import AclBackend

    bundle = load_bundle(om_bundle)
    obs = observation(bundle.spec, seed=5)
    ours, _ = Engine.from_bundle(bundle, AclBackend(bundle)).infer(obs)
    theirs, _ = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)).infer(obs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_the_prefix_cache_stays_on_the_device(acl, om_bundle: Path) -> None:
    from runtime.backends.acl import AclBackend

    bundle = load_bundle(om_bundle)
    engine = Engine.from_bundle(bundle, AclBackend(bundle))
    obs = observation(bundle.spec, seed=1)
    acl.COUNTS.clear()
    engine.infer(obs)
    steps = bundle.spec.num_steps
    # Per inference: 4 VLM inputs and the state once; x_t and t per step; the velocity back per step.
    assert acl.COUNTS["H2D"] == 4 + 1 + 2 * steps
    assert acl.COUNTS["D2H"] == steps and acl.COUNTS["D2D"] == 0
    assert acl.COUNTS["execute"] == 1 + steps and acl.COUNTS["malloc"] == 0
    size = bundle.tensor_bytes
    vlm_in = sum(size[name] for name in ("images", "image_masks", "tokens", "token_mask"))
    expected = vlm_in + size["state"] + steps * (size["x_t"] + size["t"])
    assert acl.COUNTS["H2D_bytes"] == expected
    # One copy of the cache alone would be more than everything that went in after the VLM's inputs.
    assert size["prefix_keys"] + size["prefix_values"] > expected - vlm_in


def test_close_frees_everything_in_order(acl, om_bundle: Path) -> None:
    from runtime.backends.acl import AclBackend

    bundle = load_bundle(om_bundle)
    backend = AclBackend(bundle)
    result = {}

    def run() -> None:  # the server's engine runs in a worker thread: contexts are per thread
        result["actions"] = Engine.from_bundle(bundle, backend).infer(observation(bundle.spec, seed=0))[0]

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert np.isfinite(result["actions"]).all()
    backend.close()
    assert acl.LEAKS == []
    assert acl.finalize() == 0  # nothing left allocated: finalize (which the backend leaves to exit) succeeds


def test_leaks_are_caught_by_the_stand_in(acl) -> None:
    assert acl.init() == 0 and acl.rt.set_device(0) == 0
    _, ret = acl.rt.create_context(0)
    ptr, ret = acl.rt.malloc(64, 0)
    assert ret == 0 and acl.finalize() != 0 and "1 device allocations" in acl.LEAKS[0]
    assert acl.rt.memcpy(ptr, 64, ptr, 64, 1) != 0, "H2D from a device pointer must be refused"


def test_golden_fixture_through_acl(acl, tmp_path: Path, ascend_tools: Path) -> None:
    from runtime.backends.acl import AclBackend

    golden = Golden("lerobot-pi0-tiny-aloha-sim")
    out = tmp_path / "bundle"
    build_bundle(load_checkpoint(FIXTURES / golden.name / "checkpoint"), out, BundleOptions(atc_mode="always"), **QUIET)
    bundle = load_bundle(out)
    obs = Observation(
        golden.images, golden.state, tokens=golden.tokens, token_mask=golden.token_mask, noise=golden.noise
    )
    actions, _ = Engine.from_bundle(bundle, AclBackend(bundle)).infer(obs)
    assert np.abs(actions - golden.actions_fp32[0]).max() <= 1e-4


def test_daemon_serves_on_the_acl_backend(om_bundle: Path, monkeypatch: pytest.MonkeyPatch, start_daemon) -> None:
    from pi0_client.client import PolicyClient

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUBS), os.environ.get("PYTHONPATH", "")]))
    d = start_daemon(om_bundle, "--backend", "acl")
    with PolicyClient(d.endpoint, timeout_s=30) as client:
        assert client.metadata().backend == "acl"
        obs = observation(load_bundle(om_bundle).spec, seed=0)
        result = client.infer(Observation(obs.images, obs.state, tokens=obs.tokens).to_dict())
        assert result["actions"].shape == (50, 14)
    assert d.stop() == 0
    assert "acl" in d.log()


def test_openpi_pi05_fixture_through_acl(acl, tmp_path: Path, ascend_tools: Path) -> None:
    """pi0.5's expert graph takes no state: the ACL backend copies x_t and t per step and nothing else."""
    from runtime.backends.acl import AclBackend

    fixture = FIXTURES / "openpi-pi05-tiny"
    data = np.load(fixture / "golden.npz", allow_pickle=False)
    out = tmp_path / "bundle"
    policy = load_checkpoint(fixture / "checkpoint", adapt_to_pi_aloha=True, max_token_len=80)
    build_bundle(policy, out, BundleOptions(atc_mode="always"), **QUIET)
    bundle = load_bundle(out)
    images = {k.split("::", 1)[1]: data[k][0] for k in data.files if k.startswith("image::")}
    obs = Observation(
        images, data["state"][0], tokens=data["lang_tokens"], token_mask=data["lang_masks"], noise=data["noise"]
    )
    acl.COUNTS.clear()
    actions, _ = Engine.from_bundle(bundle, AclBackend(bundle)).infer(obs)
    assert np.abs(actions - data["actions_fp32"][0]).max() <= 1e-4
    steps = bundle.spec.num_steps
    assert acl.COUNTS["H2D"] == 4 + 2 * steps and acl.COUNTS["D2H"] == steps
