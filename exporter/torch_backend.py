"""Our PyTorch pi0 behind the engine's backend surface: the exporter's float32 reference.

`reference_engine` is `runtime.engine.Engine` itself over this backend, so the reference and the daemon
run the same validation, prompt handling, transforms and Euler loop, and differ only in the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from exporter.checkpoint import LoadedPolicy
from exporter.pi0 import Pi0
from runtime.engine import Engine, Prompts
from runtime.pipeline import ModelInputs

PrefixCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TorchBackend:
    name = "pytorch"

    def __init__(self, model: Pi0) -> None:
        self.model = model

    @torch.no_grad()
    def prefix(self, inputs: ModelInputs) -> PrefixCache:
        """The prefix's keys, values and validity, kept as tensors for the steps."""
        t = torch.from_numpy
        return self.model.prefix_kv(t(inputs.images), t(inputs.image_masks), t(inputs.tokens), t(inputs.token_mask))

    @torch.no_grad()
    def velocity(self, cache: PrefixCache, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        as_tensor = torch.from_numpy
        return self.model.velocity(as_tensor(state), as_tensor(x_t), as_tensor(t), *cache).numpy()

    def close(self) -> None:
        pass


def reference_engine(policy: LoadedPolicy, tokenizer: Path | None = None) -> Engine:
    """The policy's float32 model as an engine; prompts are tokenized with `tokenizer` when given."""
    spec = policy.spec
    prompts = Prompts(
        spec.tokenizer_max_length,
        policy.model.dims.vocab_size,
        spec.convention_set.prompt,
        tokenizer=tokenizer,
        state_in_prompt=spec.state_in_prompt,
    )
    return Engine(spec, TorchBackend(policy.model), prompts, precision="fp32", source=policy.source)
