"""openpi checkpoints straight from JAX training: `<step>/params/` (an orbax PyTree checkpoint, OCDBT
layout) and `<step>/assets/<asset id>/norm_stats.json`, pi0 and pi0.5, full fine-tunes and LoRA ones.

The arrays are read with tensorstore alone (the exporter's optional `jax` extra; no JAX, no orbax), every
key path ending in `value` (the saved tree is `{"params": nnx.State}`). Scanned layers carry the layer on
axis 0; `_1` names the action expert. Each array is mapped onto our module names in our layouts
(`exporter/lora.py` for the adapters, merged at export). A JAX checkpoint does not store what its training
config knew: the config is named (`exporter.openpi_configs`), its `action_horizon` applies unless given (it
is not in any shape), and the rest is a flag (`exporter.readers.openpi_pytorch.OpenpiOptions`). An array or adapter this reader cannot place is
an error, never dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.checkpoint import CheckpointError, LoadedPolicy
from exporter.lora import Adapter, merge_
from exporter.readers.openpi_pytorch import OPTIONS as OPENPI_OPTIONS
from exporter.readers.openpi_pytorch import OpenpiOptions, chunk_size, norm_stats_files, openpi_policy
from exporter.weights import SUFFIX_MODULES, model_from

FORMAT = "openpi-jax"
OPTIONS = (*OPENPI_OPTIONS, "lora_alpha")  # what `load` takes
PARAMS = "params"
UNUSED = ("PaliGemma/llm/final_norm/scale",)  # the language model's final norm: the prefix's output is never read
NORMS = {"input_layernorm": "pre_attention_norm", "post_attention_layernorm": "pre_ffw_norm"}  # ours: openpi's
ATTN_EQNS = {"q_einsum": "BTD,NDH->BTNH", "kv_einsum": "BSD,2KDH->2BSKH", "attn_vec_einsum": "BTNH,NHD->BTD"}


def detect(directory: Path) -> bool:
    return (directory / PARAMS / "_METADATA").is_file() and bool(norm_stats_files(directory))


def read_params(params: Path) -> dict[str, np.ndarray]:
    """Every array of an orbax params checkpoint by its path without the leading `params` and trailing
    `value` (e.g. `PaliGemma/llm/embedder/input_embedding`), as stored (bfloat16 stays bfloat16)."""
    try:
        import tensorstore
    except ImportError as e:
        raise CheckpointError(
            "reading a JAX checkpoint needs tensorstore: pip install '.[jax]' (workstation only)"
        ) from e
    metadata = json.loads((params / "_METADATA").read_text())
    driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
    arrays = {}
    for entry in metadata["tree_metadata"].values():
        keys = [k["key"] for k in entry["key_metadata"]]
        if keys[0] != "params" or keys[-1] != "value":
            raise CheckpointError(f"{params}: unexpected tree path {'/'.join(keys)} (openpi saves params/.../value)")
        spec = {
            "driver": driver,
            "kvstore": {"driver": "ocdbt", "base": f"file://{params.resolve()}", "path": ".".join(keys)},
        }
        arrays["/".join(keys[1:-1])] = tensorstore.open(spec, read=True).result().read().result()
    return arrays


class _Mapper:
    """Takes arrays out of the checkpoint's tree as it maps them, so that what is left over is known."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = dict(arrays)
        self.tensors: dict[str, np.ndarray] = {}

    def take(self, path: str) -> np.ndarray:
        if path not in self.arrays:
            raise CheckpointError(f"the checkpoint has no {path}")
        return np.asarray(self.arrays.pop(path), dtype=np.float32)

    def put(self, name: str, value: np.ndarray) -> None:
        self.tensors[name] = np.ascontiguousarray(value, dtype=np.float32)


def _vision(m: _Mapper) -> None:
    img = "PaliGemma/img"
    m.put("vision.patch_embedding.weight", m.take(f"{img}/embedding/kernel").transpose(3, 2, 0, 1))  # HWIO -> OIHW
    m.put("vision.patch_embedding.bias", m.take(f"{img}/embedding/bias"))
    m.put("vision.position_embedding.weight", m.take(f"{img}/pos_embedding")[0])
    block = f"{img}/Transformer/encoderblock"
    attention = f"{block}/MultiHeadDotProductAttention_0"
    stacked = {
        "layer_norm1.weight": m.take(f"{block}/LayerNorm_0/scale"),
        "layer_norm1.bias": m.take(f"{block}/LayerNorm_0/bias"),
        "layer_norm2.weight": m.take(f"{block}/LayerNorm_1/scale"),
        "layer_norm2.bias": m.take(f"{block}/LayerNorm_1/bias"),
        "mlp.fc1.weight": m.take(f"{block}/MlpBlock_0/Dense_0/kernel").transpose(0, 2, 1),
        "mlp.fc1.bias": m.take(f"{block}/MlpBlock_0/Dense_0/bias"),
        "mlp.fc2.weight": m.take(f"{block}/MlpBlock_0/Dense_1/kernel").transpose(0, 2, 1),
        "mlp.fc2.bias": m.take(f"{block}/MlpBlock_0/Dense_1/bias"),
    }
    for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        kernel = m.take(f"{attention}/{theirs}/kernel")  # [L, W, heads, head_dim]
        stacked[f"self_attn.{ours}.weight"] = kernel.reshape(kernel.shape[0], kernel.shape[1], -1).transpose(0, 2, 1)
        bias = m.take(f"{attention}/{theirs}/bias")
        stacked[f"self_attn.{ours}.bias"] = bias.reshape(bias.shape[0], -1)
    out = m.take(f"{attention}/out/kernel")  # [L, heads, head_dim, W]
    stacked["self_attn.out_proj.weight"] = out.reshape(out.shape[0], -1, out.shape[-1]).transpose(0, 2, 1)
    stacked["self_attn.out_proj.bias"] = m.take(f"{attention}/out/bias")
    for name, value in stacked.items():
        for layer in range(value.shape[0]):
            m.put(f"vision.layers.{layer}.{name}", value[layer])
    m.put("vision.post_layernorm.weight", m.take(f"{img}/Transformer/encoder_norm/scale"))
    m.put("vision.post_layernorm.bias", m.take(f"{img}/Transformer/encoder_norm/bias"))
    m.put("projector.weight", m.take(f"{img}/head/kernel").T)
    m.put("projector.bias", m.take(f"{img}/head/bias"))


def _gemma(m: _Mapper, tower: str, suffix: str) -> None:
    layers = "PaliGemma/llm/layers"
    q = m.take(f"{layers}/attn/q_einsum{suffix}/w")  # [L, N, D, H]
    kv = m.take(f"{layers}/attn/kv_einsum{suffix}/w")  # [L, 2, K, D, H]
    out = m.take(f"{layers}/attn/attn_vec_einsum{suffix}/w")  # [L, N, H, D]
    gating = m.take(f"{layers}/mlp{suffix}/gating_einsum")  # [L, 2, D, F]
    linear = m.take(f"{layers}/mlp{suffix}/linear")  # [L, F, D]
    if kv.shape[2] != 1:
        raise CheckpointError(f"kv_einsum{suffix} has {kv.shape[2]} key/value heads; pi0's Gemmas have one")
    norms = {ours: _norm(m, f"{layers}/{theirs}{suffix}") for ours, theirs in NORMS.items()}
    for layer in range(q.shape[0]):
        prefix = f"{tower}.layers.{layer}"
        n, d, h = q.shape[1:]
        m.put(f"{prefix}.self_attn.q_proj.weight", q[layer].transpose(0, 2, 1).reshape(n * h, d))
        m.put(f"{prefix}.self_attn.k_proj.weight", kv[layer, 0, 0].T)
        m.put(f"{prefix}.self_attn.v_proj.weight", kv[layer, 1, 0].T)
        m.put(f"{prefix}.self_attn.o_proj.weight", out[layer].reshape(n * h, -1).T)
        m.put(f"{prefix}.mlp.gate_proj.weight", gating[layer, 0].T)
        m.put(f"{prefix}.mlp.up_proj.weight", gating[layer, 1].T)
        m.put(f"{prefix}.mlp.down_proj.weight", linear[layer].T)
        for ours, params in norms.items():
            for name, value in params.items():
                m.put(f"{prefix}.{ours}.{name}", value[layer])


def _norm(m: _Mapper, path: str) -> dict[str, np.ndarray]:
    """gemma.RMSNorm's parameters: `scale` (used as 1 + scale), or pi0.5's adaptive norm, a `Dense_0` of
    the time condition giving scale, shift and gate (kernel [..., W, 3W] -> our dense.weight [..., 3W, W])."""
    if f"{path}/scale" in m.arrays:
        return {"weight": m.take(f"{path}/scale")}
    return {
        "dense.weight": np.swapaxes(m.take(f"{path}/Dense_0/kernel"), -1, -2),
        "dense.bias": m.take(f"{path}/Dense_0/bias"),
    }


def _adapters(m: _Mapper, tower: str, suffix: str, depth: int, alpha: float | None) -> list[Adapter]:
    """The LoRA factors beside the tower's weights, as adapters on our Linears; openpi's LoRAConfig
    scaling is alpha / rank (alpha = rank in every openpi LoRA variant, unless told); FeedForward's is 1."""
    layers = "PaliGemma/llm/layers"
    found = []

    def factors(base: str, leaf_style: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """lora.Einsum keeps `<w's module>/lora_a`; lora.FeedForward `<param>_lora_a` beside the param."""
        a_path, b_path = (f"{base}/lora_{x}" if leaf_style else f"{base}_lora_{x}" for x in "ab")
        if a_path not in m.arrays and b_path not in m.arrays:
            return None
        return m.take(a_path), m.take(b_path)

    for name, eqn in ATTN_EQNS.items():
        pair = factors(f"{layers}/attn/{name}{suffix}")
        if pair is None:
            continue
        a, b = pair
        rank = a.shape[-1]
        scale = (alpha if alpha is not None else rank) / rank
        for layer in range(depth):
            common = {
                "eqn": eqn,
                "a": a[layer],
                "b": b[layer],
                "scale": scale,
                "rank": rank,
                "alpha": alpha or float(rank),
            }
            where = f"{layers}/attn/{name}{suffix}/lora_{{a,b}}"
            attn = f"{tower}.layers.{layer}.self_attn"
            if name == "q_einsum":
                found.append(Adapter(f"{attn}.q_proj", in_shape=(a.shape[2],), select=None, leaf=where, **common))
            elif name == "kv_einsum":
                for c, proj in enumerate(("k_proj", "v_proj")):
                    found.append(Adapter(f"{attn}.{proj}", in_shape=(a.shape[3],), select=c, leaf=where, **common))
            else:
                found.append(Adapter(f"{attn}.o_proj", in_shape=a.shape[1:3], select=None, leaf=where, **common))
    gating = factors(f"{layers}/mlp{suffix}/gating_einsum", leaf_style=False)
    if gating is not None:
        a, b = gating  # [L, 2, D, r], [L, 2, r, F]: gate, then up
        for layer in range(depth):
            for i, proj in enumerate(("gate_proj", "up_proj")):
                found.append(
                    Adapter(f"{tower}.layers.{layer}.mlp.{proj}", "BTD,DF->BTF", a[layer, i], b[layer, i], 1.0, (a.shape[2],),
                            None, a.shape[-1], None, f"{layers}/mlp{suffix}/gating_einsum_lora_{{a,b}}")
                )  # fmt: skip
    linear = factors(f"{layers}/mlp{suffix}/linear", leaf_style=False)
    if linear is not None:
        a, b = linear  # [L, F, r], [L, r, D]
        for layer in range(depth):
            found.append(
                Adapter(f"{tower}.layers.{layer}.mlp.down_proj", "BTF,FD->BTD", a[layer], b[layer], 1.0, (a.shape[1],),
                        None, a.shape[-1], None, f"{layers}/mlp{suffix}/linear_lora_{{a,b}}")
            )  # fmt: skip
    return found


def load(
    directory: Path, dtype: torch.dtype = torch.float32, lora_alpha: float | None = None, **options: Any
) -> LoadedPolicy:
    opts = OpenpiOptions(**options)
    horizon = chunk_size(opts, None)  # a JAX checkpoint does not store it: given, else the config's
    m = _Mapper(read_params(directory / PARAMS))
    _vision(m)
    m.put("embed_tokens.weight", m.take("PaliGemma/llm/embedder/input_embedding"))
    depth = m.arrays["PaliGemma/llm/layers/attn/q_einsum/w"].shape[0]
    adapters = [*_adapters(m, "llm", "", depth, lora_alpha), *_adapters(m, "expert", "_1", depth, lora_alpha)]
    _gemma(m, "llm", "")
    _gemma(m, "expert", "_1")
    for name, value in _norm(m, "PaliGemma/llm/final_norm_1").items():
        m.put(f"expert.norm.{name}", value)
    for module in SUFFIX_MODULES:
        if f"{module}/kernel" in m.arrays:
            m.put(f"{module}.weight", m.take(f"{module}/kernel").T)
            m.put(f"{module}.bias", m.take(f"{module}/bias"))
    for path in UNUSED:
        m.arrays.pop(path, None)
    if m.arrays:
        raise CheckpointError(f"{directory}: arrays this reader cannot place: {sorted(m.arrays)}")
    shapes = {name: value.shape for name, value in m.tensors.items()}
    model = model_from(shapes, lambda name: torch.from_numpy(m.tensors[name]).to(dtype), str(directory / PARAMS))
    details: dict[str, Any] = {"format": FORMAT}
    if adapters:
        merged = merge_(model, adapters)
        details["lora"] = {
            "merged": True,
            "adapters": merged.summary(),
            "kinds": sorted(
                {
                    f"rank {a.rank}, "
                    + (f"alpha {a.alpha:g} (scale {a.scale:g})" if a.alpha else "unscaled (FeedForward)")
                    for a in adapters
                }
            ),
        }
        policy = openpi_policy(model, directory, opts, horizon, details)
        policy.adapters = merged
        return policy
    return openpi_policy(model, directory, opts, horizon, details)
