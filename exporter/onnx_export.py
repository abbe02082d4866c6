"""Trace `Pi0.prefix_kv` and `Pi0.velocity` into the two ONNX graphs of a bundle.

Opset 15, with torch's TorchScript-based exporter: every operator the graphs use is registered by
ATC's ONNX parser at opset 15 in every CANN release we could check (elementwise operators stop at 15
in older ones), and LayerNorm is written out (LayerNormalization needs opset 17). torch's newer
dynamo exporter emits opset 18 only and cannot convert these graphs down.

The graphs' names, inputs and outputs are `runtime.bundle.graphs`' contracts (batch 1, static shapes;
guidance's graphs batch both branches inside).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from exporter.pi0 import POSITIVE, Pi0
from runtime.bundle.graphs import (
    EXPERT,
    EXPERT_GUIDED,
    EXPERT_OUTPUTS,
    VLM,
    VLM_GUIDED,
    VLM_INPUTS,
    VLM_OUTPUTS,
    expert_inputs,
)
from runtime.bundle.guidance import GUIDANCE_KINDS, PROMPT_CONDITION
from runtime.bundle.spec import PolicySpec
from runtime.pipeline.tokenizer import BOS_ID

OPSET = 15


class VLMGraph(nn.Module):
    def __init__(self, model: Pi0) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.prefix_kv(images, image_masks, tokens, token_mask)


class ExpertGraph(nn.Module):
    def __init__(self, model: Pi0) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """[state,] x_t, t, prefix_keys, prefix_values, prefix_mask -> velocity (pi0.5 takes no state); a
        model with a learned condition serves its positive branch (guidance's beta = 1)."""
        state, rest = (None, inputs) if self.model.dims.pi05 else (inputs[0], inputs[1:])
        return self.model.velocity(state, *rest, condition=positive_condition(self.model))


class GuidedExpertGraph(nn.Module):
    def __init__(self, model: Pi0) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """[state,] x_t, t, guidance_scale, prefix_keys, prefix_values, prefix_mask -> the guided velocity."""
        state, rest = (None, inputs) if self.model.dims.pi05 else (inputs[0], inputs[1:])
        return self.model.guided_velocity(state, *rest)


def positive_condition(model: Pi0) -> torch.Tensor | None:
    """The positive branch's condition [1] for a model with a learned one (None for any other)."""
    return None if model.dims.condition is None else torch.tensor([POSITIVE])


def example_inputs(spec: PolicySpec, model: Pi0, seed: int = 0, real_tokens: int = 7) -> dict[str, np.ndarray]:
    """Deterministic, realistic graph inputs: images in [-1, 1], empty slots masked, a few real
    tokens, a normalized state and Gaussian noise. Used to trace and to validate."""
    rng = np.random.default_rng(seed)
    dims = model.dims
    size = spec.image_size
    slots = spec.num_camera_slots
    images = rng.uniform(-1, 1, (1, slots, 3, *size)).astype(np.float32)
    images[:, len(spec.camera_keys) :] = -1.0
    real_tokens = min(spec.tokenizer_max_length, real_tokens)
    tokens = np.zeros((1, spec.tokenizer_max_length), dtype=np.int32)
    tokens[0, 0] = BOS_ID
    tokens[0, 1:real_tokens] = rng.integers(4, dims.vocab_size, real_tokens - 1)
    return {
        "images": images,
        "image_masks": np.array([[True] * len(spec.camera_keys) + [False] * spec.empty_cameras]),
        "tokens": tokens,
        "token_mask": np.arange(spec.tokenizer_max_length)[None] < real_tokens,
        "state": rng.standard_normal((1, dims.max_state_dim)).astype(np.float32),
        "noise": rng.standard_normal((1, spec.chunk_size, dims.max_action_dim)).astype(np.float32),
    }


def two_prompts(tokens: np.ndarray, mask: np.ndarray, extra: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A prompt [1, L] -> [2, L]: it, then it with `extra` more real tokens (as a conditioned prompt is longer)."""
    tokens, mask = np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0)
    real = int(mask[0].sum())
    longer = min(real + extra, mask.shape[1])
    tokens[1, real:longer], mask[1, :longer] = tokens[0, 1 : 1 + longer - real], True
    return tokens, mask


def export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], inputs: tuple[str, ...], outputs: tuple[str, ...], path: Path
) -> list[Path]:
    """Export one graph to `path`; its weights go to `<name>.data` beside it when they pass protobuf's
    2 GB. Returns the files written."""
    scratch = path.parent / f".{path.stem}-export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    traced = scratch / path.name
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            str(traced),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            do_constant_folding=True,
        )
    model = onnx.load(str(traced), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        # Over 2 GB, torch writes one file per tensor; gather them into one, streaming, so the
        # weights are never held in memory a second time.
        data = path.with_name(path.name + ".data")
        _gather_external_data(model, scratch, data)
        onnx.save(model, str(path))
        written = [path, data]
    else:
        onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
        written = [path]
    shutil.rmtree(scratch)
    return written


def _gather_external_data(model: onnx.ModelProto, source_dir: Path, data: Path, align: int = 4096) -> None:
    """Copy every external tensor of `model` (files under `source_dir`) into the single file `data`,
    page-aligned, and point the tensors at it."""
    with open(data, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            out.write(b"\0" * (-out.tell() % align))
            offset = out.tell()
            with open(source_dir / info["location"], "rb") as src:
                src.seek(int(info.get("offset", 0)))
                remaining = int(info["length"]) if "length" in info else None
                while block := src.read(1 << 24 if remaining is None else min(1 << 24, remaining)):
                    out.write(block)
                    if remaining is not None:
                        remaining -= len(block)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(out.tell() - offset))):
                tensor.external_data.add(key=key, value=value)


def graph_io(path: Path) -> dict[str, list[dict]]:
    """Names, shapes and dtypes of a graph's inputs and outputs, as the manifest records them."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values: Iterable[onnx.ValueInfoProto]) -> list[dict]:
        return [
            {
                "name": v.name,
                "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            }
            for v in values
        ]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def export_graphs(
    model: Pi0, spec: PolicySpec, out_dir: Path, seed: int = 0, guidance: str | None = None
) -> dict[str, list[Path]]:
    """Write vlm.onnx and expert.onnx for `model` (in the precision its weights are in), and with
    `guidance` (a `GUIDANCE_KINDS` kind) expert_guided.onnx, and vlm_guided.onnx for a condition in the prompt."""
    if guidance not in (None, *GUIDANCE_KINDS):
        raise ValueError(f"guidance {guidance!r}: the kinds are {GUIDANCE_KINDS}")
    x = {k: torch.from_numpy(v) for k, v in example_inputs(spec, model, seed).items()}
    vlm_args = (x["images"], x["image_masks"], x["tokens"], x["token_mask"])
    with torch.no_grad():
        cache = model.prefix_kv(*vlm_args)
    pi05 = model.dims.pi05
    step = (x["noise"], torch.ones(1)) if pi05 else (x["state"], x["noise"], torch.ones(1))
    files = {
        VLM: export_graph(VLMGraph(model), vlm_args, VLM_INPUTS, VLM_OUTPUTS, out_dir / f"{VLM}.onnx"),
        EXPERT: export_graph(
            ExpertGraph(model), (*step, *cache), expert_inputs(pi05), EXPERT_OUTPUTS, out_dir / f"{EXPERT}.onnx"
        ),
    }
    if guidance is None:
        return files
    if guidance == PROMPT_CONDITION:
        # two prompts over the same images: the second a few tokens longer, as the conditioned one is
        tokens, mask = (torch.from_numpy(a) for a in two_prompts(x["tokens"].numpy(), x["token_mask"].numpy()))
        guided_vlm_args = (x["images"], x["image_masks"], tokens, mask)
        files[VLM_GUIDED] = export_graph(
            VLMGraph(model), guided_vlm_args, VLM_INPUTS, VLM_OUTPUTS, out_dir / f"{VLM_GUIDED}.onnx"
        )
        with torch.no_grad():
            cache = model.prefix_kv(*guided_vlm_args)
    files[EXPERT_GUIDED] = export_graph(
        GuidedExpertGraph(model),
        (*step, torch.full((1,), 1.5), *cache),
        expert_inputs(pi05, guided=True),
        EXPERT_OUTPUTS,
        out_dir / f"{EXPERT_GUIDED}.onnx",
    )
    return files
