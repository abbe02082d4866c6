"""The onnxruntime backend: the bundle's ONNX graphs on onnxruntime, CPU or CUDA when installed.

The prefix cache is bound as device-resident OrtValues (IOBinding): the VLM writes it, every expert
step reads it where it lies; only state, x_t and t go in and the velocity comes out per step. Each
`prefix()` returns its own cache and binding, so any number may be alive at once. Inputs and outputs
are bound by the names and order the manifest lists for each graph.
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtime.backends import BackendOptions, Capabilities, cache_readers, check_reads, expert_graph
from runtime.bundle.graphs import EXPERT, GUIDANCE_SCALE, PREFIX_CACHE, STEP_INPUTS, VLM, VLM_GRAPHS
from runtime.bundle.manifest import ONNX, Bundle, BundleError
from runtime.pipeline.model_io import ModelInputs

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class PrefixCache:
    """One request's prefix cache (device-resident OrtValues, by name), the VLM graph that wrote it, and per
    expert graph that reads it, the binding that reads it (made on that graph's first step)."""

    values: dict[str, Any]
    writer: str
    bindings: dict[str, Any] = field(default_factory=dict)
    live: bool = field(default=True)

    def release(self) -> None:
        self.values, self.bindings, self.live = {}, {}, False


# x86 CPU flags with which onnxruntime's int8 GEMMs add u8 x s8 products in 32 bits (VNNI, AMX). Without
# them (SSE4.1, AVX2, AVX-512 without VNNI) it pairs the products in 16 bits, which saturate: onnxruntime's own
# "x86/64 U8S8 Gemm Precision Fix" (#12088) says so. An int8 bundle is validated on the exporting machine.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def x86_without_int8_dot(cpuinfo: str | None = None) -> bool:
    """Whether this is an x86 CPU whose flags (/proc/cpuinfo) have none of `INT8_DOT_FLAGS`; False elsewhere
    (other architectures, or no /proc/cpuinfo to read)."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return flags is not None and not any(flag in flags for flag in INT8_DOT_FLAGS)


def refuse_int8_without_int8_dot(bundle: Bundle) -> None:
    if bundle.precision == "int8" and x86_without_int8_dot():
        raise BundleError(
            "this bundle is int8, validated where the CPU adds int8 products in 32 bits (VNNI or AMX); this CPU "
            f"has none of {', '.join(INT8_DOT_FLAGS)}, where onnxruntime's int8 GEMMs can saturate and the actions "
            "would differ from the validated ones: serve the policy's fp32 bundle on this machine"
        )


def _ort() -> Any:
    return importlib.import_module("onnxruntime")  # here, not at import: reading `capabilities` needs no onnxruntime


class OnnxRuntimeBackend:
    name = "onnxruntime"
    capabilities: ClassVar[Capabilities] = Capabilities(
        artefact=ONNX, library="onnxruntime", weights_in_host_memory=True, max_live_caches=None
    )

    def __init__(
        self, bundle: Bundle, options: BackendOptions | None = None, providers: list[str] | None = None
    ) -> None:
        refuse_int8_without_int8_dot(bundle)
        ort = self.ort = _ort()
        options = options or BackendOptions()
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.threads  # 0: one per core
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.log_severity_level = 3
        # No busy-waiting between runs: spinning intra-op threads would take the cores from the ZeroMQ
        # I/O thread and from numpy between runs (pi0-dummy engine on 2 cores: 49 -> 40 ms p50).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = providers or [p for p in PREFERRED_PROVIDERS if p in available]
        self.providers = providers
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        graphs = bundle.graphs
        self.sessions = {
            name: ort.InferenceSession(str(graph.onnx), session_options, providers=providers)
            for name, graph in graphs.items()
        }
        self.io = {name: (graph.inputs, graph.outputs) for name, graph in graphs.items()}
        self.readers = cache_readers(self.io)
        self.input_dtypes = {
            name: {i["name"]: np.dtype(i["dtype"]) for i in graph.inputs} for name, graph in graphs.items()
        }
        self.step_inputs = {
            name: [i["name"] for i in graph.inputs if i["name"] not in PREFIX_CACHE]
            for name, graph in graphs.items()
            if name not in VLM_GRAPHS
        }
        provided = {f.name for f in fields(ModelInputs)}
        unknown = {n for names in self.step_inputs.values() for n in names} - {*STEP_INPUTS, GUIDANCE_SCALE}
        unknown |= {i["name"] for g in VLM_GRAPHS if g in graphs for i in graphs[g].inputs} - provided
        if unknown:
            raise BundleError(f"the bundle's graphs take inputs this runtime does not provide: {sorted(unknown)}")

    def _cast(self, graph: str, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=self.input_dtypes[graph][name])

    def prefix(self, inputs: ModelInputs, graph: str = VLM) -> PrefixCache:
        """Run a VLM graph; its outputs (the prefix cache) stay where onnxruntime put them."""
        if graph not in self.readers:
            raise BundleError(f"this bundle has no {graph} graph")
        binding = self.sessions[graph].io_binding()
        for spec in self.io[graph][0]:
            binding.bind_cpu_input(spec["name"], self._cast(graph, spec["name"], getattr(inputs, spec["name"])))
        names = [spec["name"] for spec in self.io[graph][1]]
        for name in names:
            binding.bind_output(name, self.device)
        self.sessions[graph].run_with_iobinding(binding)
        return PrefixCache(dict(zip(names, binding.get_outputs(), strict=True)), graph)

    def _binding(self, cache: PrefixCache, graph: str) -> Any:
        """The cache bound to an expert graph once per request; each step then binds only its step inputs."""
        if graph not in cache.bindings:
            check_reads(self.readers, cache.writer, graph)
            binding = self.sessions[graph].io_binding()
            for spec in self.io[graph][0]:
                if spec["name"] in PREFIX_CACHE:
                    binding.bind_ortvalue_input(spec["name"], cache.values[spec["name"]])
            for spec in self.io[graph][1]:
                binding.bind_output(spec["name"], "cpu")
            cache.bindings[graph] = binding
        return cache.bindings[graph]

    def velocity(
        self, cache: PrefixCache, state: np.ndarray, x_t: np.ndarray, t: np.ndarray, guidance_scale: float | None = None
    ) -> np.ndarray:
        if not cache.live:
            raise BundleError("this prefix cache was released")
        graph = expert_graph(guidance_scale)
        binding = self._binding(cache, graph)
        values = {"state": state, "x_t": x_t, "t": t, GUIDANCE_SCALE: np.array([guidance_scale], np.float32)}
        for name in self.step_inputs[graph]:  # pi0.5's expert takes no state
            binding.bind_cpu_input(name, self._cast(graph, name, values[name]))
        self.sessions[graph].run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def cache_to_numpy(self, cache: PrefixCache) -> dict[str, np.ndarray]:
        """For validation only: copy the prefix cache out."""
        return {name: value.numpy() for name, value in cache.values.items()}

    def prefix_from_numpy(self, keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> PrefixCache:
        """For validation only: a prefix cache made from given arrays (e.g. the PyTorch model's)."""
        arrays = dict(zip(PREFIX_CACHE, (keys, values, mask), strict=True))
        cache = {
            name: self.ort.OrtValue.ortvalue_from_numpy(self._cast(EXPERT, name, array), self.device)
            for name, array in arrays.items()
        }
        return PrefixCache(cache, VLM)

    def close(self) -> None:
        self.sessions = {}

    def device_memory(self) -> None:
        return None  # the CPU's memory is the process's: RSS in the metrics
