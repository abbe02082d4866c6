"""pi0 and pi0.5: PaliGemma over the prefix, a Gemma action expert over the suffix, flow matching
between them.

pi0's suffix is a state token then the action tokens, each `action_time_mlp(action, sincos(t))`. pi0.5's
(`dims.pi05`, openpi's `Pi0Config(pi05=True)`) is the action tokens alone, `action_in_proj(x_t)`; the time
conditions the expert's adaptive norms instead, through `time_mlp` (silu after both layers), and the
state reaches the model as prompt tokens.

The two towers attend jointly, layer by layer: the expert's block i attends to the prefix keys and
values of the language model's block i, then to its own. The prefix (image tokens, then language
tokens, bidirectional) never attends to the suffix, so it is computed once per observation:

    prefix_kv(images, image_masks, tokens, token_mask) -> keys, values [depth, B, P, head_dim], prefix_mask
    velocity(state, x_t, t, keys, values, prefix_mask) -> v_t               (num_steps times)

Classifier-free guidance (docs/guidance.md) serves `v_u + beta (v_c - v_u)` per step, both branches in one
batch of two: `guided_velocity` takes the prefix cache of batch 1 (a learned condition, `dims.condition`:
row 0 of `condition_embedding` the unconditioned branch, row 1 the positive one, added to every action
token, seed 003's "bias" mode) or of batch 2 (a condition in the prompt: the unconditioned prompt's cache
first, the conditioned one's second, from `prefix_kv` over both prompts at once).

These methods are what the exporter traces into the VLM and action-expert graphs: static shapes,
no data-dependent Python, no in-place cache. The reference runs them through `exporter.torch_backend`
under the runtime's own Euler loop. Masks and positions are pi0's: `attention_mask_2d` is big_vision's make_attn_mask.

Precision (`exporter/layers.py`): in an fp16 bundle the suffix projections (action, state and time) are
float16 matmuls like the towers' (the 310P's Cube has no float32); their outputs are widened to float32
before the residual stream, the activations and the velocity read them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exporter.dims import Pi0Dims
from exporter.gemma import GemmaStack, mask_bias
from exporter.layers import Linear, wide
from exporter.siglip import SiglipVision

TIME_MIN_PERIOD, TIME_MAX_PERIOD = 4e-3, 4.0
CONDITIONS = ("unconditioned", "positive")  # the rows of `condition_embedding`
UNCONDITIONED, POSITIVE = range(len(CONDITIONS))


def attention_mask_2d(pad_mask: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] validity and [B, N] autoregressive markers -> [B, N, N] "query may attend key".

    A token attends to valid tokens whose cumulative ar marker is <= its own: all zeros is full
    (bidirectional) attention, all ones causal, and a 1 starts a new block that earlier tokens cannot see.
    """
    cumsum = torch.cumsum(ar_mask.to(torch.int32), dim=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    return causal & pad_mask[:, None, :] & pad_mask[:, :, None]


@functools.lru_cache(maxsize=8)
def time_frequencies(width: int) -> np.ndarray:
    """2 pi / period for periods spaced geometrically from 4e-3 to 4, computed in float64 as LeRobot
    does and stored as a float32 constant."""
    period = TIME_MIN_PERIOD * (TIME_MAX_PERIOD / TIME_MIN_PERIOD) ** np.linspace(0.0, 1.0, width // 2)
    return (2.0 * math.pi / period).astype(np.float32)


def time_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal embedding of the flow time t [B] -> [B, width]: sin first, periods 4e-3 .. 4."""
    phase = wide(t)[:, None] * torch.from_numpy(time_frequencies(width)).to(wide(t).dtype)[None]
    return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)


class Pi0(nn.Module):
    def __init__(self, dims: Pi0Dims) -> None:
        super().__init__()
        self.dims = dims
        vis, lang, exp = dims.vision, dims.language, dims.expert
        self.vision = SiglipVision(vis)
        self.projector = Linear(vis.width, lang.width)
        self.embed_tokens = nn.Embedding(dims.vocab_size, lang.width)
        self.llm = GemmaStack(lang, final_norm=False)
        self.expert = GemmaStack(exp, final_norm=True, adaptive=dims.pi05)
        self.action_in_proj = Linear(dims.max_action_dim, exp.width)
        if dims.pi05:
            self.time_mlp_in = Linear(exp.width, exp.width)
            self.time_mlp_out = Linear(exp.width, exp.width)
        else:
            self.state_proj = Linear(dims.max_state_dim, exp.width)
            self.action_time_mlp_in = Linear(2 * exp.width, exp.width)
            self.action_time_mlp_out = Linear(exp.width, exp.width)
        self.action_out_proj = Linear(exp.width, dims.max_action_dim)
        if dims.condition is not None:
            self.condition_embedding = nn.Embedding(len(CONDITIONS), exp.width)

    # --- prefix: the VLM graph --------------------------------------------------------------------

    def embed_prefix(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, C, 3, H, W], image_masks [B, C], tokens and token_mask [B, L] -> float32 embeddings, validity.
        Images of batch 1 serve prompts of any batch (guidance's two prompts: the vision tower runs once)."""
        b, cams = images.shape[:2]
        n = self.dims.image_tokens
        image_embs = self.projector(self.vision(images.flatten(0, 1))).reshape(b, cams * n, -1)
        # Image tokens are not scaled: LeRobot divides them by sqrt(width) inside transformers'
        # get_image_features and multiplies them back by sqrt(width) in embed_prefix.
        lang_embs = wide(self.embed_tokens(tokens)) * math.sqrt(self.dims.language.width)
        image_valid = image_masks[:, :, None].expand(b, cams, n).reshape(b, cams * n)
        prompts = tokens.shape[0]
        image_embs, image_valid = image_embs.expand(prompts, -1, -1), image_valid.expand(prompts, -1)
        return torch.cat([wide(image_embs), lang_embs], dim=1), torch.cat([image_valid, token_mask], dim=1)

    def prefix_kv(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prefix's post-RoPE keys and values of every layer [depth, B, P, head_dim], and its validity [B, P]."""
        x, prefix_mask = self.embed_prefix(images, image_masks, tokens, token_mask)
        bias = mask_bias(attention_mask_2d(prefix_mask, torch.zeros_like(prefix_mask)))
        positions = torch.cumsum(prefix_mask.to(torch.float32), dim=1) - 1
        keys, values = [], []
        last = len(self.llm.layers) - 1
        for i, layer in enumerate(self.llm.layers):
            if i < last:
                x, k, v = layer(x, positions, bias)
            else:  # the prefix's own output is never read: its last block only needs keys and values
                k, v = layer.keys_values(x, positions)
            keys.append(k)
            values.append(v)
        return torch.stack(keys), torch.stack(values), prefix_mask

    # --- suffix: the action-expert graph ----------------------------------------------------------

    def embed_suffix(
        self, state: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> the suffix tokens and the adaptive norms' condition.

        pi0: state [B, S], noisy actions x_t [B, H, A], time t [B] -> [B, 1 + H, width] (state token, then
        actions), no condition. pi0.5: [B, H, width] (actions alone) and the time condition [B, width].
        `condition` [B] (rows of `condition_embedding`, a model with `dims.condition` only) is added to
        every action token: pi0's action-time embedding, pi0.5's action embedding."""
        action_emb = self.action_in_proj(x_t)
        time_emb = time_embedding(t, action_emb.shape[-1])
        if self.dims.pi05:
            cond = F.silu(wide(self.time_mlp_out(F.silu(wide(self.time_mlp_in(time_emb))))))
            return self._conditioned(wide(action_emb), condition), cond
        state_emb = self.state_proj(state)[:, None]
        action_time = self.action_time_mlp_in(
            torch.cat([wide(action_emb), time_emb[:, None].expand_as(action_emb)], dim=-1)
        )
        action_time = self._conditioned(wide(self.action_time_mlp_out(F.silu(wide(action_time)))), condition)
        return torch.cat([wide(state_emb), action_time], dim=1), None

    def _conditioned(self, action_tokens: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        if self.dims.condition is None:
            if condition is not None:
                raise ValueError("this model has no condition embedding")
            return action_tokens
        if condition is None:
            raise ValueError("this model is conditioned: give the condition (0 unconditioned, 1 positive)")
        return action_tokens + wide(self.condition_embedding(condition))[:, None]

    def velocity(
        self,
        state: torch.Tensor | None,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        prefix_mask: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The flow's velocity v_t [B, H, A] at x_t, attending to the prefix cache (pi0.5 reads no state).
        A cache of batch 1 serves any B (its tokens are the same for every row)."""
        x, cond = self.embed_suffix(state, x_t, t, condition)
        b, s = x.shape[:2]
        # A new block starts at the first action token: the prefix (and pi0's state token) do not see the
        # actions; pi0's state token is a block of its own before them.
        first_action = s - x_t.shape[1]
        ar_mask = (torch.arange(s) <= first_action)[None].expand(b, s)
        suffix_mask = attention_mask_2d(torch.ones(b, s, dtype=torch.bool), ar_mask)
        bias = mask_bias(torch.cat([prefix_mask[:, None, :].expand(b, s, prefix_mask.shape[1]), suffix_mask], dim=2))
        offset = prefix_mask.to(torch.float32).sum(dim=1, keepdim=True)
        positions = offset + torch.arange(s, dtype=torch.float32)[None]
        for i, layer in enumerate(self.expert.layers):
            context = (prefix_keys[i].expand(b, -1, -1), prefix_values[i].expand(b, -1, -1))
            x, _, _ = layer(x, positions, bias, context=context, cond=cond)
        return wide(self.action_out_proj(self.expert.norm(x[:, first_action:], cond)[0]))

    def guided_velocity(
        self,
        state: torch.Tensor | None,
        x_t: torch.Tensor,
        t: torch.Tensor,
        guidance_scale: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        prefix_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Classifier-free guidance at x_t [1, H, A]: `v_u + beta (v_c - v_u)` [1, H, A], the two branches
        one batch of two. The cache is batch 1 (a learned condition: rows 0 and 1 of the embedding) or
        batch 2 (a condition in the prompt: row 0 the unconditioned prompt's, row 1 the conditioned one's)."""
        branches = 2
        condition = torch.tensor([UNCONDITIONED, POSITIVE]) if self.dims.condition is not None else None
        if condition is None and prefix_keys.shape[1] != branches:
            raise ValueError("guidance without a learned condition needs both prompts' prefix caches (batch 2)")
        state2 = None if state is None else state.expand(branches, -1)
        v = self.velocity(
            state2,
            x_t.expand(branches, -1, -1),
            t.expand(branches),
            prefix_keys,
            prefix_values,
            prefix_mask,
            condition,
        )
        v_u, v_c = v[0:1], v[1:2]
        return v_u + wide(guidance_scale).reshape(1, 1, 1) * (v_c - v_u)
