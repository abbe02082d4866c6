"""Prompt -> (tokens, mask) with a SentencePiece model (PaliGemma's `tokenizer.model`, or ours).

sentencepiece is imported lazily: a bundle with fixed, pre-tokenized prompts needs no tokenizer. For
pi0.5, whose prompt holds the discretized state, a fixed prompt is stored as a `StatePromptTable`: the
tokens of its text and of every state bin, so that the robot assembles the tokens without SentencePiece.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.bundle.conventions import PromptStyle

PAD_ID, BOS_ID = 0, 2  # PaliGemma's ids: pad 0, eos 1, bos 2, unk 3
STATE_BINS = tuple(range(-1, 256))  # what openpi's discretization yields (-1: below the first bin)


def padded(ids: list[int], max_length: int, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids -> (tokens [1, max_length] int64 right-padded with PAD_ID, mask of the real ones)."""
    if len(ids) > max_length:
        raise ValueError(f"prompt is {len(ids)} tokens, this policy takes at most {max_length}: {prompt!r}")
    tokens = np.full((1, max_length), PAD_ID, dtype=np.int64)
    tokens[0, : len(ids)] = ids
    mask = np.zeros((1, max_length), dtype=bool)
    mask[0, : len(ids)] = True
    return tokens, mask


class PromptTokenizer:
    """Formats and tokenizes a task prompt the way the checkpoint's framework did in training.

    - "lerobot": the text, with a trailing newline added if missing, BOS first (LeRobot v0.3).
    - "openpi": stripped, `_` and newlines turned to spaces, BOS first, then a newline token (pi0);
      with `state_in_prompt` (pi0.5) `Task: <text>, State: <bins>;\\nAction: `, BOS first.
    Right-padded with PAD_ID to `max_length`, with a boolean mask of the real tokens; a prompt longer
    than that is refused (openpi would cut it).
    """

    def __init__(
        self, model_path: str | Path, max_length: int, style: PromptStyle, state_in_prompt: bool = False
    ) -> None:
        import sentencepiece

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.max_length = max_length
        self.style = style
        self.state_in_prompt = state_in_prompt

    @staticmethod
    def clean(prompt: str) -> str:
        return prompt.strip().replace("_", " ").replace("\n", " ")

    def encode(self, prompt: str, state_bins: np.ndarray | None = None) -> list[int]:
        sp = self.processor
        if self.state_in_prompt:  # pi0.5: openpi's format, which LeRobot >= 0.4 copies
            if state_bins is None:
                raise ValueError("this policy's prompt carries the state: give the state's bins")
            state = " ".join(str(int(b)) for b in state_bins)
            return [sp.bos_id(), *sp.encode(f"Task: {self.clean(prompt)}, State: {state};\nAction: ")]
        if self.style == "lerobot":
            text = prompt if prompt.endswith("\n") else prompt + "\n"
            return [sp.bos_id(), *sp.encode(text)]
        return [sp.bos_id(), *sp.encode(self.clean(prompt)), *sp.encode("\n")]

    def __call__(self, prompt: str, state_bins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return padded(self.encode(prompt, state_bins), self.max_length, prompt)


@dataclass(frozen=True)
class StatePromptTable:
    """A pi0.5 prompt's tokens for any state: `head + word[b0] + ... + word[b(n-2)] + last[b(n-1)] + tail`
    (SentencePiece splits on whitespace, so each state bin is tokenized on its own; the last one may join
    the ';' that follows it). Made at export by `build` and proven there against the tokenizer itself."""

    head: list[int]
    words: dict[int, list[int]]  # bin -> its tokens where another bin follows
    lasts: dict[int, list[int]]  # bin -> its tokens as the last one
    tail: list[int]

    def encode(self, state_bins: np.ndarray) -> list[int]:
        bins = [int(b) for b in np.asarray(state_bins).reshape(-1)]
        return [
            *self.head,
            *itertools.chain.from_iterable(self.words[b] for b in bins[:-1]),
            *self.lasts[bins[-1]],
            *self.tail,
        ]

    def longest(self, state_dim: int) -> int:
        """The most tokens any state of `state_dim` values can take."""
        longest_word = max(len(t) for t in self.words.values())
        return (
            len(self.head) + (state_dim - 1) * longest_word + max(len(t) for t in self.lasts.values()) + len(self.tail)
        )

    def to_dict(self) -> dict:
        return {
            "head": self.head,
            "words": {str(b): t for b, t in self.words.items()},
            "lasts": {str(b): t for b, t in self.lasts.items()},
            "tail": self.tail,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StatePromptTable:
        return cls(
            head=list(d["head"]),
            words={int(b): list(t) for b, t in d["words"].items()},
            lasts={int(b): list(t) for b, t in d["lasts"].items()},
            tail=list(d["tail"]),
        )

    @classmethod
    def build(cls, tokenizer: PromptTokenizer, prompt: str, state_dim: int, checks: int = 300) -> StatePromptTable:
        """Derive the table from the tokenizer, then check it against the tokenizer on states that put every
        bin at every position (and `checks` random ones); ValueError where it does not hold."""
        single = {b: tokenizer.encode(prompt, np.array([b])) for b in STATE_BINS}
        head = _common_prefix(list(single.values()))
        tail = _common_suffix([s[len(head) :] for s in single.values()])
        lasts = {b: s[len(head) : len(s) - len(tail)] for b, s in single.items()}
        words = {}
        for b in STATE_BINS:
            pair = tokenizer.encode(prompt, np.array([b, 0]))
            end = [*lasts[0], *tail]
            if pair[: len(head)] != head or pair[len(pair) - len(end) :] != end:
                raise ValueError(f"the tokens of state bin {b} depend on their neighbours: no table for {prompt!r}")
            words[b] = pair[len(head) : len(pair) - len(end)]
        table = cls(head, words, lasts, tail)
        rng = np.random.default_rng(0)
        n = len(STATE_BINS)
        sweep = [np.array([STATE_BINS[(i + 7 * p) % n] for p in range(state_dim)]) for i in range(n)]
        for bins in sweep + list(rng.choice(STATE_BINS, size=(checks, state_dim))):
            if table.encode(bins) != tokenizer.encode(prompt, bins):
                raise ValueError(f"the state table of {prompt!r} differs from the tokenizer at state bins {list(bins)}")
        return table


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    first = sequences[0]
    n = 0
    while n < len(first) and all(len(s) > n and s[n] == first[n] for s in sequences):
        n += 1
    return first[:n]


def _common_suffix(sequences: list[list[int]]) -> list[int]:
    return _common_prefix([s[::-1] for s in sequences])[::-1]
