"""openpi's LoRA (models/lora.py), for merging adapters into our weights at export and for running the
unmerged LoRA forward as a validation reference.

openpi adapts an einsum `eqn` with weight `w` by `einsum(eqn, x, w) + s * einsum(eqn_b, einsum(eqn_a, x, a), b)`,
with eqn_a/eqn_b derived from eqn by `_make_lora_eqns` (ported below exactly: the rank label replaces the
rhs's last axis in `a` and its second-to-last in `b`). Not every derived pair contracts head by head: for the
attention output (`BTNH,NHD->BTD`) the pair is `BTNH,NHL->BTL` and `BTL,NLD->BTD`, which sums over the heads in
both factors. So the merge is never written out per weight: each adapter's low-rank path is applied to the
identity in our Linear's input space, which reads off exactly the linear map openpi's forward computes.
`lora.FeedForward` adds `(x @ a) @ b` with no scaling at all, whatever alpha (an einsum with s = 1 here).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def lora_eqns(eqn: str, axes: tuple[int, int] = (-2, -1), label: str = "L") -> tuple[str, str]:
    """openpi's `lora.Einsum._make_lora_eqns`."""
    if label in eqn:
        raise ValueError(f"{label} already in eqn: {eqn}")
    if not (m := re.match("(.*),(.*)->(.*)", eqn)):
        raise ValueError(f"Unsupported einsum eqn: {eqn}")
    lhs, rhs, out = m.groups()
    a_label, b_label = (rhs[x] for x in axes)
    a_rhs = rhs.replace(b_label, label)
    a_out = out.replace(b_label, label)
    b_rhs = rhs.replace(a_label, label)
    return f"{lhs},{a_rhs}->{a_out}", f"{a_out},{b_rhs}->{out}"


def _letters_only(eqn: str) -> str:
    """jnp.einsum takes kv_einsum's `2` as a label; torch.einsum wants letters: give it an unused one."""
    spare = iter(c for c in "CEFGIJMOPQRUVWXYZ" if c not in eqn)
    digits = {c: next(spare) for c in sorted(set(eqn)) if c.isdigit()}
    return "".join(digits.get(c, c) for c in eqn)


@dataclass
class Adapter:
    """One adapted weight, as our Linear `module` sees it. `a`, `b`: openpi's factors for this layer;
    `in_shape`: how our input's last axis unflattens into the eqn's lhs (after the batch axes B, T);
    `select`: for an eqn whose output leads with a stacking axis (kv_einsum's `2`), which slice is ours."""

    module: str
    eqn: str
    a: np.ndarray
    b: np.ndarray
    scale: float
    in_shape: tuple[int, ...]
    select: int | None
    rank: int
    alpha: float | None  # None: openpi's FeedForward, which does not scale
    leaf: str  # where the factors were in the checkpoint

    def path(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank path on our input x [B, T, in] -> [B, T, out], by openpi's eqns."""
        eqn_a, eqn_b = (_letters_only(e) for e in lora_eqns(self.eqn))
        b, t = x.shape[:2]
        a, bf = torch.as_tensor(self.a, dtype=x.dtype), torch.as_tensor(self.b, dtype=x.dtype)
        y = torch.einsum(eqn_b, torch.einsum(eqn_a, x.reshape(b, t, *self.in_shape), a), bf) * self.scale
        if self.select is not None:
            y = y[self.select]
        return y.reshape(b, t, -1)

    def delta(self) -> torch.Tensor:
        """The merged update of our Linear's weight [out, in], in float64: the path applied to the identity."""
        n = int(np.prod(self.in_shape))
        return self.path(torch.eye(n, dtype=torch.float64)[None])[0].T  # the factors follow x's dtype


class LoraLinear(nn.Module):
    """The unmerged forward: the base weight and openpi's low-rank path beside it."""

    def __init__(self, base: nn.Linear, base_weight: torch.Tensor, adapter: Adapter) -> None:
        super().__init__()
        self.bias = base.bias
        self.base_weight = base_weight
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, read where the model reads a Linear's (its dtype sets the MLP product's)."""
        return self.base_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base_weight.to(x.dtype), self.bias) + self.adapter.path(x)


@dataclass
class Adapters:
    """The adapters a checkpoint held, with the base weights they were merged into."""

    adapters: list[Adapter]
    base_weights: dict[str, torch.Tensor]  # module -> its weight before the merge (float32)

    def summary(self) -> list[dict]:
        return [
            {"module": a.module, "from": a.leaf, "rank": a.rank, "alpha": a.alpha, "scale": a.scale}
            for a in self.adapters
        ]


def merge_(model: nn.Module, adapters: list[Adapter]) -> Adapters:
    """Fold every adapter into its Linear's weight, in place; returns them with the unmerged weights."""
    modules = dict(model.named_modules())
    bases = {}
    for adapter in adapters:
        linear = modules[adapter.module]
        bases[adapter.module] = linear.weight.detach().clone()
        merged = linear.weight.double() + adapter.delta()
        linear.weight.data = merged.to(linear.weight.dtype)
    return Adapters(adapters, bases)


@contextlib.contextmanager
def lora_forward(model: nn.Module, adapters: Adapters) -> Iterator[None]:
    """Run `model` unmerged (base weights + openpi's low-rank paths) inside the block."""
    modules = dict(model.named_modules())
    swapped = []
    for adapter in adapters.adapters:
        parent_name, _, child = adapter.module.rpartition(".")
        parent, linear = modules[parent_name], modules[adapter.module]
        setattr(parent, child, LoraLinear(linear, adapters.base_weights[adapter.module], adapter))
        swapped.append((parent, child, linear))
    try:
        yield
    finally:
        for parent, child, linear in swapped:
            setattr(parent, child, linear)
