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
from exporter.pi0 import POSITIVE, UNCONDITIONED, Pi0
from runtime.backends import Capabilities
from runtime.bundle.graphs import VLM
from runtime.bundle.guidance import Guidance
from runtime.engine import Engine, Prompts
from runtime.pipeline.model_io import ModelInputs


@dataclass
class PrefixCache:
    """Each prompt's prefix keys, values and validity as tensors (guidance over two prompts: two, the
    unconditioned prompt's first); released by dropping them."""

    prompts: list[tuple[torch.Tensor, ...]]

    def release(self) -> None:
        self.prompts = []


class TorchBackend:
    """`dtype`: what float inputs are cast to (float64 when the model runs in float64 for the floor).

    Guidance is computed as its definition reads, not as the graphs batch it: each branch its own prefix
    (one per prompt) and its own expert call, batch 1, combined here as v_u + beta (v_c - v_u) in float32."""

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
    def prefix(self, inputs: ModelInputs, graph: str = VLM) -> PrefixCache:
        """Each prompt's keys, values and validity, kept as tensors for the steps (`graph` is implied by the
        number of prompts)."""
        t = self.as_tensor
        images, masks = t(inputs.images), t(inputs.image_masks)
        return PrefixCache(
            [
                self.model.prefix_kv(images, masks, t(tokens[None]), t(mask[None]))
                for tokens, mask in zip(inputs.tokens, inputs.token_mask, strict=True)
            ]
        )

    def _branch(
        self, cache: tuple[torch.Tensor, ...], state: np.ndarray, x_t: np.ndarray, t: np.ndarray, condition: int | None
    ) -> np.ndarray:
        t_ = self.as_tensor
        labels = None if condition is None else torch.tensor([condition])
        return self.model.velocity(t_(state), t_(x_t), t_(t), *cache, condition=labels).numpy()

    @torch.no_grad()
    def velocity(
        self, cache: PrefixCache, state: np.ndarray, x_t: np.ndarray, t: np.ndarray, guidance_scale: float | None = None
    ) -> np.ndarray:
        learned = self.model.dims.condition is not None
        if guidance_scale is None:
            return self._branch(cache.prompts[-1], state, x_t, t, POSITIVE if learned else None)
        if learned:
            v_u = self._branch(cache.prompts[0], state, x_t, t, UNCONDITIONED)
            v_c = self._branch(cache.prompts[0], state, x_t, t, POSITIVE)
        else:
            v_u, v_c = (self._branch(p, state, x_t, t, None) for p in cache.prompts)
        return (v_u + np.float32(guidance_scale) * (v_c - v_u)).astype(np.float32)

    def close(self) -> None:
        pass


def reference_engine(policy: LoadedPolicy, tokenizer: Path | None = None, guidance: Guidance | None = None) -> Engine:
    """The policy's float32 model as an engine; prompts are tokenized with `tokenizer` when given."""
    spec = policy.spec
    prompts = Prompts(
        spec.tokenizer_max_length,
        policy.model.dims.vocab_size,
        spec.convention_set.prompt,
        tokenizer=tokenizer,
        state_in_prompt=spec.state_in_prompt,
    )
    return Engine(spec, TorchBackend(policy.model), prompts, precision="fp32", source=policy.source, guidance=guidance)
