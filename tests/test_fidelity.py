"""Our PyTorch pi0 against the action chunks LeRobot 0.3.3 itself computed for the golden fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Golden
from safetensors.torch import load_file, save_file

from exporter.checkpoint import CheckpointError, load_checkpoint
from exporter.torch_backend import reference_engine
from runtime.pipeline.observation import Observation

TOLERANCE = 1e-4  # max abs diff on the de-normalized actions, float32 both sides


def reference_actions(checkpoint, golden: Golden) -> np.ndarray:
    reference = reference_engine(load_checkpoint(checkpoint))
    obs = Observation(
        golden.images, golden.state, tokens=golden.tokens, token_mask=golden.token_mask, noise=golden.noise
    )
    return reference.infer(obs)[0][None]  # [1, chunk, action_dim], as LeRobot returns it


def test_reference_reproduces_lerobot_fp32(golden: Golden) -> None:
    actions = reference_actions(golden.checkpoint, golden)
    diff = np.abs(actions - golden.actions_fp32)
    print(f"\n{golden.name}: max abs {diff.max():.3g}, mean abs {diff.mean():.3g} vs LeRobot fp32")
    assert actions.shape == golden.actions_fp32.shape
    assert diff.max() <= TOLERANCE, f"max abs diff {diff.max()} (mean {diff.mean()})"
    # bfloat16's own error is ~1e-2: being far closer to fp32 shows we are not accidentally in bf16.
    assert diff.max() < np.abs(golden.actions_bf16 - golden.actions_fp32).max() / 10


def new_layout_key(key: str) -> str:
    """LeRobot's own renaming to the transformers >= 4.52 layout (PI0Policy._transform_state_dict_keys)."""
    for old, new in (
        (".paligemma_with_expert.paligemma.language_model.lm_head", ".paligemma_with_expert.paligemma.lm_head"),
        (
            ".paligemma_with_expert.paligemma.language_model.model",
            ".paligemma_with_expert.paligemma.model.language_model",
        ),
        (".paligemma_with_expert.paligemma.vision_tower", ".paligemma_with_expert.paligemma.model.vision_tower"),
        (
            ".paligemma_with_expert.paligemma.multi_modal_projector",
            ".paligemma_with_expert.paligemma.model.multi_modal_projector",
        ),
    ):
        key = key.replace(old, new)
    return key


def copy_checkpoint(golden: Golden, tmp_path, tensors: dict[str, torch.Tensor]):
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "config.json").write_text((golden.checkpoint / "config.json").read_text())
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_new_key_layout_loads_to_the_same_actions(golden: Golden, tmp_path) -> None:
    tensors = load_file(str(golden.checkpoint / "model.safetensors"))
    renamed = {new_layout_key(k): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    actions = reference_actions(copy_checkpoint(golden, tmp_path, renamed), golden)
    assert np.abs(actions - golden.actions_fp32).max() <= TOLERANCE


def test_tied_and_unused_heads_are_accepted(golden: Golden, tmp_path) -> None:
    tensors = load_file(str(golden.checkpoint / "model.safetensors"))
    embed_key = "model.paligemma_with_expert.paligemma.language_model.model.embed_tokens.weight"
    # Only the tied head stored, not the embedding; plus the expert's unused head.
    tensors["model.paligemma_with_expert.paligemma.language_model.lm_head.weight"] = tensors.pop(embed_key)
    tensors["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(5, 32)
    actions = reference_actions(copy_checkpoint(golden, tmp_path, tensors), golden)
    assert np.abs(actions - golden.actions_fp32).max() <= TOLERANCE


@pytest.mark.parametrize("golden", ["lerobot-pi0-tiny"], indirect=True)
def test_missing_tensor_is_named(golden: Golden, tmp_path) -> None:
    tensors = load_file(str(golden.checkpoint / "model.safetensors"))
    del tensors["model.paligemma_with_expert.gemma_expert.model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor for expert\.layers\.2\.mlp\.up_proj\.weight"):
        load_checkpoint(copy_checkpoint(golden, tmp_path, tensors))


@pytest.mark.parametrize("golden", ["lerobot-pi0-tiny"], indirect=True)
def test_extra_tensor_is_named(golden: Golden, tmp_path) -> None:
    tensors = load_file(str(golden.checkpoint / "model.safetensors"))
    tensors["model.paligemma_with_expert.paligemma.vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*vision_model\.head\.probe"):
        load_checkpoint(copy_checkpoint(golden, tmp_path, tensors))


@pytest.mark.parametrize("golden", ["lerobot-pi0-tiny"], indirect=True)
def test_wrong_shape_is_named(golden: Golden, tmp_path) -> None:
    tensors = load_file(str(golden.checkpoint / "model.safetensors"))
    key = "model.paligemma_with_expert.paligemma.language_model.model.layers.1.mlp.down_proj.weight"
    tensors[key] = torch.zeros(64, 127)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down_proj\.weight has shape \(64, 127\)"):
        load_checkpoint(copy_checkpoint(golden, tmp_path, tensors))


@pytest.mark.parametrize("golden", ["lerobot-pi0-tiny"], indirect=True)
def test_missing_statistics_are_refused(golden: Golden, tmp_path) -> None:
    tensors = load_file(str(golden.checkpoint / "model.safetensors"))
    del tensors["unnormalize_outputs.buffer_action.std"]
    with pytest.raises(CheckpointError, match="no action statistics"):
        load_checkpoint(copy_checkpoint(golden, tmp_path, tensors))
