"""LeRobot 0.5/0.6 checkpoints, pi0 and pi0.5 with relative actions, against what LeRobot 0.6.1's own code
computed for them (tests/fixtures/lerobot06-*-relative; each README says what ran): stage by stage
(preprocessing, network, postprocessing alone, so that a mismatch names its stage), then whole through
`pi0-export bundle` + `pi0-runtime infer` and through the daemon; and the checkpoints this reader refuses."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, check_actions, export_fixtures, infer_cli, inspect_cli
from test_lerobot04 import Golden04 as Golden06  # the same files: golden.npz, prompt.txt, tokenizer.model

from exporter.checkpoint import CheckpointError, load_checkpoint
from exporter.safetensors_io import SafetensorsFile
from exporter.torch_backend import TorchBackend
from exporter.validate import compare
from pi0_client import PolicyClient
from runtime.engine import sample
from runtime.pipeline import transforms
from runtime.pipeline.model_io import ModelInputs, actions_to_model, model_state, postprocess, preprocess, prompt_state
from runtime.pipeline.tokenizer import PromptTokenizer

NAMES = ("lerobot06-pi0-relative", "lerobot06-pi05-relative")
PRE, POST = "policy_preprocessor.json", "policy_postprocessor.json"


@pytest.fixture(params=NAMES)
def golden(request: pytest.FixtureRequest) -> Golden06:
    return Golden06(request.param)


# --- stage by stage --------------------------------------------------------------------------------


def test_preprocessing_alone(golden: Golden06) -> None:
    spec = load_checkpoint(golden.checkpoint).spec
    assert spec.conventions == "lerobot-0.6" and spec.camera_keys == tuple(golden.images)
    state = model_state(spec, golden.state)
    assert compare(state, golden.data["state_model"][0])["max_abs"] <= 1e-6
    inputs = preprocess(spec, golden.images, state, golden.tokens, golden.token_mask)
    for slot, key in enumerate(spec.camera_keys):  # resized in [0, 1], padded with 0, then x * 2 - 1: -1
        want = golden.data[f"image_model::{key}"][0]
        assert (want[:, :28] == -1).all() and (want[:, 196:] == -1).all()
        np.testing.assert_allclose(inputs.images[0, slot], want, atol=1e-6)
    tokenizer = PromptTokenizer(golden.tokenizer, spec.tokenizer_max_length, "lerobot", spec.state_in_prompt)
    bins = transforms.discretize_state(prompt_state(spec, state)) if spec.state_in_prompt else None
    tokens, mask = tokenizer(golden.prompt, bins)
    np.testing.assert_array_equal(tokens, golden.tokens)
    np.testing.assert_array_equal(mask, golden.token_mask)
    if spec.state_in_prompt:  # LeRobot 0.6 writes the robot's 7 state values, not 32
        written = str(golden.data["prompt_full"]).split("State: ", 1)[1].split(";", 1)[0].split()
        assert len(written) == spec.state_dim == len(bins)


@pytest.mark.parametrize("name", NAMES)
def test_network_alone(name: str) -> None:
    """LeRobot's own model inputs (images as SigLIP received them, normalized state, tokens) through our
    PyTorch model under the runtime's Euler loop -> LeRobot's chunk before its postprocessor."""
    golden = Golden06(name)
    policy = load_checkpoint(golden.checkpoint)
    spec, d = policy.spec, golden.data
    images = np.stack([d[f"image_model::{key}"][0] for key in spec.camera_keys])[None]
    state = transforms.pad_vector(d["state_model"], spec.max_state_dim)
    inputs = ModelInputs(images, np.ones((1, len(spec.camera_keys)), bool), golden.tokens, golden.token_mask, state)
    x = sample(TorchBackend(policy.model), inputs, golden.noise, spec.num_steps)
    assert compare(x[..., : spec.action_dim], d["actions_model_fp32"])["max_abs"] <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_the_embedding_is_embed_tokens_not_the_stored_lm_head(name: str) -> None:
    checkpoint = FIXTURES / name / "checkpoint"
    stored = SafetensorsFile(checkpoint / "model.safetensors")
    prefix = "model.paligemma_with_expert.paligemma."
    embed = stored.tensor(prefix + "model.language_model.embed_tokens.weight").numpy()
    head = stored.tensor(prefix + "lm_head.weight").numpy()
    assert not np.array_equal(embed, head)  # the fixture's point: 0.6's head is not tied to the embedding
    np.testing.assert_array_equal(load_checkpoint(checkpoint).model.embed_tokens.weight.numpy(), embed)


@pytest.mark.parametrize("name", NAMES)
def test_postprocessing_alone(name: str) -> None:
    golden = Golden06(name)
    spec, d = load_checkpoint(golden.checkpoint).spec, golden.data
    assert spec.delta_action_mask == tuple(d["relative_mask"]) and spec.delta_reference == "raw_state"
    actions = postprocess(spec, d["actions_model_fp32"], golden.state)[0]
    assert compare(actions, golden.actions_fp32)["max_abs"] <= 1e-5
    # Without the mask: LeRobot's chunk with its absolute step disabled.
    relative = postprocess(replace(spec, delta_action_mask=None), d["actions_model_fp32"])[0]
    assert compare(relative, d["actions_relative_fp32"][0])["max_abs"] <= 1e-5
    # And back (real-time chunking holds a new chunk to the previous one in the model's space).
    back = actions_to_model(spec, golden.actions_fp32, golden.state)
    assert compare(back[:, : spec.action_dim], d["actions_model_fp32"][0])["max_abs"] <= 1e-4
    assert not back[:, spec.action_dim :].any()


# --- whole: the CLIs, and the daemon ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    return export_fixtures(tmp_path_factory, NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cli_export_then_infer(name: str, precision: str, bundles, tmp_path: Path) -> None:
    golden = Golden06(name)
    manifest = json.loads((bundles[name, precision] / "manifest.json").read_text())
    assert manifest["policy"]["delta_action_mask"] == golden.data["relative_mask"].tolist()
    arrays = {**golden.images, "observation.state": golden.state, "prompt": np.array(golden.prompt)}
    actions = infer_cli(bundles[name, precision], arrays, golden.noise, tmp_path)
    check_actions(actions, golden.actions_fp32, precision)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_daemon_serves_lerobot06_bundles(name: str, precision: str, bundles, start_daemon) -> None:
    golden = Golden06(name)
    daemon = start_daemon(bundles[name, precision])
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        assert client.metadata().conventions == "lerobot-0.6"
        for with_tokens in (True, False):
            check_actions(client.infer(golden.request(with_tokens))["actions"], golden.actions_fp32, precision)


def test_inspect_reports_the_conventions_and_the_relative_mask() -> None:
    report = inspect_cli(FIXTURES / "lerobot06-pi05-relative" / "checkpoint")
    assert (report["framework"], report["model_type"], report["conventions"]["name"]) == (
        "lerobot",
        "pi05",
        "lerobot-0.6",
    )
    assert report["spec"]["delta_action_mask"] == [True] * 6 + [False]
    assert report["spec"]["delta_reference"] == "raw_state"
    assert report["relative_actions"]["relative_dims"] == [0, 1, 2, 3, 4, 5]
    assert report["relative_actions"]["absolute_dims"] == [6]
    steps = {name: [s.split(":")[1].strip() for s in lines] for name, lines in report["pipeline"].items()}
    assert steps[PRE] == [
        "rename_observations_processor",
        "to_batch_processor",
        "relative_actions_processor",
        "normalizer_processor",
        "pi05_prepare_state_tokenizer_processor_step",
        "tokenizer_processor",
        "device_processor",
    ]
    assert steps[POST] == ["unnormalizer_processor", "absolute_actions_processor", "device_processor"]


# --- edited copies: what is refused, and what is told apart ----------------------------------------


def edited_copy(name: str, tmp_path: Path, pre=None, post=None, config=None) -> Path:
    """A copy of a fixture's checkpoint with `edit(steps)` applied to either pipeline, `config(dict)` to
    config.json."""
    copy = tmp_path / name
    shutil.copytree(FIXTURES / name / "checkpoint", copy)
    for file, edit in ((PRE, pre), (POST, post), ("config.json", config)):
        if edit is not None:
            data = json.loads((copy / file).read_text())
            edit(data["steps"] if file != "config.json" else data)
            (copy / file).write_text(json.dumps(data))
    return copy


def step(steps: list[dict], registry: str) -> dict:
    return next(s for s in steps if s["registry_name"] == registry)


def switch(registry: str, on: bool) -> Callable[[list[dict]], None]:
    return lambda steps: step(steps, registry)["config"].update(enabled=on)


def drop(registry: str) -> Callable[[list[dict]], None]:
    return lambda steps: steps.remove(step(steps, registry))


def test_an_unknown_processor_step_is_refused_by_name(tmp_path: Path) -> None:
    copy = edited_copy(
        "lerobot06-pi0-relative",
        tmp_path,
        pre=lambda steps: steps.insert(3, {"registry_name": "my_clip", "config": {}}),
    )
    with pytest.raises(CheckpointError, match=r"step 3 'my_clip' is not one this exporter knows"):
        load_checkpoint(copy)


INCONSISTENT = {
    "absolute disabled": (
        {"post": switch("absolute_actions_processor", False)},
        r"relative_actions_processor is enabled in policy_preprocessor.json but absolute_actions_processor is "
        r"disabled in policy_postprocessor.json",
    ),
    "absolute missing": (
        {"post": drop("absolute_actions_processor")},
        r"relative_actions_processor is enabled .* absolute_actions_processor is missing",
    ),
    "relative disabled": (
        {"pre": switch("relative_actions_processor", False)},
        r"relative_actions_processor is disabled .* absolute_actions_processor is enabled",
    ),
    "relative missing": (
        {"pre": drop("relative_actions_processor")},
        r"relative_actions_processor is missing .* absolute_actions_processor is enabled",
    ),
    "config disagrees": (
        {"config": lambda c: c.update(use_relative_actions=False)},
        r"config.json has use_relative_actions False but the pipelines' relative action steps are enabled",
    ),
    "names too few": (
        {"pre": lambda steps: step(steps, "relative_actions_processor")["config"]["action_names"].pop()},
        r"relative_actions_processor names 6 actions .* the actions have 7 dims",
    ),
    "relative after normalizing": (
        {"pre": lambda steps: steps.append(steps.pop(steps.index(step(steps, "relative_actions_processor"))))},
        r"relative_actions_processor before the normalizer",
    ),
}


@pytest.mark.parametrize("case", INCONSISTENT)
@pytest.mark.parametrize("name", NAMES)
def test_inconsistent_relative_actions_are_refused(name: str, case: str, tmp_path: Path) -> None:
    edits, message = INCONSISTENT[case]
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(edited_copy(name, tmp_path, **edits))


def test_both_steps_disabled_give_lerobots_chunk_with_the_absolute_step_off(tmp_path: Path) -> None:
    golden = Golden06("lerobot06-pi0-relative")
    copy = edited_copy(
        golden.root.name,
        tmp_path,
        pre=switch("relative_actions_processor", False),
        post=switch("absolute_actions_processor", False),
        config=lambda c: c.update(use_relative_actions=False),
    )
    spec = load_checkpoint(copy).spec
    assert spec.conventions == "lerobot-0.6" and spec.delta_action_mask is None
    actions = postprocess(spec, golden.data["actions_model_fp32"], golden.state)[0]
    assert compare(actions, golden.data["actions_relative_fp32"][0])["max_abs"] <= 1e-5


def test_the_mask_follows_lerobots_substring_rule(tmp_path: Path) -> None:
    """An exclude_joints entry, lower-cased, that equals or is inside a lower-cased action name keeps that
    dim absolute (LeRobot's `_build_mask`); without action names or exclusions every dim is relative."""

    def relative_step(**config) -> Callable[[list[dict]], None]:
        return lambda steps: step(steps, "relative_actions_processor")["config"].update(config)

    cases = [
        ({"exclude_joints": ["WRIST", "gripper.pos"]}, (True, True, True, False, False, False, False)),
        ({"exclude_joints": ["shoulder_pan.pos", ""]}, (False, True, True, True, True, True, True)),
        ({"exclude_joints": []}, (True,) * 7),
        ({"action_names": None}, (True,) * 7),
    ]
    for i, (config, mask) in enumerate(cases):
        copy = edited_copy("lerobot06-pi05-relative", tmp_path / str(i), pre=relative_step(**config))
        assert load_checkpoint(copy).spec.delta_action_mask == mask, config


def test_lerobot_05_0_is_told_by_its_untied_embedding(tmp_path: Path) -> None:
    """LeRobot 0.5.0 saved no relative action steps yet, but it already padded images with 0, wrote pi0.5's
    state unpadded and stored transformers 5's untied embed_tokens: read with the 0.6 conventions."""
    copy = edited_copy(
        "lerobot06-pi05-relative",
        tmp_path,
        pre=drop("relative_actions_processor"),
        post=drop("absolute_actions_processor"),
        config=lambda c: [
            c.pop(k) for k in ("use_relative_actions", "relative_exclude_joints", "action_feature_names")
        ],
    )
    spec = load_checkpoint(copy).spec
    assert spec.conventions == "lerobot-0.6" and spec.delta_action_mask is None


def test_each_lerobot_format_names_the_other() -> None:
    with pytest.raises(CheckpointError, match=r"LeRobot >= 0.5 checkpoint .*relative_actions_processor.*lerobot-0.6"):
        load_checkpoint(FIXTURES / "lerobot06-pi0-relative" / "checkpoint", source_format="lerobot-0.4")
    with pytest.raises(CheckpointError, match=r"LeRobot 0.4 checkpoint .*read it as lerobot-0.4"):
        load_checkpoint(FIXTURES / "lerobot04-pi05-tiny" / "checkpoint", source_format="lerobot-0.6")
    with pytest.raises(CheckpointError, match=r"LeRobot v0.3 checkpoint .*read it as lerobot-0.3"):
        load_checkpoint(FIXTURES / "lerobot-pi0-tiny" / "checkpoint", source_format="lerobot-0.6")
    assert load_checkpoint(FIXTURES / "lerobot04-pi05-tiny" / "checkpoint").spec.conventions == "lerobot-0.4"
