"""openpi checkpoints under openpi's own published robot configs (tests/fixtures/openpi-pi0-aloha-delta,
openpi-pi0-libero, openpi-pi05-libero: each README says what ran), against what openpi's own policy computed
with the config's transforms: delta actions made absolute (pi0_aloha, pi0_libero's extra delta transform),
LIBERO's key set with its empty right-wrist slot, pi05_libero's prompt without the state. Stage by stage,
then through `pi0-export bundle --openpi-config NAME` + `pi0-runtime infer`, the daemon with our client,
and openpi's own websocket client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, check_actions, export_cli, free_port, infer_cli, inspect_cli, pi0_export

from exporter.checkpoint import load_checkpoint
from exporter.torch_backend import TorchBackend
from exporter.validate import compare
from pi0_client import PolicyClient
from runtime.engine import sample
from runtime.pipeline import transforms
from runtime.pipeline.model_io import ModelInputs, actions_to_model, model_state, postprocess, preprocess
from runtime.pipeline.tokenizer import PromptTokenizer

CONFIG = {  # fixture -> the openpi training config it was made under
    "openpi-pi0-aloha-delta": "pi0_aloha",
    "openpi-pi0-libero": "pi0_libero",
    "openpi-pi05-libero": "pi05_libero",
    "openpi-pi0-droid": "pi0_droid",
    "openpi-pi05-droid": "pi05_droid",
    "openpi-pi05-droid-delta": "pi05_full_droid_finetune",
}
STATE_FIELDS = (  # the fields each family's inputs make the state of, in order
    ("state",),
    ("observation/state",),
    ("observation/joint_position", "observation/gripper_position"),
)
SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
NUM_STEPS = "5"  # the fixtures' (stored nowhere in an openpi checkpoint)


class Golden:
    """One fixture's golden.npz: the request exactly as passed to openpi's `Policy.infer`, and its outputs."""

    def __init__(self, name: str) -> None:
        self.name, self.config = name, CONFIG[name]
        self.root = FIXTURES / name
        self.checkpoint = self.root / "checkpoint"
        self.data = dict(np.load(self.root / "golden.npz", allow_pickle=False))
        obs = {k.split("::", 1)[1]: v for k, v in self.data.items() if k.startswith("obs::")}
        self.prompt = str(obs.pop("prompt"))
        fields = next(f for f in STATE_FIELDS if f[0] in obs)
        self.state_fields = {key: obs.pop(key) for key in fields}
        self.state = np.concatenate([np.ravel(v) for v in self.state_fields.values()]).astype(np.float32)
        # ALOHA's `images::<camera>`, LIBERO's and DROID's `observation/<camera>`: our bundles take openpi's keys
        self.images = {k.removeprefix("images::"): v for k, v in obs.items()}
        self.noise = self.data["noise"]
        self.actions_fp32 = self.data["actions_fp32"][0]
        self.tokenizer = self.root / "tokenizer.model" if (self.root / "tokenizer.model").is_file() else None

    def load(self):
        return load_checkpoint(self.checkpoint, openpi_config=self.config)

    def request(self, with_tokens: bool = True) -> dict:
        request = {**self.images, "observation.state": self.state, "noise": self.noise}
        if with_tokens:
            return {**request, "lang_tokens": self.data["lang_tokens"], "lang_masks": self.data["lang_masks"]}
        return {**request, "prompt": self.prompt}

    def openpi_request(self) -> dict:
        """As openpi's robot clients send it: ALOHA's `images`/`state`, LIBERO's and DROID's flat keys."""
        extras = {"prompt": self.prompt, "noise": self.noise}
        if "cam_high" in self.images:
            return {"images": dict(self.images), **self.state_fields, **extras}
        return {**self.images, **self.state_fields, **extras}


@pytest.fixture(params=list(CONFIG))
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(request.param)


# --- stage by stage --------------------------------------------------------------------------------


def test_preprocessing_alone(golden: Golden) -> None:
    spec = golden.load().spec
    state = model_state(spec, golden.state)
    assert compare(state, golden.data["state_model"][0, : spec.state_dim])["max_abs"] <= 1e-5
    tokens, mask = golden.data["lang_tokens"], golden.data["lang_masks"]
    inputs = preprocess(spec, golden.images, state, tokens, mask)
    # LIBERO: a third slot, the right wrist, is openpi's zero image with mask False
    np.testing.assert_array_equal(inputs.image_masks, golden.data["image_masks_model"])
    for slot, name in enumerate(SLOTS):
        if f"image_model::{name}" in golden.data:
            np.testing.assert_allclose(inputs.images[0, slot], golden.data[f"image_model::{name}"][0], atol=1e-6)
    for slot in np.flatnonzero(~golden.data["image_masks_model"][0]):
        assert (inputs.images[0, slot] == -1).all()  # openpi's np.zeros_like(base_image), scaled


def test_pi05_libero_prompt_leaves_the_state_out() -> None:
    """pi05_libero: `discrete_state_input=False`, so openpi tokenizes the prompt in pi0's format."""
    spec = Golden("openpi-pi05-libero").load().spec
    assert not spec.state_in_prompt and spec.tokenizer_max_length == 200 and spec.chunk_size == 10


@pytest.mark.parametrize("name", [n for n in CONFIG if (FIXTURES / n / "tokenizer.model").is_file()])
def test_the_prompt_is_tokenized_as_openpi_did(name: str) -> None:
    """With the state's bins in it where the config says so (pi05_droid), without (pi05_libero)."""
    golden = Golden(name)
    spec = golden.load().spec
    tokenizer = PromptTokenizer(golden.tokenizer, spec.tokenizer_max_length, "openpi", spec.state_in_prompt)
    bins = transforms.discretize_state(model_state(spec, golden.state)) if spec.state_in_prompt else None
    tokens, mask = tokenizer(golden.prompt, bins)
    np.testing.assert_array_equal(tokens, golden.data["lang_tokens"])
    np.testing.assert_array_equal(mask, golden.data["lang_masks"])


def test_network_alone(golden: Golden) -> None:
    policy = golden.load()
    d = golden.data
    state = model_state(policy.spec, golden.state)
    inputs = preprocess(policy.spec, golden.images, state, d["lang_tokens"], d["lang_masks"])
    inputs = ModelInputs(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_mask, d["state_model"])
    x = sample(TorchBackend(policy.model), inputs, golden.noise, int(NUM_STEPS))
    assert compare(x, d["actions_model"])["max_abs"] <= 1e-4


def test_postprocessing_makes_delta_actions_absolute(golden: Golden) -> None:
    spec = golden.load().spec
    actions = postprocess(spec, golden.data["actions_model"], golden.state)[0]
    assert compare(actions, golden.actions_fp32)["max_abs"] <= 1e-5
    if spec.delta_action_mask is None:
        return
    # the state is what they are relative to: leaving it out is refused, never served wrong
    with pytest.raises(ValueError, match="relative to the state"):
        postprocess(spec, golden.data["actions_model"])
    # and real-time chunking's prev_actions go back into the model's space through the same conventions
    back = actions_to_model(spec, actions, golden.state)
    np.testing.assert_allclose(
        back[:, : spec.action_dim], golden.data["actions_model"][0, :, : spec.action_dim], atol=2e-5
    )


# --- whole: the CLIs, the daemon, openpi's client ---------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    out = {}
    for name, config in CONFIG.items():
        golden = Golden(name)
        extra = ("--tokenizer", str(golden.tokenizer)) if golden.tokenizer else ()
        for precision in ("fp32", "fp16"):
            path = tmp_path_factory.mktemp(name) / precision
            out[name, precision] = export_cli(
                golden.checkpoint, path, precision, "--openpi-config", config, "--num-steps", NUM_STEPS, *extra
            )
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cli_export_then_infer(golden: Golden, bundles, precision: str, tmp_path: Path) -> None:
    arrays = {**golden.images, "observation.state": golden.state}
    arrays.update(lang_tokens=golden.data["lang_tokens"], lang_masks=golden.data["lang_masks"])
    check_actions(
        infer_cli(bundles[golden.name, precision], arrays, golden.noise, tmp_path), golden.actions_fp32, precision
    )


def test_daemon_and_openpis_client_serve_them(golden: Golden, bundles, start_daemon) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    port = free_port()
    daemon = start_daemon(bundles[golden.name, "fp32"], "--websocket", f"127.0.0.1:{port}")
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        meta = client.metadata()
        assert meta.extra["robot"]["name"] == golden.config
        check_actions(client.infer(golden.request())["actions"], golden.actions_fp32, "fp32")
        if golden.tokenizer is not None:
            check_actions(client.infer(golden.request(with_tokens=False))["actions"], golden.actions_fp32, "fp32")
    if golden.tokenizer is None:
        return  # openpi's clients send text; these fixtures' prompts have no tokenizer to serve them
    policy = WebsocketClientPolicy("127.0.0.1", port)
    check_actions(policy.infer(golden.openpi_request())["actions"], golden.actions_fp32, "fp32")


def test_inspect_names_the_config_and_its_delta_actions() -> None:
    report = inspect_cli(FIXTURES / "openpi-pi0-aloha-delta" / "checkpoint", "--openpi-config", "pi0_aloha")
    assert report["openpi_config"] == "pi0_aloha" and report["asset_id"] == "trossen"
    assert report["spec"]["delta_action_mask"] == [True] * 6 + [False] + [True] * 6 + [False]
    assert report["spec"]["delta_reference"] == "adapted_state"


def test_a_delta_checkpoint_without_its_config_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from exporter.cli import main

    checkpoint = FIXTURES / "openpi-pi0-aloha-delta" / "checkpoint"
    assert main(["bundle", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--openpi-config NAME, one of:" in errors[0] and "pi0_aloha," in errors[0]
    assert not (tmp_path / "b").exists()


def test_metadata_carries_the_configs_policy_metadata_and_default_prompt(tmp_path: Path, start_daemon) -> None:
    """pi0_aloha_towel: openpi's `reset_pose` at the metadata's top level (its aloha_real client reads it
    there) and its default prompt served to a request without one; here as a fixed prompt, since this
    fixture ships no tokenizer, made with the fixture's own token ids."""
    golden = Golden("openpi-pi0-aloha-delta")
    bundle = tmp_path / "towel"
    pi0_export(
        "bundle",
        "--checkpoint",
        golden.checkpoint,
        "--out",
        bundle,
        "--openpi-config",
        "pi0_aloha_towel",
        "--num-steps",
        NUM_STEPS,
        "--no-validate",
    )
    daemon = start_daemon(bundle)
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        meta = client.metadata()
        assert meta.extra["reset_pose"] == [0, -1.5, 1.5, 0, 0, 0]
        assert meta.extra["delta_action_mask"] == [True] * 6 + [False] + [True] * 6 + [False]
        # no tokenizer and no fixed prompt: the config's default cannot be tokenized, so none is claimed
        assert "default_prompt" not in meta.extra
        check_actions(client.infer(golden.request())["actions"], golden.actions_fp32, "fp32")


def test_a_request_without_a_prompt_gets_the_bundles_default(tmp_path: Path, start_daemon) -> None:
    """A fixed-prompt bundle's only prompt is its default: openpi's clients that send none are served it."""
    golden = Golden("openpi-pi05-libero")
    bundle = tmp_path / "fixed"
    pi0_export(
        "bundle", "--checkpoint", golden.checkpoint, "--out", bundle, "--openpi-config", golden.config,
        "--tokenizer", golden.tokenizer, "--prompt", golden.prompt, "--fixed-prompts-only", "--no-validate",
        "--num-steps", NUM_STEPS,
    )  # fmt: skip
    daemon = start_daemon(bundle)
    request = {k: v for k, v in golden.request(with_tokens=False).items() if k != "prompt"}
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        assert client.metadata().extra["default_prompt"] == golden.prompt
        check_actions(client.infer(request)["actions"], golden.actions_fp32, "fp32")


def test_a_default_prompt_the_bundle_cannot_tokenize_is_refused_before_export(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    from exporter.cli import main

    checkpoint = FIXTURES / "openpi-pi0-libero" / "checkpoint"
    argv = ["bundle", "--checkpoint", str(checkpoint), "--openpi-config", "pi0_libero", "--out", str(tmp_path / "b")]
    assert main([*argv, "--default-prompt", "pick up the bowl"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--default-prompt needs a tokenizer" in errors[0]
    assert not (tmp_path / "b").exists()
