"""SigLIP vision tower (openpi's siglip.py, HF's SiglipVisionTransformer): images -> patch tokens.

Patchify with a stride-14 convolution, add a learned position embedding, pre-LN transformer blocks
(multi-head attention with biases, GELU-tanh MLP), a final LayerNorm. No pooling head: pi0 keeps
all 256 tokens. Parameter names inside blocks follow HF so a checkpoint maps over by prefix.
Precision as in gemma.py: float32 residual stream, LayerNorms and softmax; each matmul (the attention's
two included) in its weights' dtype, power-of-two scaled where calibration asked for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exporter.dims import VisionDims
from exporter.layers import Conv2d, Linear, MatMul, gelu_tanh, wide

LAYER_NORM_EPS = 1e-6


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed (and returned) in float32 whatever the weights' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = wide(x)
        w, b = self.weight.to(xw.dtype), self.bias.to(xw.dtype)
        return F.layer_norm(xw, self.normalized_shape, w, b, self.eps)


class SiglipAttention(nn.Module):
    def __init__(self, dims: VisionDims) -> None:
        super().__init__()
        self.num_heads, self.head_dim = dims.num_heads, dims.head_dim
        self.q_proj = Linear(dims.width, dims.width)
        self.k_proj = Linear(dims.width, dims.width)
        self.v_proj = Linear(dims.width, dims.width)
        self.out_proj = Linear(dims.width, dims.width)
        self.qk, self.pv = MatMul(), MatMul()  # scores = q k^T / sqrt(D), probs @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        scores = wide(self.qk(wide(q), wide(k).transpose(-1, -2), self.head_dim**-0.5))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return self.out_proj(self.pv(probs, v).transpose(1, 2).reshape(b, n, w))


class SiglipMLP(nn.Module):
    def __init__(self, dims: VisionDims) -> None:
        super().__init__()
        self.fc1 = Linear(dims.width, dims.mlp_dim)
        self.fc2 = Linear(dims.mlp_dim, dims.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipBlock(nn.Module):
    def __init__(self, dims: VisionDims) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(dims.width, eps=LAYER_NORM_EPS)
        self.self_attn = SiglipAttention(dims)
        self.layer_norm2 = LayerNorm(dims.width, eps=LAYER_NORM_EPS)
        self.mlp = SiglipMLP(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + wide(self.self_attn(self.layer_norm1(x)))
        return x + wide(self.mlp(self.layer_norm2(x)))


class SiglipVision(nn.Module):
    """[N, 3, 224, 224] in [-1, 1] -> [N, 256, width] (float32)."""

    def __init__(self, dims: VisionDims) -> None:
        super().__init__()
        self.patch_embedding = Conv2d(3, dims.width, kernel_size=dims.patch_size, stride=dims.patch_size)
        self.position_embedding = nn.Embedding(dims.num_patches, dims.width)
        self.layers = nn.ModuleList(SiglipBlock(dims) for _ in range(dims.depth))
        self.post_layernorm = LayerNorm(dims.width, eps=LAYER_NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = wide(self.patch_embedding(images).flatten(2).transpose(1, 2))
        x = x + self.position_embedding.weight[None].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
