"""The primitives that place precision in the model code (gemma.py, siglip.py, pi0.py use them).

The 310P's Cube unit multiplies float16 only: a float32 MatMul/Gemm/Conv runs on the slow AI CPU. So in
an fp16 bundle every matrix product takes float16 operands, and where calibration found magnitudes near
fp16's range (`exporter/precision.py`) it is computed on operands scaled by a power of two, 2^-k, and its
output scaled back by 2^k in float32: exact in binary floating point (short of fp16 subnormals).

- `Linear` / `Conv2d` compute in their own weights' dtype, casting their input to it. `scale_exp` (k, 0
  unless calibration set it) > 0: `(x 2^-k) W` in float16, then `* 2^k + bias` in float32; the output is
  float32 for whatever reads it next. With k = 0 the forward is the plain one (the float32 path).
- `MatMul`: the product of two activations (attention's scores and probs @ values). `dtype` None (the
  float32 model): `a @ b` as given; float16: both operands cast to it, each scaled by its own 2^-k
  (`scale_exp`: (k_a, k_b)) when calibration asked for it, and the output scaled back in float32.
- `wide(x)`: the dtype of the vector side (norms, softmax, RoPE, the residual stream): float32, or
  float64 when the whole model runs in float64 to measure the float32 reference's own noise floor.
- `gelu_tanh(x)`: GELU's tanh approximation, exported in the form onnxruntime fuses into one kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


SQRT_2_OVER_PI = 0.7978845608028654


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`. In eager PyTorch it is that call (the numbers upstream computes); in
    the ONNX export it is written `(0.5 x)(1 + tanh((0.797885 x)(1 + 0.044715 x x)))`, the same function to
    float32 rounding and the first formula onnxruntime's FastGeluFusion recognises: the CPU then runs one
    FastGelu kernel instead of the nine elementwise passes of torch's own decomposition (about 0.4 ms of
    each expert layer's 12 ms at pi0's widths on a 2-core VM). ATC sees the same Mul, Add and Tanh operators as before, and
    no x^3 (which overflows float16 past |x| = 40)."""
    if not torch.onnx.is_in_onnx_export():
        return F.gelu(x, approximate="tanh")
    return (0.5 * x) * (1.0 + torch.tanh((SQRT_2_OVER_PI * x) * (1.0 + 0.044715 * x * x)))


def _down(x: torch.Tensor, k: int, dtype: torch.dtype, pre: float = 1.0) -> torch.Tensor:
    """x * pre * 2^-k, computed on the vector side, then cast to the Cube's dtype."""
    factor = pre * 2.0**-k
    return (wide(x) * factor if factor != 1.0 else x).to(dtype)


def _up(y: torch.Tensor, k: int) -> torch.Tensor:
    """The Cube's output back in float32, times 2^k."""
    return wide(y) * 2.0**k if k else y


class Linear(nn.Linear):
    scale_exp: int = 0  # k: calibration's power-of-two scale (fp16 bundles only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.scale_exp
        if not k:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        y = _up(F.linear(_down(x, k, self.weight.dtype), self.weight), k)
        return y if self.bias is None else y + wide(self.bias)


class Conv2d(nn.Conv2d):
    scale_exp: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.scale_exp
        if not k:
            return super().forward(x.to(self.weight.dtype))
        y = _up(self._conv_forward(_down(x, k, self.weight.dtype), self.weight, None), k)
        return y if self.bias is None else y + wide(self.bias)[:, None, None]


class MatMul(nn.Module):
    """`(a @ b) * post` for two activations; see the module doc. `post` (attention's 1/sqrt(head_dim)) is
    applied after the product in the float32 model, and to `a` before it on the Cube (so that the scores,
    not q k^T, are what must fit fp16)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtype: torch.dtype | None = None  # None: as the operands come (the float32 model)
        self.scale_exp: tuple[int, int] = (0, 0)

    def forward(self, a: torch.Tensor, b: torch.Tensor, post: float = 1.0) -> torch.Tensor:
        if self.dtype is None:
            y = a @ b
            return y * post if post != 1.0 else y
        ka, kb = self.scale_exp
        return _up(_down(a, ka, self.dtype, post) @ _down(b, kb, self.dtype), ka + kb)
