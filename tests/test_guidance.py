"""Classifier-free guidance (docs/guidance.md): per step v_u + beta (v_c - v_u), both branches one batched
expert call, for a condition in the prompt (two prefixes, one batched VLM call) and a learned condition
embedding, pi0 and pi0.5. The graphs' guided chunk is held to the PyTorch reference computing each branch
apart, as the definition reads (`exporter.torch_backend.TorchBackend`); beta = 1 is the conditioned branch
alone; on ACL (the stand-in) two caches stay alive and no cache is copied per step; the scale travels over
ZeroMQ and openpi's websocket."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, FIXTURES, QUIET, check_actions, export_cli, free_port

from exporter.bundle import BundleBuildError, BundleOptions, build_bundle
from exporter.checkpoint import LoadedPolicy, load_checkpoint
from exporter.pi0 import Pi0
from exporter.presets import build_preset
from exporter.torch_backend import reference_engine
from runtime.backends import BackendOptions
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.graphs import EXPERT, EXPERT_GUIDED, VLM, VLM_GUIDED
from runtime.bundle.manifest import BundleError, load_bundle
from runtime.engine import Engine, EngineError, denoise
from runtime.pipeline.model_io import ModelInputs
from runtime.pipeline.observation import Observation, ObservationError

CONDITION_TEXT = ", Advantage: positive"
TASK = "transfer the cube"
SCALES = (0.0, 2.5)
PI05 = "openpi-pi05-tiny"


def with_learned_condition(policy: LoadedPolicy, seed: int = 1) -> LoadedPolicy:
    """The policy's model with a condition embedding (seed 003's bias mode), its rows drawn apart so that
    the two branches differ clearly."""
    model = Pi0(dataclasses.replace(policy.model.dims, condition="bias")).eval().requires_grad_(False)
    state = dict(policy.model.state_dict())
    state["condition_embedding.weight"] = torch.randn(
        2, policy.model.dims.expert.width, generator=torch.Generator().manual_seed(seed)
    )
    model.load_state_dict(state)
    return dataclasses.replace(policy, model=model)


def source_policy(which: str) -> tuple[LoadedPolicy, Path | None]:
    """pi0 (the dummy preset) or pi0.5 (openpi's tiny fixture), and the tokenizer its fixture ships."""
    if which == "pi0":
        return build_preset("pi0-dummy"), None
    policy = load_checkpoint(FIXTURES / PI05 / "checkpoint", openpi_config="pi0_aloha_sim", max_token_len=80)
    return policy, FIXTURES / PI05 / "tokenizer.model"


def copy_policy(policy: LoadedPolicy) -> LoadedPolicy:
    """An independent copy (build_bundle consumes its policy's model)."""
    model = Pi0(policy.model.dims).eval().requires_grad_(False)
    model.load_state_dict(policy.model.state_dict())
    return dataclasses.replace(policy, model=model)


class Case:
    """One kind of condition on one model: its float32 policy (kept for the reference) and its bundles."""

    def __init__(self, which: str, kind: str, tokenizer: Path, root: Path) -> None:
        policy, own_tokenizer = source_policy(which)
        self.tokenizer = own_tokenizer or tokenizer
        self.policy = with_learned_condition(policy) if kind == "embedding" else policy
        self.kind, self.root = kind, root
        self.options = BundleOptions(  # ONNX only unless a test asks for OM files (whatever is on PATH)
            tokenizer=self.tokenizer,
            guidance_prompt=CONDITION_TEXT if kind == "prompt" else None,
            guidance_scale=2.0,
            atc_mode="never",
        )
        self.bundles: dict[str, Path] = {}

    def bundle(self, precision: str = "fp32", **changes) -> Path:
        key = f"{precision}-{sorted(changes.items())}"
        if key not in self.bundles:
            out = self.root / f"{len(self.bundles)}-{precision}"
            options = dataclasses.replace(self.options, precision=precision, **changes)
            build_bundle(copy_policy(self.policy), out, options, **QUIET)
            self.bundles[key] = out
        return self.bundles[key]

    def reference(self) -> Engine:
        bundle = load_bundle(self.bundle())
        return reference_engine(copy_policy(self.policy), self.tokenizer, bundle.manifest.guidance)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("guidance")
    return {
        f"{which}-{kind}": Case(which, kind, tokenizer_path, root / f"{which}-{kind}")
        for which in ("pi0", "pi0.5")
        for kind in ("prompt", "embedding")
    }


def engine_on(bundle_path: Path) -> Engine:
    bundle = load_bundle(bundle_path)
    return Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle, BackendOptions(threads=1)))


def observation(engine: Engine, seed: int, **fields) -> Observation:
    obs = Observation.synthetic(engine.metadata(), seed=seed)
    return Observation(obs.images, obs.state, prompt=TASK, seed=seed, **fields)


CASES = ["pi0-prompt", "pi0-embedding", "pi0.5-prompt", "pi0.5-embedding"]


@pytest.mark.parametrize("name", CASES)
def test_guided_chunk_equals_the_two_branches_computed_apart(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    engine, reference = engine_on(case.bundle()), case.reference()
    assert engine.metadata().extra["guidance"]["kind"] == case.kind
    graphs = set(load_bundle(case.bundle()).graphs)
    assert graphs == {VLM, EXPERT, EXPERT_GUIDED} | ({VLM_GUIDED} if case.kind == "prompt" else set())
    report = load_bundle(case.bundle()).manifest.validation
    assert report is not None
    chunks = {}
    for scale in (*SCALES, None):  # None: the bundle's default, 2
        obs = observation(engine, 3, guidance_scale=scale)
        got, want = engine.infer(obs)[0], reference.infer(obs)[0]
        print(f"\n{name} beta {scale}: max abs {np.abs(got - want).max():.2e}")  # pytest -s
        assert np.abs(got - want).max() <= 1e-5, (scale, np.abs(got - want).max())
        chunks[scale] = got
    conditioned = engine.infer(observation(engine, 3, guidance_scale=1.0))[0]
    # guidance moves the chunk, and beta = 0 is the unconditioned branch: not the conditioned one
    assert np.abs(chunks[2.5] - conditioned).max() > 1e-3 and np.abs(chunks[0.0] - conditioned).max() > 1e-3
    np.testing.assert_array_equal(chunks[None], engine.infer(observation(engine, 3, guidance_scale=2.0))[0])


@pytest.mark.parametrize("name", ["pi0-prompt", "pi0.5-prompt"])
def test_beta_one_is_the_conditioned_prompt_unguided_exactly(name: str, cases: dict[str, Case]) -> None:
    """A condition in the prompt, beta = 1: exactly what a bundle without guidance gives for the task
    followed by the condition text, through the plain graphs."""
    case = cases[name]
    engine = engine_on(case.bundle())
    plain = engine_on(case.bundle(guidance_prompt=None, guidance_scale=1.0))
    assert "guidance" not in plain.metadata().extra
    for seed in (1, 2):
        got = engine.infer(observation(engine, seed, guidance_scale=1.0))[0]
        obs = observation(plain, seed)
        want = plain.infer(dataclasses.replace(obs, prompt=TASK + CONDITION_TEXT))[0]
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def om_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import ascend_tools_path

    monkeypatch.setenv("PATH", ascend_tools_path(tmp_path / "ascend-bin"))


def traced_inputs(trace: dict) -> ModelInputs:
    """The network inputs of a traced request."""
    return ModelInputs(*(trace[f"input.{k}"] for k in ("images", "image_masks", "tokens", "token_mask", "state")))


@pytest.mark.parametrize("name", ["pi0-embedding", "pi0.5-embedding"])
def test_beta_one_is_the_positive_branch_alone(name: str, cases: dict[str, Case], acl, om_tools) -> None:
    """A learned condition, beta = 1: the plain expert graph alone (the stand-in counts the calls), equal to
    the reference's positive branch; the batched graph forced to beta = 1 agrees with it."""
    from runtime.backends.acl import AclBackend

    case = cases[name]
    engine, reference = engine_on(case.bundle()), case.reference()
    obs = observation(engine, 4, guidance_scale=1.0)
    trace: dict = {}
    got = engine.infer(obs, trace=trace)[0]
    assert np.abs(got - reference.infer(obs)[0]).max() <= 1e-5
    inputs = traced_inputs(trace)
    cache = engine.backend.prefix(inputs)
    forced = denoise(engine.backend, cache, inputs.state, trace["noise"], engine.spec.num_steps, guidance_scale=1.0)
    np.testing.assert_allclose(forced, trace["x_final"], atol=1e-5)

    loaded = load_bundle(case.bundle("fp16", atc_mode="always"))
    acl_engine = Engine.from_bundle(loaded, AclBackend(loaded))
    acl.COUNTS.clear()
    acl_engine.infer(obs)
    steps = loaded.spec.num_steps
    assert acl.COUNTS["execute"] == 1 + steps
    assert acl.COUNTS["execute:" + EXPERT] == steps and acl.COUNTS["execute:" + EXPERT_GUIDED] == 0
    acl_engine.close()


@pytest.mark.parametrize("name", CASES)
def test_fp16_on_acl_two_caches_alive_and_no_cache_copied_per_step(
    name: str, cases: dict[str, Case], acl, om_tools
) -> None:
    """fp16 through the stand-in: the guided chunk within Step 11's thresholds of the fp32 reference; a
    guided cache and a plain one alive at once, steps interleaved, each equal to its run alone; per guided
    request the copy ledger holds the VLM's inputs, the state and the scale once, x_t and t per step."""
    from runtime.backends.acl import AclBackend

    case = cases[name]
    loaded = load_bundle(case.bundle("fp16", atc_mode="always"))
    engine = Engine.from_bundle(loaded, AclBackend(loaded))
    reference = case.reference()
    obs = observation(engine, 5, guidance_scale=2.5)
    check_actions(engine.infer(obs)[0], reference.infer(obs)[0], "fp16")
    onnx = engine_on(case.bundle("fp16", atc_mode="always")).infer(obs)[0]
    np.testing.assert_allclose(engine.infer(obs)[0], onnx, atol=1e-6)

    acl.COUNTS.clear()
    engine.infer(obs)
    steps = loaded.spec.num_steps
    vlm = VLM_GUIDED if case.kind == "prompt" else VLM
    size = {g: {t["name"]: t for t in loaded.graphs[g].inputs + loaded.graphs[g].outputs} for g in (vlm, EXPERT_GUIDED)}

    def nbytes(graph: str, *names: str) -> int:
        return sum(int(np.prod(size[graph][n]["shape"])) * np.dtype(size[graph][n]["dtype"]).itemsize for n in names)

    constants = ("guidance_scale",) if loaded.spec.state_in_prompt else ("state", "guidance_scale")
    assert acl.COUNTS["H2D"] == 4 + len(constants) + 2 * steps
    assert acl.COUNTS["D2H"] == steps and acl.COUNTS["D2D"] == 0 and acl.COUNTS["malloc"] == 0
    assert acl.COUNTS["execute:" + vlm] == 1 and acl.COUNTS["execute:" + EXPERT_GUIDED] == steps
    after_vlm = nbytes(EXPERT_GUIDED, *constants) + steps * nbytes(EXPERT_GUIDED, "x_t", "t")
    assert acl.COUNTS["H2D_bytes"] == nbytes(vlm, "images", "image_masks", "tokens", "token_mask") + after_vlm
    assert nbytes(EXPERT_GUIDED, "prefix_keys", "prefix_values") > after_vlm  # one cache copy would show

    # two caches alive: the guided request's and a plain one's, steps interleaved
    backend = engine.backend
    trace_g, trace_p = {}, {}
    alone_g = engine.infer(obs, trace=trace_g)[0]
    engine.infer(dataclasses.replace(obs, guidance_scale=1.0, seed=6), trace=trace_p)
    a, b = traced_inputs(trace_g), traced_inputs(trace_p)
    cache_a, cache_b = backend.prefix(a, vlm), backend.prefix(b)
    x_a, x_b = trace_g["noise"], trace_p["noise"]
    dt, t = np.float32(-1.0 / steps), np.float32(1.0)
    for _ in range(steps):
        x_a = x_a + dt * backend.velocity(cache_a, a.state, x_a, np.array([t], np.float32), 2.5)
        x_b = x_b + dt * backend.velocity(cache_b, b.state, x_b, np.array([t], np.float32))
        t = np.float32(t + dt)
    np.testing.assert_array_equal(x_a, trace_g["x_final"])
    np.testing.assert_array_equal(x_b, trace_p["x_final"])
    assert alone_g.shape == (loaded.spec.chunk_size, loaded.spec.action_dim)
    cache_a.release()
    cache_b.release()
    engine.close()


@pytest.mark.parametrize("backend_name", ["onnxruntime", "acl"])
def test_a_cache_is_read_only_by_the_graphs_made_for_it(backend_name: str, cases: dict[str, Case], request) -> None:
    from runtime.backends import make_backend

    case = cases["pi0-prompt"]
    if backend_name == "acl":
        request.getfixturevalue("acl")
        request.getfixturevalue("om_tools")
    loaded = load_bundle(case.bundle("fp16", atc_mode="always"))
    backend = make_backend(loaded, backend_name, BackendOptions(threads=1))
    engine = Engine.from_bundle(loaded, backend)
    trace: dict = {}
    engine.infer(observation(engine, 1, guidance_scale=2.5), trace=trace)
    inputs = traced_inputs(trace)
    cache = backend.prefix(inputs, VLM_GUIDED)
    x, t = trace["noise"], np.ones(1, np.float32)
    with pytest.raises(BundleError, match="not by expert"):
        backend.velocity(cache, inputs.state, x, t)  # two prompts' cache, no scale: no graph reads it
    cache.release()
    engine.close()


def test_refusals_name_what_is_accepted(cases: dict[str, Case], dummy_bundle: Path) -> None:
    plain = engine_on(dummy_bundle)
    with pytest.raises(EngineError, match="without classifier-free guidance"):
        plain.infer(observation(plain, 1, guidance_scale=2.0))
    plain.infer(observation(plain, 1, guidance_scale=1.0))  # 1 is what it serves anyway
    for bad in (-1, 11.0, float("nan"), True, "2"):
        with pytest.raises(ObservationError, match="guidance_scale"):
            Observation.from_request({"guidance_scale": bad}, {"observation.state": np.zeros(14, np.float32)})
    engine = engine_on(cases["pi0-prompt"].bundle())
    obs = Observation.synthetic(engine.metadata(), seed=1)  # tokens, no text
    with pytest.raises(EngineError, match="prompt as text"):
        engine.infer(dataclasses.replace(obs, guidance_scale=2.0))
    engine.infer(dataclasses.replace(obs, guidance_scale=1.0))  # tokens as given: the caller's condition


def test_export_refuses_what_it_cannot_serve(cases: dict[str, Case], tmp_path: Path) -> None:
    with pytest.raises(BundleBuildError, match="needs a condition"):
        build_bundle(build_preset("pi0-dummy"), tmp_path / "a", BundleOptions(guidance_scale=2.0), **QUIET)
    with pytest.raises(BundleBuildError, match="learned condition"):
        policy = with_learned_condition(build_preset("pi0-dummy"))
        build_bundle(policy, tmp_path / "b", BundleOptions(guidance_prompt=CONDITION_TEXT), **QUIET)
    with pytest.raises(BundleBuildError, match="between 0 and"):
        build_bundle(build_preset("pi0-dummy"), tmp_path / "c", BundleOptions(guidance_scale=-1.0), **QUIET)


@pytest.mark.parametrize("name", ["pi0-prompt", "pi0.5-prompt"])
def test_fixed_prompts_only_bundle_serves_guidance_without_a_tokenizer(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    fixed = case.bundle(prompts=(TASK,), fixed_prompts_only=True, default_prompt=TASK)
    loaded = load_bundle(fixed)
    assert loaded.tokenizer is None and loaded.manifest.prompt.default == TASK
    assert {p.text for p in loaded.manifest.prompt.fixed} == {TASK, TASK + CONDITION_TEXT}
    engine, full = engine_on(fixed), engine_on(case.bundle())
    for scale in (1.0, 2.5):
        got = engine.infer(dataclasses.replace(observation(engine, 2, guidance_scale=scale), prompt=None))[0]
        want = full.infer(observation(full, 2, guidance_scale=scale))[0]
        np.testing.assert_allclose(got, want, atol=1e-5)  # fewer padded tokens: the same actions


@pytest.mark.parametrize("name", ["pi0-prompt", "pi0-embedding"])
def test_real_time_chunking_inpaints_the_guided_velocity(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    engine, reference = engine_on(case.bundle()), case.reference()
    first = engine.infer(observation(engine, 1, guidance_scale=2.5))[0]
    obs = observation(engine, 2, guidance_scale=2.5, prev_actions=first[10:], delay=3)
    got, want = engine.infer(obs)[0], reference.infer(obs)[0]
    np.testing.assert_array_equal(got[:3], first[10:13])
    assert np.abs(got - want).max() <= 1e-5


def test_a_learned_condition_checkpoint_exports_by_its_weight_name(tmp_path: Path, tokenizer_path: Path) -> None:
    """Our LeRobot-style format (docs/guidance.md): `model.condition_embedding.weight` [2, expert width],
    through both command lines: `pi0-export bundle` finds it, `pi0-runtime infer --guidance-scale` serves it."""
    import json

    from safetensors import safe_open

    from exporter.cli import main as pi0_export_main
    from exporter.readers.lerobot_v03 import save_lerobot

    policy = with_learned_condition(build_preset("pi0-dummy"))
    checkpoint = save_lerobot(policy, tmp_path / "checkpoint")
    with safe_open(str(checkpoint / "model.safetensors"), "np") as f:
        assert f.get_tensor("model.condition_embedding.weight").shape == (2, policy.model.dims.expert.width)
    out = export_cli(
        checkpoint, tmp_path / "bundle", "fp32", "--tokenizer", str(tokenizer_path), "--guidance-scale", "1.5"
    )
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["results"]["guided_beta2"]["max_abs"] <= 1e-4
    guidance = load_bundle(out).manifest.guidance
    assert guidance is not None and (guidance.kind, guidance.default_scale) == ("embedding", 1.5)

    engine = engine_on(out)
    obs = observation(engine, 2)
    obs.save_npz(tmp_path / "obs.npz")
    infer = [str(BIN / "pi0-runtime"), "infer", "--bundle", str(out), "--obs", str(tmp_path / "obs.npz"), "--seed", "2"]
    run = subprocess.run(
        [*infer, "--guidance-scale", "2.5", "--out", str(tmp_path / "a.npy")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    want = engine.infer(dataclasses.replace(obs, guidance_scale=2.5))[0]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), want)
    bad = subprocess.run(
        [*infer, "--guidance-scale", "20", "--out", str(tmp_path / "b.npy")], capture_output=True, text=True
    )
    said = bad.stdout + bad.stderr  # pi0-runtime logs to stdout, as the daemon does
    assert bad.returncode == 2 and "between 0 and 10" in said and "Traceback" not in said

    # a scale without a condition: refused after the model is read (it could have had one), in one line
    status = pi0_export_main(["bundle", "--preset", "pi0-dummy", "--out", str(tmp_path / "x"), "--guidance-scale", "2"])
    assert status == 2 and not (tmp_path / "x").exists()


@pytest.mark.system
def test_the_scale_travels_over_zeromq_and_the_websocket(cases: dict[str, Case], start_daemon) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from pi0_client import PolicyClient

    case = cases["pi0-prompt"]
    engine = engine_on(case.bundle())
    port = free_port()
    daemon = start_daemon(case.bundle(), "--websocket", f"127.0.0.1:{port}")
    obs = observation(engine, 8)
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        assert client.metadata().extra["guidance"] == {
            "kind": "prompt",
            "default_scale": 2.0,
            "condition_text": CONDITION_TEXT,
        }
        for scale in (None, 1.0, 2.5):
            request = dataclasses.replace(obs, guidance_scale=scale).to_dict()
            want = engine.infer(dataclasses.replace(obs, guidance_scale=scale))[0]
            np.testing.assert_array_equal(client.infer(request)["actions"], want)
    policy = WebsocketClientPolicy("127.0.0.1", port)
    frame = obs.images["observation.images.top"].transpose(2, 0, 1)
    sent = {"images": {"cam_high": frame}, "state": obs.state, "prompt": TASK, "seed": 8, "guidance_scale": 2.5}
    want = engine.infer(dataclasses.replace(obs, guidance_scale=2.5))[0]
    np.testing.assert_array_equal(policy.infer(sent)["actions"], want)
