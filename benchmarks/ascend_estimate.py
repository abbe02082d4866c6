"""A 310P estimate for the real pi0: FLOPs and bytes moved per action chunk, from the dimensions, against
the chip's published peaks. Nothing here ran on a 310P; it is arithmetic, and says which limit binds.

Bytes moved are what each graph must read from device memory at least once per run: its weights (fp16,
2 bytes; the token embedding only for the rows it gathers) and, for the expert, the prefix KV cache it
attends to at every step. Activations are left out (they are small next to the weights here and may stay
on chip).
"""

from __future__ import annotations

import torch

from benchmarks.fraction_of_peak import expert_step_flops, vlm_flops
from exporter.dims import PRESETS, Pi0Dims
from exporter.pi0 import Pi0

# Huawei's published figures for the Atlas 300I Pro (one 310P chip): 70 TFLOPS fp16, 140 TOPS int8,
# LPDDR4X at 204.8 GB/s.
PEAK_FP16_FLOPS = 70e12
PEAK_BYTES_PER_S = 204.8e9
FP16 = 2


def parameter_counts(dims: Pi0Dims) -> dict[str, int]:
    with torch.device("meta"):
        model = Pi0(dims)

    def count(*modules: torch.nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    expert_heads = (
        model.state_proj, model.action_in_proj, model.action_time_mlp_in, model.action_time_mlp_out,
        model.action_out_proj,
    )  # fmt: skip
    return {
        "vision": count(model.vision, model.projector),
        "embedding": count(model.embed_tokens),
        "language": count(model.llm),
        "expert": count(model.expert, *expert_heads),
    }


def estimate(cameras: int, tokens: int, chunk: int = 50, steps: int = 10, dims: Pi0Dims = PRESETS["pi0"]) -> dict:
    params = parameter_counts(dims)
    prefix = cameras * 256 + tokens
    lang = dims.language
    kv_bytes = lang.depth * 2 * prefix * lang.num_kv_heads * lang.head_dim * FP16
    vlm_bytes = (params["vision"] + params["language"] + tokens * lang.width) * FP16
    step_bytes = params["expert"] * FP16 + kv_bytes
    flops = {"vlm": vlm_flops(dims, cameras, tokens), "expert": steps * expert_step_flops(dims, prefix, chunk)}
    moved = {"vlm": vlm_bytes, "expert": steps * step_bytes}
    floor_s = {k: max(flops[k] / PEAK_FP16_FLOPS, moved[k] / PEAK_BYTES_PER_S) for k in flops}
    return {
        "cameras": cameras,
        "prefix_tokens": prefix,
        "parameters": params,
        "kv_cache_bytes": kv_bytes,
        "flops": flops,
        "bytes": moved,
        "compute_ms": {k: flops[k] / PEAK_FP16_FLOPS * 1e3 for k in flops},
        "memory_ms": {k: moved[k] / PEAK_BYTES_PER_S * 1e3 for k in moved},
        "floor_ms": {k: v * 1e3 for k, v in floor_s.items()},
        "floor_total_ms": sum(floor_s.values()) * 1e3,
        # Were the cache copied to the host and back at every step, as a naive split does:
        "kv_round_trip_per_chunk_bytes": steps * 2 * kv_bytes,
    }


def run() -> dict:
    return {
        "peaks": {"fp16_tflops": PEAK_FP16_FLOPS / 1e12, "gb_per_s": PEAK_BYTES_PER_S / 1e9},
        "aloha_sim_empty_slots_dropped": estimate(cameras=1, tokens=48),
        "aloha_sim_empty_slots_kept": estimate(cameras=3, tokens=48),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
