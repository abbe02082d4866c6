"""Our PyTorch pi0 behind the engine's backend surface: the exporter's float32 reference.

`reference_engine` is `runtime.engine.Engine` itself over this backend, so the reference and the daemon
run the same validation, prompt handling, transforms and Euler loop, and differ only in the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from exporter.checkpoint import LoadedPolicy
from exporter.pi0 import Pi0
from runtime.backends import Capabilities
from runtime.engine import Engine, Prompts
from runtime.pipeline.model_io import ModelInputs


@dataclass
class PrefixCache:
    """The prefix's keys, values and validity as tensors; released by dropping them."""

    tensors: tuple[torch.Tensor, ...]

    def release(self) -> None:
        self.tensors = ()


class TorchBackend:
    """`dtype`: what float inputs are cast to (float64 when the model runs in float64 for the floor)."""

    name = "pytorch"
    capabilities: ClassVar[Capabilities] = Capabilities(
        artefact="checkpoint", library="torch", weights_in_host_memory=True, max_live_caches=None
    )

    def __init__(self, model: Pi0, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.dtype = model, dtype

    def as_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.asarray(array))
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    @torch.no_grad()
    def prefix(self, inputs: ModelInputs) -> PrefixCache:
        """The prefix's keys, values and validity, kept as tensors for the steps."""
        t = self.as_tensor
        return PrefixCache(
            self.model.prefix_kv(t(inputs.images), t(inputs.image_masks), t(inputs.tokens), t(inputs.token_mask))
        )

    @torch.no_grad()
    def velocity(self, cache: PrefixCache, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        t_ = self.as_tensor
        return self.model.velocity(t_(state), t_(x_t), t_(t), *cache.tensors).numpy()

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
