"""The PyTorch reference pipeline: runtime's numpy transforms around our `Pi0`, in float32.

This is what the exported graphs and the daemon are measured against. It calls the same
`runtime.pipeline` functions as the daemon, so the two can only differ in the network.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from exporter.checkpoint import LoadedPolicy
from runtime.pipeline import ModelInputs, initial_noise, postprocess, preprocess
from runtime.tokenizer import PromptTokenizer


class ReferencePolicy:
    def __init__(self, policy: LoadedPolicy, tokenizer: PromptTokenizer | None = None) -> None:
        self.model = policy.model
        self.spec = policy.spec
        self.tokenizer = tokenizer

    def tokenize(
        self, prompt: str | None, tokens: np.ndarray | None, token_mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if tokens is not None:
            mask = np.ones_like(tokens, dtype=bool) if token_mask is None else token_mask
            return tokens, mask
        if prompt is None:
            raise ValueError("give a prompt or pre-tokenized tokens")
        if self.tokenizer is None:
            raise ValueError("this policy has no tokenizer: give pre-tokenized tokens")
        return self.tokenizer(prompt)

    def sample(self, inputs: ModelInputs, noise: np.ndarray) -> np.ndarray:
        """The network part alone: model inputs and x(t=1) -> x(t=0), normalized and padded."""
        t = torch.from_numpy
        x = self.model.sample(
            t(inputs.images),
            t(inputs.image_masks),
            t(inputs.tokens),
            t(inputs.token_mask),
            t(inputs.state),
            t(np.asarray(noise, dtype=np.float32)),
            self.spec.num_steps,
        )
        return x.numpy()

    def infer(
        self,
        images: Mapping[str, np.ndarray],
        state: np.ndarray,
        *,
        prompt: str | None = None,
        tokens: np.ndarray | None = None,
        token_mask: np.ndarray | None = None,
        noise: np.ndarray | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """One observation -> the action chunk [1, chunk, action_dim] in the robot's units."""
        tokens, token_mask = self.tokenize(prompt, tokens, token_mask)
        inputs = preprocess(self.spec, images, state, tokens, token_mask)
        if noise is None:
            noise = initial_noise(self.spec, np.random.default_rng(seed))
        return postprocess(self.spec, self.sample(inputs, noise))
