"""Prompt formatting and tokenization, with the tokenizer the presets train for themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.tokenizer_train import train_tokenizer
from runtime.pipeline.tokenizer import PromptTokenizer


def test_training_is_deterministic(tokenizer_path: Path, tmp_path: Path) -> None:
    assert train_tokenizer(tmp_path / "again.model").read_bytes() == tokenizer_path.read_bytes()


def test_lerobot_format(tokenizer_path: Path) -> None:
    tok = PromptTokenizer(tokenizer_path, 16, "lerobot")
    sp = tok.processor
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)  # PaliGemma's ids
    tokens, mask = tok("pick up the cube")
    ids = [sp.bos_id(), *sp.encode("pick up the cube\n")]
    assert tokens.shape == mask.shape == (1, 16) and tokens.dtype == np.int64 and mask.dtype == bool
    assert tokens[0, : len(ids)].tolist() == ids and (tokens[0, len(ids) :] == 0).all()
    assert mask[0].tolist() == [True] * len(ids) + [False] * (16 - len(ids))
    assert sp.decode(tokens[0, 1 : len(ids)].tolist()) == "pick up the cube\n"
    # A prompt that already ends in a newline is not given a second one.
    assert (tok("pick up the cube\n")[0] == tokens).all()


def test_openpi_format(tokenizer_path: Path) -> None:
    tok = PromptTokenizer(tokenizer_path, 16, "openpi")
    sp = tok.processor
    tokens, mask = tok("  pick_up the\ncube ")
    ids = [sp.bos_id(), *sp.encode("pick up the cube"), *sp.encode("\n")]
    assert tokens[0, : mask.sum()].tolist() == ids


def test_any_text_tokenizes_through_bytes(tokenizer_path: Path) -> None:
    tok = PromptTokenizer(tokenizer_path, 48, "lerobot")
    tokens, mask = tok("Greif den Würfel 🤖")
    assert tok.processor.unk_id() not in tokens[0, : mask.sum()].tolist()


def test_too_long_prompt_is_refused(tokenizer_path: Path) -> None:
    with pytest.raises(ValueError, match="at most 4"):
        PromptTokenizer(tokenizer_path, 4, "lerobot")("transfer the cube to the other arm")


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        PromptTokenizer(tmp_path / "tokenizer.model", 8, "lerobot")
