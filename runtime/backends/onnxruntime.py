"""The onnxruntime backend: the bundle's ONNX graphs on onnxruntime, CPU or CUDA when installed.

The prefix cache is bound as device-resident OrtValues (IOBinding): the VLM writes it, every expert
step reads it where it lies; only state, x_t and t go in and the velocity comes out per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.bundle import Bundle
from runtime.graphs import EXPERT, EXPERT_OUTPUTS, PREFIX_CACHE, STEP_INPUTS, VLM, VLM_INPUTS
from runtime.pipeline import ModelInputs

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class PrefixCache:
    """One request's prefix cache (device-resident OrtValues) and the expert binding that reads it."""

    values: list[Any]
    binding: Any


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list[str] | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # No busy-waiting between runs: spinning intra-op threads would take the cores from the ZeroMQ
        # I/O thread and from numpy between runs (pi0-dummy engine on 2 cores: 49 -> 40 ms p50).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = providers or [p for p in PREFERRED_PROVIDERS if p in available]
        self.providers = providers
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.vlm = ort.InferenceSession(str(bundle.graphs[VLM].onnx), options, providers=providers)
        self.expert = ort.InferenceSession(str(bundle.graphs[EXPERT].onnx), options, providers=providers)
        self.input_dtypes = {
            graph: {i["name"]: np.dtype(i["dtype"]) for i in files.inputs} for graph, files in bundle.graphs.items()
        }

    def _cast(self, graph: str, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=self.input_dtypes[graph][name])

    def prefix(self, inputs: ModelInputs) -> PrefixCache:
        """Run the VLM; its outputs (prefix keys, values, mask) stay where onnxruntime put them."""
        binding = self.vlm.io_binding()
        for name in VLM_INPUTS:
            binding.bind_cpu_input(name, self._cast(VLM, name, getattr(inputs, name)))
        for name in PREFIX_CACHE:
            binding.bind_output(name, self.device)
        self.vlm.run_with_iobinding(binding)
        return self._expert_binding(binding.get_outputs())

    def _expert_binding(self, cache: list[Any]) -> PrefixCache:
        """Bind the cache to the expert once per request; each step then binds only state, x_t and t."""
        binding = self.expert.io_binding()
        for name, value in zip(PREFIX_CACHE, cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(EXPERT_OUTPUTS[0], "cpu")
        return PrefixCache(cache, binding)

    def velocity(self, cache: PrefixCache, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        binding = cache.binding
        for name, value in zip(STEP_INPUTS, (state, x_t, t), strict=True):
            if name in self.input_dtypes[EXPERT]:  # pi0.5's expert takes no state
                binding.bind_cpu_input(name, self._cast(EXPERT, name, value))
        self.expert.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def cache_to_numpy(self, cache: PrefixCache) -> dict[str, np.ndarray]:
        """For validation only: copy the prefix cache out."""
        return {name: value.numpy() for name, value in zip(PREFIX_CACHE, cache.values, strict=True)}

    def prefix_from_numpy(self, keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> PrefixCache:
        """For validation only: a prefix cache made from given arrays (e.g. the PyTorch model's)."""
        arrays = dict(zip(PREFIX_CACHE, (keys, values, mask), strict=True))
        cache = [ort.OrtValue.ortvalue_from_numpy(self._cast(EXPERT, n, a), self.device) for n, a in arrays.items()]
        return self._expert_binding(cache)

    def close(self) -> None:
        self.vlm = self.expert = None
