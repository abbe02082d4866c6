"""Robot adapters proven against openpi's own transforms: our table of openpi's published configs, and a
user's adapter file (TOML), against what openpi's `data_transforms` did (tests/fixtures/openpi-transforms,
recorded by openpi's unmodified code; live where build/openpi-venv exists). An adapter with one key wrong
is refused naming the first field that differs; a proven one exports and serves openpi's own chunk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, check_actions, infer_cli, inspect_cli, pi0_export

from exporter.checkpoint import CheckpointError, load_checkpoint
from exporter.openpi_configs import CONFIGS
from exporter.robot_adapter import RobotAdapterError, prove, read_adapter, record

RECORDINGS = FIXTURES / "openpi-transforms"
RECORDED = sorted(p.stem for p in RECORDINGS.glob("*.npz"))
REPO = Path(__file__).resolve().parents[1]
OPENPI_PYTHON, OPENPI_SRC = REPO / "build" / "openpi-venv" / "bin" / "python", REPO / "build" / "openpi-src"

LIBERO_TOML = """
name = "pi0_libero"
[cameras]
slots = ["observation/image", "observation/wrist_image", ""]
[state]
fields = [["observation/state", 8]]
[actions]
dim = 7
delta_mask = [true, true, true, true, true, true, false]
[model]
asset_id = "physical-intelligence/libero"
"""
ALOHA_TOML = """
name = "pi0_aloha"
[cameras]
slots = ["cam_high", "cam_left_wrist", "cam_right_wrist"]
optional = ["cam_left_wrist", "cam_right_wrist"]
shape = [3, 480, 640]
images_key = "images"
[state]
fields = [["state", 14]]
[actions]
dim = 14
delta_mask = [true, true, true, true, true, true, false, true, true, true, true, true, true, false]
aloha_maps = true
[policy_metadata]
reset_pose = [0, -1.5, 1.5, 0, 0, 0]
"""


def adapter(tmp_path: Path, text: str, *replacements: tuple[str, str]) -> Path:
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "robot.toml"
    path.write_text(text)
    return path


def test_recordings_cover_every_kind_of_config() -> None:
    assert RECORDED == [
        "pi05_droid",
        "pi05_full_droid_finetune",
        "pi05_libero",
        "pi0_aloha",
        "pi0_aloha_sim",
        "pi0_libero",
    ]


@pytest.mark.parametrize("name", RECORDED)
def test_our_table_of_openpis_configs_does_what_openpi_does(name: str) -> None:
    assert prove(CONFIGS[name], RECORDINGS / f"{name}.npz").startswith(f"proven against openpi config {name}: 20")


@pytest.mark.skipif(
    not (OPENPI_PYTHON.exists() and OPENPI_SRC.is_dir()),
    reason="openpi is not installed here (build/openpi-venv, build/openpi-src: see tests/fixtures/openpi-transforms)",
)
def test_every_named_config_against_openpi_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", f"{OPENPI_SRC / 'src'}:{OPENPI_SRC / 'packages' / 'openpi-client' / 'src'}")
    for name, config in CONFIGS.items():
        recording = record(
            name, config.family, str(OPENPI_PYTHON), tmp_path / f"{name}.npz", cases=50, frame=(3, 16, 16)
        )
        assert prove(config, recording).startswith(f"proven against openpi config {name}")


# --- a user's adapter file ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "recording"), [(LIBERO_TOML, "pi0_libero"), (ALOHA_TOML, "pi0_aloha")])
def test_an_adapter_that_matches_its_config_is_proven(tmp_path: Path, text: str, recording: str) -> None:
    config = read_adapter(adapter(tmp_path, text))
    assert config.family.name == "custom" and config.name == recording
    assert "20 random observations" in prove(config, RECORDINGS / f"{recording}.npz")


@pytest.mark.parametrize(
    ("text", "recording", "change", "first_difference"),
    [
        # the wrist camera's key in the base slot and the reverse
        (
            LIBERO_TOML,
            "pi0_libero",
            ('"observation/image", "observation/wrist_image"', '"observation/wrist_image", "observation/image"'),
            r"image\[base_0_rgb\]",
        ),
        # the gripper taken as relative
        (LIBERO_TOML, "pi0_libero", ("true, true, false]", "true, true, true]"), r"actions\[0\]\[6\]"),
        # ALOHA's maps left out: the state the inputs hand on differs on the first flipped joint
        (ALOHA_TOML, "pi0_aloha", ("aloha_maps = true", "aloha_maps = false"), r"state\[1\]"),
        # a wrist camera that openpi leaves out when missing, declared required: the proof's requests lack it
        (
            ALOHA_TOML,
            "pi0_aloha",
            ('optional = ["cam_left_wrist", "cam_right_wrist"]', 'optional = ["cam_left_wrist"]'),
            r"camera 'cam_right_wrist': required by the adapter",
        ),
    ],
)
def test_an_adapter_with_one_thing_wrong_is_refused_naming_it(
    tmp_path: Path, text: str, recording: str, change: tuple[str, str], first_difference: str
) -> None:
    config = read_adapter(adapter(tmp_path, text, change))
    with pytest.raises(
        RobotAdapterError, match=rf"does not do what openpi config {recording} does: case \d+ of 20, {first_difference}"
    ):
        prove(config, RECORDINGS / f"{recording}.npz")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[actions]", "[action]"), r"unknown keys \['action'\]"),
        (
            (
                '"observation/image", "observation/wrist_image", ""',
                '"", "observation/image", "observation/wrist_image"',
            ),
            "empty slots come last",
        ),
        (("dim = 7", "dim = 5"), "delta_mask must be at most 5 booleans"),
        (('fields = [["observation/state", 8]]', 'fields = [["observation/state"]]'), r"\[state\] fields must be"),
        (('name = "pi0_libero"', ""), "name .* is required"),
        (("[model]", "[model]\nhorizon = 3"), r"\[model\] has unknown keys \['horizon'\]"),
    ],
)
def test_an_adapter_file_that_cannot_be_read_says_why(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(RobotAdapterError, match=message):
        read_adapter(adapter(tmp_path, LIBERO_TOML, change))


def test_a_recording_of_another_config_is_refused(tmp_path: Path) -> None:
    config = read_adapter(adapter(tmp_path, LIBERO_TOML, ('name = "pi0_libero"', 'name = "my_libero"')))
    with pytest.raises(RobotAdapterError, match="records openpi config 'pi0_libero', the adapter is 'my_libero'"):
        prove(config, RECORDINGS / "pi0_libero.npz")


# --- through the exporter ------------------------------------------------------------------------


def test_a_proven_adapter_exports_and_serves_openpis_chunk(tmp_path: Path) -> None:
    """openpi-pi0-libero (made under openpi's pi0_libero) exported with the adapter file instead of the
    config's name: proven, carried in the bundle, and the served chunk is openpi's."""
    golden = np.load(FIXTURES / "openpi-pi0-libero" / "golden.npz")
    robot = adapter(tmp_path, LIBERO_TOML)
    bundle = tmp_path / "bundle"
    checkpoint = FIXTURES / "openpi-pi0-libero" / "checkpoint"
    proof = RECORDINGS / "pi0_libero.npz"
    pi0_export(
        "bundle", "--checkpoint", checkpoint, "--out", bundle, "--robot", robot, "--proof", proof, "--num-steps", "5"
    )
    manifest = __import__("json").loads((bundle / "manifest.json").read_text())
    assert manifest["robot"]["family"] == "custom" and manifest["robot"]["proof"].startswith(
        "proven against openpi config pi0_libero"
    )
    arrays = {k.split("::", 1)[1]: golden[k] for k in ("obs::observation/image", "obs::observation/wrist_image")}
    arrays.update(
        {
            "observation.state": golden["obs::observation/state"],
            "lang_tokens": golden["lang_tokens"],
            "lang_masks": golden["lang_masks"],
        }
    )
    check_actions(infer_cli(bundle, arrays, golden["noise"], tmp_path), golden["actions_fp32"][0], "fp32")


def test_an_unproven_adapter_says_so(tmp_path: Path) -> None:
    report = inspect_cli(FIXTURES / "openpi-pi0-libero" / "checkpoint", "--robot", str(adapter(tmp_path, LIBERO_TOML)))
    assert report["robot"]["family"] == "custom" and report["robot"]["proof"] is None
    assert report["spec"]["delta_action_mask"] == [True] * 6 + [False] and report["spec"]["empty_cameras"] == 1


def test_a_wrong_adapter_refuses_the_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from exporter.cli import main

    robot = adapter(tmp_path, LIBERO_TOML, ("true, true, false]", "true, true, true]"))
    argv = ["bundle", "--checkpoint", str(FIXTURES / "openpi-pi0-libero" / "checkpoint"), "--out", str(tmp_path / "b")]
    assert main([*argv, "--robot", str(robot), "--proof", str(RECORDINGS / "pi0_libero.npz")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert (
        len(errors) == 1
        and "does not do what openpi config pi0_libero does" in errors[0]
        and "actions[0][6]" in errors[0]
    )
    assert not (tmp_path / "b").exists()


def test_a_proof_needs_an_adapter_file() -> None:
    with pytest.raises(CheckpointError, match="prove a robot adapter file"):
        load_checkpoint(FIXTURES / "openpi-pi0-libero" / "checkpoint", openpi_config="pi0_libero", proof=os.devnull)


def test_openpis_client_drives_a_robot_with_keys_of_its_own(tmp_path: Path, start_daemon) -> None:
    """A robot whose client sends its own keys (`front`, `wrist`, `joints`): the adapter names them, the
    daemon's websocket takes them as openpi's server with that config would, and the chunk is openpi's
    (openpi-pi05-libero, made under pi05_libero, whose inputs are LIBERO's under other names)."""
    from conftest import free_port
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    root = FIXTURES / "openpi-pi05-libero"
    golden = np.load(root / "golden.npz")
    robot = adapter(
        tmp_path,
        LIBERO_TOML,
        ('name = "pi0_libero"', 'name = "my_robot"'),
        ('"observation/image", "observation/wrist_image"', '"front", "wrist"'),
        ('"observation/state"', '"joints"'),
        ("delta_mask = [true, true, true, true, true, true, false]", ""),
        ("[model]", "[model]\naction_horizon = 10\ndiscrete_state_input = false"),
    )
    bundle = tmp_path / "bundle"
    pi0_export(
        "bundle", "--checkpoint", root / "checkpoint", "--out", bundle, "--robot", robot,
        "--tokenizer", root / "tokenizer.model", "--num-steps", "5", "--no-validate",
    )  # fmt: skip
    port = free_port()
    start_daemon(bundle, "--websocket", f"127.0.0.1:{port}")
    policy = WebsocketClientPolicy("127.0.0.1", port)
    assert policy.get_server_metadata()["robot"] == {
        "name": "my_robot", "family": "custom", "source": "robot adapter robot.toml", "state_keys": ["joints"],
        "unused_cameras": [], "proof": None,
    }  # fmt: skip
    obs = {
        "front": golden["obs::observation/image"],
        "wrist": golden["obs::observation/wrist_image"],
        "joints": golden["obs::observation/state"],
        "prompt": str(golden["prompt"]),
        "noise": golden["noise"],
    }
    check_actions(policy.infer(obs)["actions"], golden["actions_fp32"][0], "fp32")
