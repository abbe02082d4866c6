"""A small SentencePiece tokenizer for the random-weight presets, trained here from our own prompts.

Real checkpoints use PaliGemma's `tokenizer.model`, given by path (never downloaded). The presets
need a tokenizer too, so that the prompt path runs end to end; this one uses PaliGemma's special ids
(pad 0, eos 1, bos 2, unk 3), keeps text as is with a newline token, and falls back to bytes, so any
prompt tokenizes.
"""

from __future__ import annotations

import io
from pathlib import Path

PROMPTS = Path(__file__).with_name("assets") / "prompts.txt"


def train_tokenizer(out_path: str | Path, vocab_size: int = 512) -> Path:
    """Train on `assets/prompts.txt` and write a SentencePiece model file; deterministic."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPTS.read_text().splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        # Like PaliGemma's: text kept as is (no NFKC, no whitespace folding, no dummy prefix) and a
        # newline token, since pi0's prompts end with "\n".
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out
