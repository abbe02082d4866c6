"""Prompt -> (tokens, mask) with a SentencePiece model (PaliGemma's `tokenizer.model`, or ours).

sentencepiece is imported lazily: a bundle with a fixed, pre-tokenized prompt needs no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.spec import PromptStyle

PAD_ID, BOS_ID = 0, 2  # PaliGemma's ids: pad 0, eos 1, bos 2, unk 3


class PromptTokenizer:
    """Formats and tokenizes a task prompt the way the checkpoint's framework did in training.

    - "lerobot": the text, with a trailing newline added if missing, BOS first (LeRobot v0.3).
    - "openpi": stripped, `_` and newlines turned to spaces, BOS first, then a newline token (pi0).
    Both are right-padded with PAD_ID to `max_length`, with a boolean mask of the real tokens.
    """

    def __init__(self, model_path: str | Path, max_length: int, style: PromptStyle) -> None:
        import sentencepiece

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.max_length = max_length
        self.style = style

    def encode(self, prompt: str) -> list[int]:
        sp = self.processor
        if self.style == "lerobot":
            text = prompt if prompt.endswith("\n") else prompt + "\n"
            return [sp.bos_id(), *sp.encode(text)]
        cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
        return [sp.bos_id(), *sp.encode(cleaned), *sp.encode("\n")]

    def __call__(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(prompt)
        if len(ids) > self.max_length:
            raise ValueError(f"prompt is {len(ids)} tokens, this policy takes at most {self.max_length}: {prompt!r}")
        tokens = np.full((1, self.max_length), PAD_ID, dtype=np.int64)
        tokens[0, : len(ids)] = ids
        mask = np.zeros((1, self.max_length), dtype=bool)
        mask[0, : len(ids)] = True
        return tokens, mask
