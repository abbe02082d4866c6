"""openpi checkpoints, pi0 and pi0.5, against what openpi's own PyTorch policy computed for them
(tests/fixtures/openpi-*-tiny, each README says what ran): stage by stage (preprocessing, network,
postprocessing alone, so that a mismatch names its stage), then whole, through `pi0-export bundle` and
`pi0-runtime infer` as a user runs them, and through the daemon with the client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, check_actions, export_cli, infer_cli, inspect_cli

from exporter.checkpoint import load_checkpoint
from exporter.torch_backend import TorchBackend
from exporter.validate import compare
from pi0_client import PolicyClient, PolicyError
from runtime.engine import sample
from runtime.pipeline import transforms
from runtime.pipeline.model_io import ModelInputs, model_state, postprocess, preprocess
from runtime.pipeline.tokenizer import PromptTokenizer

FIXTURE_NAMES = ("openpi-pi0-tiny", "openpi-pi05-tiny")
GOLDEN_FILES = ("golden", "golden_224", "golden_1cam")  # three 480x640 cameras; three at 224x224; cam_high only
MAX_TOKEN_LEN = {"openpi-pi0-tiny": 16, "openpi-pi05-tiny": 80}  # the fixtures' training configs
PROMPT = "Transfer cube"
SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


class OpenpiGolden:
    def __init__(self, name: str, file: str) -> None:
        self.name, self.file = name, file
        self.root = FIXTURES / name
        self.checkpoint = self.root / "checkpoint"
        self.data = dict(np.load(self.root / f"{file}.npz", allow_pickle=False))
        self.images = {k.split("::", 1)[1]: v[0] for k, v in self.data.items() if k.startswith("image::")}
        self.state = self.data["state"][0]
        self.tokens, self.token_mask = self.data["lang_tokens"], self.data["lang_masks"]
        self.noise = self.data["noise"]
        self.actions_fp32 = self.data["actions_fp32"][0]
        self.tokenizer = self.root / "tokenizer.model" if (self.root / "tokenizer.model").is_file() else None

    def load(self):
        return load_checkpoint(self.checkpoint, openpi_config="pi0_aloha_sim", max_token_len=MAX_TOKEN_LEN[self.name])

    def request(self, with_tokens: bool = True) -> dict:
        """The client's request: openpi's ALOHA camera names, the raw state, the golden noise."""
        request = {**self.images, "observation.state": self.state, "noise": self.noise}
        if with_tokens:
            return {**request, "lang_tokens": self.tokens, "lang_masks": self.token_mask}
        return {**request, "prompt": PROMPT}


@pytest.fixture(params=[(n, f) for n in FIXTURE_NAMES for f in GOLDEN_FILES], ids=lambda p: f"{p[0]}:{p[1]}")
def golden(request: pytest.FixtureRequest) -> OpenpiGolden:
    return OpenpiGolden(*request.param)


# --- stage by stage --------------------------------------------------------------------------------


def test_preprocessing_alone(golden: OpenpiGolden) -> None:
    spec = golden.load().spec
    state = model_state(spec, golden.state)
    assert compare(state, golden.data["state_model"][0, : spec.state_dim])["max_abs"] <= 1e-5
    inputs = preprocess(spec, golden.images, state, golden.tokens, golden.token_mask)
    np.testing.assert_array_equal(inputs.image_masks, golden.data["image_masks_model"])
    for slot, name in enumerate(SLOTS):
        if f"image_model::{name}" in golden.data:  # golden.npz only: openpi's resize of 480x640 frames
            np.testing.assert_allclose(inputs.images[0, slot], golden.data[f"image_model::{name}"][0], atol=1e-6)
    if spec.state_in_prompt:  # pi0.5: the prompt's tokens carry the discretized normalized state
        tokenizer = PromptTokenizer(golden.tokenizer, spec.tokenizer_max_length, "openpi", state_in_prompt=True)
        tokens, mask = tokenizer(PROMPT, transforms.discretize_state(state))
        np.testing.assert_array_equal(tokens, golden.tokens)
        np.testing.assert_array_equal(mask, golden.token_mask)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_network_alone(name: str) -> None:
    """openpi's own model inputs (images as the model saw them, normalized state, tokens) through our
    PyTorch model under the runtime's Euler loop -> openpi's sample_actions output."""
    golden = OpenpiGolden(name, "golden")
    policy = golden.load()
    d = golden.data
    images = np.stack([d[f"image_model::{s}"][0] for s in SLOTS])[None]
    inputs = ModelInputs(images, d["image_masks_model"], golden.tokens, golden.token_mask, d["state_model"])
    x = sample(TorchBackend(policy.model), inputs, golden.noise, policy.spec.num_steps)
    assert compare(x, d["actions_model"])["max_abs"] <= 1e-4


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_postprocessing_alone(name: str) -> None:
    golden = OpenpiGolden(name, "golden")
    actions = postprocess(golden.load().spec, golden.data["actions_model"])[0]
    assert compare(actions, golden.actions_fp32)["max_abs"] <= 1e-5


# --- whole: the CLIs, and the daemon ---------------------------------------------------------------


def export(name: str, out: Path, precision: str, *extra: str) -> Path:
    flags = ("--aloha", "--max-token-len", str(MAX_TOKEN_LEN[name]), *extra)
    return export_cli(FIXTURES / name / "checkpoint", out, precision, *flags)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each fixture exported by the CLI in both precisions; pi0.5's with its tokenizer (prompts as text)."""
    out = {}
    for name in FIXTURE_NAMES:
        tokenizer = FIXTURES / name / "tokenizer.model"
        extra = ("--tokenizer", str(tokenizer)) if tokenizer.is_file() else ()
        for precision in ("fp32", "fp16"):
            out[name, precision] = export(name, tmp_path_factory.mktemp(name) / precision, precision, *extra)
    return out


def check(actions: np.ndarray, golden: OpenpiGolden, precision: str) -> None:
    check_actions(actions, golden.actions_fp32, precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cli_export_then_infer(golden: OpenpiGolden, bundles, precision: str, tmp_path: Path) -> None:
    arrays = {**golden.images, "observation.state": golden.state}
    arrays.update(lang_tokens=golden.tokens, lang_masks=golden.token_mask)
    check(infer_cli(bundles[golden.name, precision], arrays, golden.noise, tmp_path), golden, precision)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_daemon_serves_openpi_bundles(name: str, precision: str, bundles, start_daemon) -> None:
    daemon = start_daemon(bundles[name, precision])
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        meta = client.metadata()
        assert meta.conventions == "openpi" and meta.camera_keys == ("cam_high", "cam_left_wrist", "cam_right_wrist")
        assert [c.optional for c in meta.cameras] == [False, True, True]
        for file in GOLDEN_FILES:
            golden = OpenpiGolden(name, file)
            check(client.infer(golden.request())["actions"], golden, precision)
            if golden.tokenizer is not None:  # pi0.5: the daemon puts the state into the prompt itself
                check(client.infer(golden.request(with_tokens=False))["actions"], golden, precision)
        no_base = {k: v for k, v in golden.request().items() if k != "cam_high"}  # AlohaInputs needs cam_high
        with pytest.raises(PolicyError, match=r"missing camera\(s\) \['cam_high'\]"):
            client.infer(no_base)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_inspect_names_the_framework_model_type_and_conventions(name: str) -> None:
    report = inspect_cli(FIXTURES / name / "checkpoint", "--aloha")
    assert report["framework"] == "openpi" and report["conventions"]["name"] == "openpi"
    assert report["model_type"] == ("pi05" if "pi05" in name else "pi0")
    assert report["asset_id"] == "lerobot/aloha_sim_transfer_cube_human"
    assert report["spec"]["state_dim"] == report["spec"]["action_dim"] == 14  # from the stats, not config.json's 32
    assert any("aloha_policy.py" in source for source in report["conventions"]["from"])


def test_pi05_fixed_prompt_needs_no_tokenizer_on_the_robot(tmp_path: Path, start_daemon) -> None:
    """--fixed-prompts-only: the prompt's tokens for every state bin were made at export; the bundle has
    no tokenizer, and the daemon still builds openpi's exact tokens from the state."""
    name = "openpi-pi05-tiny"
    tokenizer = FIXTURES / name / "tokenizer.model"
    bundle = export(
        name, tmp_path / "b", "fp32", "--tokenizer", str(tokenizer), "--prompt", PROMPT, "--fixed-prompts-only"
    )
    assert not (bundle / "tokenizer.model").exists()
    daemon = start_daemon(bundle)
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        assert client.metadata().prompt.tokenizer is False
        for file in GOLDEN_FILES:
            golden = OpenpiGolden(name, file)
            check(client.infer(golden.request(with_tokens=False))["actions"], golden, "fp32")
