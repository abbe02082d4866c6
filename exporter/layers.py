"""The two primitives that place precision in the model code (gemma.py, siglip.py, pi0.py use them).

- `Linear` / `Conv2d` compute in their own weights' dtype, casting their input to it: the export puts
  each matmul's weights in float16, or keeps them float32 where calibration found activations near
  fp16's range (`exporter/precision.py`), and the casts follow by themselves. A float32 matmul's output
  stays float32 for whatever reads it next.
- `wide(x)`: the dtype of the "fp32 islands" (norms, softmax, RoPE, the residual stream): float32, or
  float64 when the whole model runs in float64 to measure the float32 reference's own noise floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))
