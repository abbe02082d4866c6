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
    """`dtype`: what float inputs are cast to (float64 when the model runs in float64 for the floor)."""

    name = "pytorch"

    def __init__(self, model: Pi0, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.dtype = model, dtype

    def as_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.asarray(array))
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    @torch.no_grad()
    def prefix(self, inputs: ModelInputs) -> PrefixCache:
        """The prefix's keys, values and validity, kept as tensors for the steps."""
        t = self.as_tensor
        return self.model.prefix_kv(t(inputs.images), t(inputs.image_masks), t(inputs.tokens), t(inputs.token_mask))

    @torch.no_grad()
    def velocity(self, cache: PrefixCache, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        t_ = self.as_tensor
        return self.model.velocity(t_(state), t_(x_t), t_(t), *cache).numpy()

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
