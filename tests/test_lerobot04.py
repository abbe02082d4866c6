"""LeRobot >= 0.4 checkpoints, pi0 and pi0.5, against what LeRobot 0.4.4's own code computed for them
(tests/fixtures/lerobot04-*-tiny; each README says what ran): the processor pipelines read step by step,
stage checks, then whole through `pi0-export bundle` + `pi0-runtime infer` and through the daemon."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, check_actions, export_fixtures, infer_cli, inspect_cli

from exporter.checkpoint import CheckpointError, load_checkpoint
from exporter.validate import compare
from pi0_client import PolicyClient
from runtime.pipeline.model_io import model_state, postprocess, preprocess, prompt_state
from runtime.pipeline.tokenizer import PromptTokenizer
from runtime.pipeline.transforms import discretize_state

NAMES = ("lerobot04-pi0-tiny", "lerobot04-pi05-tiny")


class Golden04:
    def __init__(self, name: str) -> None:
        self.root = FIXTURES / name
        self.checkpoint = self.root / "checkpoint"
        self.tokenizer = self.root / "tokenizer.model"
        self.prompt = (self.root / "prompt.txt").read_text()
        self.data = dict(np.load(self.root / "golden.npz", allow_pickle=False))
        self.images = {k.split("::", 1)[1]: v[0] for k, v in self.data.items() if k.startswith("image::")}
        self.state, self.noise = self.data["state"][0], self.data["noise"]
        self.tokens, self.token_mask = self.data["lang_tokens"], self.data["lang_masks"]
        self.actions_fp32 = self.data["actions_fp32"][0]

    def request(self, with_tokens: bool) -> dict:
        request = {**self.images, "observation.state": self.state, "noise": self.noise}
        if with_tokens:
            return {**request, "lang_tokens": self.tokens, "lang_masks": self.token_mask}
        return {**request, "prompt": self.prompt}


@pytest.fixture(params=NAMES)
def golden(request: pytest.FixtureRequest) -> Golden04:
    return Golden04(request.param)


def test_preprocessing_alone(golden: Golden04) -> None:
    spec = load_checkpoint(golden.checkpoint).spec
    assert spec.conventions == "lerobot-0.4" and spec.camera_keys == tuple(golden.images)
    state = model_state(spec, golden.state)
    assert compare(state, golden.data["state_model"][0])["max_abs"] <= 1e-6
    inputs = preprocess(spec, golden.images, state, golden.tokens, golden.token_mask)
    for slot, key in enumerate(spec.camera_keys):  # resized in [0, 1], padded with -1, then x * 2 - 1: -3
        want = golden.data[f"image_model::{key}"][0]
        assert (want[:, :28] == -3).all()
        np.testing.assert_allclose(inputs.images[0, slot], want, atol=1e-6)
    tokenizer = PromptTokenizer(golden.tokenizer, spec.tokenizer_max_length, "lerobot", spec.state_in_prompt)
    bins = discretize_state(prompt_state(spec, state)) if spec.state_in_prompt else None
    tokens, mask = tokenizer(golden.prompt, bins)
    np.testing.assert_array_equal(tokens, golden.tokens)
    np.testing.assert_array_equal(mask, golden.token_mask)
    if spec.state_in_prompt:  # LeRobot writes the state padded to max_state_dim (32 values, padding bin 128)
        assert str(golden.data["prompt_full"]).count(" 128") >= spec.max_state_dim - spec.state_dim


def test_postprocessing_alone(golden: Golden04) -> None:
    spec = load_checkpoint(golden.checkpoint).spec
    actions = postprocess(spec, golden.data["actions_model_fp32"])[0]
    assert compare(actions, golden.actions_fp32)["max_abs"] <= 1e-5


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    return export_fixtures(tmp_path_factory, NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cli_export_then_infer(name: str, precision: str, bundles, tmp_path: Path) -> None:
    golden = Golden04(name)
    arrays = {**golden.images, "observation.state": golden.state, "prompt": np.array(golden.prompt)}
    actions = infer_cli(bundles[name, precision], arrays, golden.noise, tmp_path)
    check_actions(actions, golden.actions_fp32, precision)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_daemon_serves_lerobot04_bundles(name: str, precision: str, bundles, start_daemon) -> None:
    golden = Golden04(name)
    daemon = start_daemon(bundles[name, precision])
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        assert client.metadata().conventions == "lerobot-0.4"
        for with_tokens in (True, False):
            check_actions(client.infer(golden.request(with_tokens))["actions"], golden.actions_fp32, precision)


def edited_copy(name: str, tmp_path: Path, edit) -> Path:
    copy = tmp_path / name
    shutil.copytree(FIXTURES / name / "checkpoint", copy)
    pipeline = json.loads((copy / "policy_preprocessor.json").read_text())
    edit(pipeline["steps"])
    (copy / "policy_preprocessor.json").write_text(json.dumps(pipeline))
    return copy


def test_an_unknown_processor_step_is_refused_by_name(tmp_path: Path) -> None:
    copy = edited_copy(
        "lerobot04-pi0-tiny", tmp_path, lambda steps: steps.insert(3, {"registry_name": "my_clip", "config": {}})
    )
    with pytest.raises(CheckpointError, match=r"step 3 'my_clip' is not one this exporter knows"):
        load_checkpoint(copy)
    order = edited_copy(
        "lerobot04-pi05-tiny", tmp_path, lambda steps: steps.insert(1, steps.pop(3))
    )  # state before normalizing
    with pytest.raises(CheckpointError, match="normalized state into the prompt"):
        load_checkpoint(order)


def test_each_lerobot_format_names_the_other(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"LeRobot >= 0.4 checkpoint .*read it as lerobot-0.4"):
        load_checkpoint(FIXTURES / "lerobot04-pi0-tiny" / "checkpoint", source_format="lerobot-0.3")
    with pytest.raises(CheckpointError, match=r"LeRobot v0.3 checkpoint .*read it as lerobot-0.3"):
        load_checkpoint(FIXTURES / "lerobot-pi0-tiny" / "checkpoint", source_format="lerobot-0.4")
    assert load_checkpoint(FIXTURES / "lerobot-pi0-tiny" / "checkpoint").spec.conventions == "lerobot-0.3"


def test_inspect_prints_the_pipeline_step_by_step() -> None:
    report = inspect_cli(FIXTURES / "lerobot04-pi05-tiny" / "checkpoint")
    assert (report["framework"], report["model_type"], report["conventions"]["name"]) == (
        "lerobot",
        "pi05",
        "lerobot-0.4",
    )
    steps = report["pipeline"]["policy_preprocessor.json"]
    assert [s.split(":")[1].strip() for s in steps] == [
        "rename_observations_processor",
        "to_batch_processor",
        "normalizer_processor",
        "pi05_prepare_state_tokenizer_processor_step",
        "tokenizer_processor",
        "device_processor",
    ]
    assert report["spec"]["state_norm"]["mode"] == "quantiles" and report["spec"]["state_norm"]["eps_rule"] == "lerobot"
