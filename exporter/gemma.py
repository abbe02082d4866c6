"""Gemma decoder blocks as pi0 uses them (openpi's gemma.py; HF's GemmaDecoderLayer).

RMSNorm scales by (1 + weight) with the variance in float32; GeGLU MLP with tanh GELU; RoPE on split
halves with max wavelength 10 000 (real sin/cos, no complex numbers); multi-query attention (one
key/value head) with logits, mask and softmax in float32. Parameter names follow HF.

pi0.5's action expert conditions every norm on the flow time (adaptive RMSNorm, openpi's
transformers_replace GemmaRMSNorm with `cond_dim`): a dense layer of the condition gives scale, shift
and gate; the norm is `norm(x) * (1 + scale) + shift` and the sub-layer's residual `x + y * gate`.

Precision (`exporter/layers.py`): the residual stream, norms, RoPE and softmax are always float32
(`wide`, the vector side); each matmul, the attention's two included, runs in its weights' dtype
(float16 in an fp16 bundle, scaled by a power of two where calibration found magnitudes near fp16's
range), and each sub-layer's output is added back in float32. With float32 weights every cast is a
no-op; with float16 weights the float32 vector side keeps Gemma's large residual activations (> 65 504)
from overflowing.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from exporter.dims import GemmaDims
from exporter.layers import Linear, MatMul, gelu_tanh, wide

RMS_NORM_EPS = 1e-6
ROPE_MAX_WAVELENGTH = 10_000
BIG_NEG = -2.3819763e38  # the masked-logit value of big_vision / openpi


def _rms(x: torch.Tensor) -> torch.Tensor:
    xf = wide(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """-> the normed x (float32), and no gate (`cond` is for the adaptive norm's surface)."""
        return _rms(x) * (1.0 + wide(self.weight)), None


class AdaptiveRMSNorm(nn.Module):
    """pi0.5's norm: `dense(cond)` -> scale, shift, gate over the feature axis."""

    def __init__(self, dim: int, cond_dim: int) -> None:
        super().__init__()
        self.dense = Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, W], cond [B, cond_dim] -> (norm(x) * (1 + scale) + shift in float32, gate [B, 1, W])."""
        assert cond is not None, "the adaptive norm needs its condition"
        scale, shift, gate = self.dense(cond)[:, None].chunk(3, dim=-1)
        return _rms(x) * (1.0 + wide(scale)) + wide(shift), gate


def make_norm(dims: GemmaDims, adaptive: bool) -> nn.Module:
    return AdaptiveRMSNorm(dims.width, dims.width) if adaptive else RMSNorm(dims.width)


def gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The residual: `x + y`, or pi0.5's `x + y * gate`, in float32."""
    return x + (wide(y) if gate is None else wide(y) * wide(gate))


@functools.lru_cache(maxsize=8)
def rope_timescales(head_dim: int) -> np.ndarray:
    """max_wavelength ** (2i / D) for i < D/2, in float32 (a constant of the graph, not ops in it)."""
    exponents = np.float32(2.0 / head_dim) * np.arange(head_dim // 2, dtype=np.float32)
    return np.float32(ROPE_MAX_WAVELENGTH) ** exponents


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, S, heads, D] at float positions [B, S]; rotates the two halves of D."""
    half = x.shape[-1] // 2
    xw = wide(x)
    timescales = torch.from_numpy(rope_timescales(x.shape[-1])).to(xw.dtype)
    radians = positions[..., None, None].to(xw.dtype) / timescales  # [B, S, 1, half]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = xw.split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """A bool attention mask [B, S, T] as the float32 bias the scores take: 0 where attended, BIG_NEG where
    not. Made once per graph and added in every layer: `score + BIG_NEG` rounds to BIG_NEG for any score
    under ~1e31, so the softmax sees exactly openpi's `where(mask, scores, BIG_NEG)`, and onnxruntime's
    broadcast Add is about 3x faster than its broadcast Where."""
    return torch.where(mask, 0.0, BIG_NEG)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, qk: MatMul, pv: MatMul
) -> torch.Tensor:
    """Multi-query attention: q [B, S, H, D], k and v [B, T, D], the mask's bias [B, S, T] (`mask_bias`)
    -> [B, S, H*D]. `qk`, `pv`: the two matmuls (scores in float32 for the mask and softmax; probs in the
    values' dtype). With one key/value head every query row, of any token and head, meets the same keys:
    q is read as S*H rows [B, S*H, D], so each product is one GEMM and no heads axis is transposed in or out."""
    b, s, h, d = q.shape
    t = k.shape[1]
    scores = wide(qk(wide(q.reshape(b, s * h, d)), wide(k).transpose(-1, -2), d**-0.5))  # [B, S*H, T]
    scores = scores.view(b, s, h, t) + bias[:, :, None]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return pv(probs.view(b, s * h, t), v).view(b, s, h * d)


class GemmaAttention(nn.Module):
    def __init__(self, dims: GemmaDims) -> None:
        super().__init__()
        self.num_heads, self.head_dim = dims.num_heads, dims.head_dim
        self.q_proj = Linear(dims.width, dims.num_heads * dims.head_dim, bias=False)
        self.k_proj = Linear(dims.width, dims.head_dim, bias=False)
        self.v_proj = Linear(dims.width, dims.head_dim, bias=False)
        self.o_proj = Linear(dims.num_heads * dims.head_dim, dims.width, bias=False)
        self.qk, self.pv = MatMul(), MatMul()  # scores = q k^T / sqrt(D), probs @ v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, bias, self.qk, self.pv)

    def queries(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        return rope(self.q_proj(h).view(b, s, self.num_heads, self.head_dim), positions)

    def keys_values(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values [B, S, D]: what the KV cache holds."""
        k = rope(self.k_proj(h)[:, :, None], positions)[:, :, 0]
        return k, self.v_proj(h)


class GemmaMLP(nn.Module):
    def __init__(self, dims: GemmaDims) -> None:
        super().__init__()
        self.gate_proj = Linear(dims.width, dims.mlp_dim, bias=False)
        self.up_proj = Linear(dims.width, dims.mlp_dim, bias=False)
        self.down_proj = Linear(dims.mlp_dim, dims.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product is down_proj's input: it runs in the wider of its factors' dtypes, and in float32
        (the vector side) where calibration scaled down_proj, which then scales and casts it."""
        gate, up = self.gate_proj(x), self.up_proj(x)
        dtype = torch.promote_types(gate.dtype, up.dtype)
        if getattr(self.down_proj, "scale_exp", 0):
            dtype = torch.promote_types(dtype, torch.float32)
        return self.down_proj(gelu_tanh(gate.to(dtype)) * up.to(dtype))


class GemmaBlock(nn.Module):
    def __init__(self, dims: GemmaDims, adaptive: bool = False) -> None:
        super().__init__()
        self.input_layernorm = make_norm(dims, adaptive)
        self.self_attn = GemmaAttention(dims)
        self.post_attention_layernorm = make_norm(dims, adaptive)
        self.mlp = GemmaMLP(dims)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.self_attn.keys_values(self.input_layernorm(x)[0], positions)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask_bias: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
        cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block over the float32 residual stream x [B, S, W]; `context` is (keys, values) of tokens
        attended to before x's own; `mask_bias` the attention mask as `mask_bias()` makes it; `cond` the
        adaptive norms' condition (pi0.5).

        Returns the new x and x's own post-RoPE keys and values.
        """
        h, gate = self.input_layernorm(x, cond)
        k, v = self.self_attn.keys_values(h, positions)
        keys, values = (k, v) if context is None else (torch.cat([context[0], k], 1), torch.cat([context[1], v], 1))
        attn = self.self_attn
        x = gated(x, attn.o_proj(attn.attend(attn.queries(h, positions), keys, values, mask_bias)), gate)
        h, gate = self.post_attention_layernorm(x, cond)
        x = gated(x, self.mlp(h), gate)
        return x, k, v


class GemmaStack(nn.Module):
    """The blocks of one Gemma tower; the final norm only where its output is read (the expert).
    `adaptive`: every norm is conditioned (pi0.5's action expert)."""

    def __init__(self, dims: GemmaDims, final_norm: bool, adaptive: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GemmaBlock(dims, adaptive) for _ in range(dims.depth))
        self.norm = make_norm(dims, adaptive) if final_norm else None
