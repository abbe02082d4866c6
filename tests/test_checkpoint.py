"""Checkpoint loading: inferred dimensions, both formats, round trips, errors, and memory."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from exporter.checkpoint import CheckpointError, load_checkpoint
from exporter.dims import GemmaDims, Pi0Dims, VisionDims
from exporter.presets import build_preset
from exporter.readers import READERS
from exporter.readers.lerobot_v03 import save_lerobot
from exporter.safetensors_io import write_safetensors
from exporter.weights import lerobot_key


def test_fixture_dims_match_its_readme() -> None:
    dims = load_checkpoint(FIXTURES / "lerobot-pi0-tiny" / "checkpoint").model.dims
    assert dims == Pi0Dims(
        vision=VisionDims(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=14, image_size=224),
        language=GemmaDims(width=64, depth=4, mlp_dim=128, num_heads=8, head_dim=16),
        expert=GemmaDims(width=32, depth=4, mlp_dim=64, num_heads=8, head_dim=16),
        vocab_size=320,
    )


def test_fixture_conventions() -> None:
    spec = load_checkpoint(FIXTURES / "lerobot-pi0-tiny-aloha-sim" / "checkpoint").spec
    assert spec.camera_keys == ("observation.images.top",) and spec.empty_cameras == 2
    assert spec.adapt_to_pi_aloha and spec.conventions == "lerobot-0.3" and not spec.state_in_prompt
    assert (spec.state_dim, spec.action_dim, spec.chunk_size, spec.num_steps) == (14, 14, 16, 10)
    assert spec.state_norm is not None and spec.state_norm.eps == 1e-8


@pytest.mark.parametrize("layout", ["old", "new"])
def test_preset_round_trips_through_a_lerobot_checkpoint(tmp_path: Path, layout: str) -> None:
    preset = build_preset("pi0-dummy", seed=5)
    loaded = load_checkpoint(save_lerobot(preset, tmp_path, layout=layout))
    assert loaded.spec == preset.spec and loaded.model.dims == preset.model.dims
    ours, theirs = preset.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0)


def write_openpi(tmp_path: Path, preset, stats_len: int = 14) -> Path:
    """A checkpoint as openpi's convert_jax_model_to_pytorch.py writes it (from our preset's weights):
    config.json's action_dim is the model's padded width, the robot's is the norm stats' length."""
    tensors = {lerobot_key(name, "new").removeprefix("model."): t for name, t in preset.model.state_dict().items()}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps({"action_dim": 32, "action_horizon": 50, "precision": "float32"}))
    rng = np.random.default_rng(0)
    stats = {
        key: {"mean": rng.normal(size=stats_len).tolist(), "std": rng.uniform(0.5, 2, stats_len).tolist()}
        for key in ("state", "actions")
    }
    (tmp_path / "assets" / "trossen").mkdir(parents=True)
    (tmp_path / "assets" / "trossen" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    return tmp_path


def test_openpi_checkpoint(tmp_path: Path) -> None:
    preset = build_preset("pi0-dummy", seed=6)
    loaded = load_checkpoint(write_openpi(tmp_path, preset), openpi_config="pi0_aloha")
    assert loaded.source == "openpi"
    spec = loaded.spec
    assert spec.camera_keys == ("cam_high", "cam_left_wrist", "cam_right_wrist")
    assert spec.optional_cameras == ("cam_left_wrist", "cam_right_wrist")
    assert (spec.conventions, spec.tokenizer_max_length, spec.state_dim, spec.action_dim) == ("openpi", 48, 14, 14)
    assert spec.state_norm.eps == 1e-6 and spec.adapt_to_pi_aloha and spec.chunk_size == 50
    # pi0_aloha trains on delta joint actions (grippers absolute), relative to AlohaInputs' state
    assert spec.delta_action_mask == (True,) * 6 + (False,) + (True,) * 6 + (False,)
    assert spec.delta_reference == "adapted_state"
    assert loaded.robot.name == "pi0_aloha" and loaded.robot.policy_metadata == {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}
    libero = load_checkpoint(tmp_path, openpi_config="pi0_libero", max_token_len=20).spec
    assert libero.camera_keys == ("observation/image", "observation/wrist_image") and libero.empty_cameras == 1
    assert (libero.state_dim, libero.action_dim, libero.tokenizer_max_length) == (8, 7, 20)
    assert libero.delta_action_mask == (True,) * 6 + (False,) and not libero.adapt_to_pi_aloha
    for name, tensor in preset.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_an_openpi_checkpoint_needs_its_training_config(tmp_path: Path) -> None:
    """Delta actions, camera slots and returned dims are in openpi's training config, not the checkpoint:
    without a config named, nothing is guessed."""
    write_openpi(tmp_path, build_preset("pi0-dummy"))
    with pytest.raises(CheckpointError, match=r"--openpi-config NAME, one of: .*pi0_aloha, .*pi0_libero"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"unknown openpi config 'pi0_alhoa'; known: "):
        load_checkpoint(tmp_path, openpi_config="pi0_alhoa")
    with pytest.raises(CheckpointError, match=r"pi0_fast_libero is a pi0-FAST config"):
        load_checkpoint(tmp_path, openpi_config="pi0_fast_libero")


def test_openpi_asset_choice(tmp_path: Path) -> None:
    write_openpi(tmp_path, build_preset("pi0-dummy"))
    (tmp_path / "assets" / "other").mkdir()
    (tmp_path / "assets" / "other" / "norm_stats.json").write_text(
        (tmp_path / "assets" / "trossen" / "norm_stats.json").read_text()
    )
    (tmp_path / "assets" / "lerobot" / "aloha_sim").mkdir(parents=True)  # a repo id: two folders deep
    (tmp_path / "assets" / "lerobot" / "aloha_sim" / "norm_stats.json").write_text(
        (tmp_path / "assets" / "trossen" / "norm_stats.json").read_text()
    )
    sim = {"openpi_config": "pi0_aloha_sim"}  # its asset id (lerobot/aloha_sim_transfer_cube_human) is not here
    with pytest.raises(CheckpointError, match=r"several assets \['lerobot/aloha_sim', 'other', 'trossen'\]"):
        load_checkpoint(tmp_path, **sim)
    with pytest.raises(
        CheckpointError, match=r"no assets/nope/norm_stats.json; asset ids found: \['lerobot/aloha_sim'"
    ):
        load_checkpoint(tmp_path, asset_id="nope", **sim)
    assert load_checkpoint(tmp_path, asset_id="other", **sim).details["asset_id"] == "other"
    assert load_checkpoint(tmp_path, asset_id="lerobot/aloha_sim", **sim).details["asset_id"] == "lerobot/aloha_sim"
    # among several, the training config's own asset id (pi0_aloha: "trossen") is the one
    assert load_checkpoint(tmp_path, openpi_config="pi0_aloha").details["asset_id"] == "trossen"


def test_unrecognized_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a LeRobot"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: Expecting property name")):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_checkpoint(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"type": "act"}))
    with pytest.raises(CheckpointError, match="'act' policy, not pi0"):
        load_checkpoint(tmp_path)


def test_each_reader_is_registered_under_its_format() -> None:
    for name, module in READERS.items():
        assert name == importlib.import_module(module).FORMAT


def test_options_a_reader_does_not_take_are_refused_by_name(tmp_path: Path) -> None:
    lerobot = FIXTURES / "lerobot-pi0-tiny" / "checkpoint"
    with pytest.raises(
        CheckpointError, match=r"options \['adapt_to_pi_aloha'\] do not apply to lerobot-0.3 .*take none"
    ):
        load_checkpoint(lerobot, adapt_to_pi_aloha=True)
    openpi = write_openpi(tmp_path, build_preset("pi0-dummy"))
    with pytest.raises(CheckpointError, match=r"options \['lora_alpha'\] do not apply to openpi checkpoints"):
        load_checkpoint(openpi, lora_alpha=16.0, asset_id="trossen", openpi_config="pi0_aloha")


def test_unknown_siglip_width_is_refused(tmp_path: Path) -> None:
    preset = build_preset("pi0-dummy")
    save_lerobot(preset, tmp_path)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    key = "model.paligemma_with_expert.paligemma.vision_tower.vision_model.embeddings.patch_embedding.weight"
    tensors[key] = torch.zeros(40, 3, 14, 14)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="SigLIP width 40 is not in the ViT width table"):
        load_checkpoint(tmp_path)


# A model of ~250 MB: big enough that the loader's own memory shows above Python's and torch's, and
# shaped like pi0 (many similar tensors, none a large share of the whole).
MEDIUM = Pi0Dims(
    vision=VisionDims(width=384, depth=4, mlp_dim=1536, num_heads=6),
    language=GemmaDims(width=512, depth=8, mlp_dim=4096, num_heads=8, head_dim=64),
    expert=GemmaDims(width=256, depth=8, mlp_dim=1024, num_heads=8, head_dim=64),
    vocab_size=8192,
)


def inspect(checkpoint: Path) -> dict:
    exe = Path(sys.executable).with_name("pi0-export")
    out = subprocess.run([exe, "inspect", "--checkpoint", str(checkpoint)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_holds_the_weights_once(tmp_path: Path, dtype: torch.dtype) -> None:
    """Peak RSS growth while loading and reading every weight stays within 1.3x of the weights' size,
    whether the file's dtype is used as is (memory-mapped) or converted (bf16 -> fp32, pages released)."""
    from exporter.checkpoint import LoadedPolicy
    from exporter.pi0 import Pi0
    from exporter.presets import preset_spec

    torch.manual_seed(0)
    model = Pi0(MEDIUM).to(dtype)
    save_lerobot(LoadedPolicy(model=model, spec=preset_spec(), source="test"), tmp_path)
    del model
    # The baseline is the same command on the 1 MB fixture: Python, torch and their lazy set-up.
    baseline = inspect(FIXTURES / "lerobot-pi0-tiny" / "checkpoint")["peak_rss_mib"]
    report = inspect(tmp_path)
    growth, weights = report["peak_rss_mib"] - baseline, report["weights_mib"]
    print(f"\n{dtype}: weights {weights:.0f} MiB, peak RSS growth {growth:.0f} MiB ({growth / weights:.2f}x)")
    assert weights > 150
    assert growth <= 1.3 * weights, f"peak RSS grew {growth / weights:.2f}x the weights"


@pytest.mark.parametrize("name", ["pi0-dummy", "pi0-cpu"])
def test_small_presets_round_trip_as_lerobot_checkpoints(name: str, tmp_path: Path) -> None:
    """What `pi0-sim train` writes for its presets loads back with the same dimensions (SigLIP's heads
    come from the ViT width table, so a preset's vision width must be in it)."""
    policy = build_preset(name)
    loaded = load_checkpoint(save_lerobot(policy, tmp_path / name))
    assert loaded.model.dims == policy.model.dims
