"""The onnxruntime backend: the bundle's ONNX graphs on onnxruntime's CPU (or another) provider."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.bundle import Bundle
from runtime.pipeline import ModelInputs


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list[str] | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        providers = providers or ["CPUExecutionProvider"]
        self.vlm = ort.InferenceSession(str(bundle.graphs["vlm"].onnx), options, providers=providers)
        self.expert = ort.InferenceSession(str(bundle.graphs["expert"].onnx), options, providers=providers)
        self.input_dtypes = {
            graph: {i["name"]: np.dtype(i["dtype"]) for i in files.inputs} for graph, files in bundle.graphs.items()
        }
        self.cache_names = [o.name for o in self.vlm.get_outputs()]

    def _cast(self, graph: str, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=self.input_dtypes[graph][name])

    def prefix(self, inputs: ModelInputs) -> list[Any]:
        """Run the VLM; the returned OrtValues (prefix keys, values, mask) stay with onnxruntime."""
        feeds = {
            name: ort.OrtValue.ortvalue_from_numpy(self._cast("vlm", name, getattr(inputs, name)))
            for name in ("images", "image_masks", "tokens", "token_mask")
        }
        return self.vlm.run_with_ort_values(self.cache_names, feeds)

    def velocity(self, cache: list[Any], state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        feeds = {
            "state": ort.OrtValue.ortvalue_from_numpy(self._cast("expert", "state", state)),
            "x_t": ort.OrtValue.ortvalue_from_numpy(self._cast("expert", "x_t", x_t)),
            "t": ort.OrtValue.ortvalue_from_numpy(self._cast("expert", "t", t)),
            **dict(zip(self.cache_names, cache, strict=True)),
        }
        return self.expert.run_with_ort_values(["velocity"], feeds)[0].numpy()

    def cache_to_numpy(self, cache: list[Any]) -> dict[str, np.ndarray]:
        """For validation only: copy the prefix cache out."""
        return {name: value.numpy() for name, value in zip(self.cache_names, cache, strict=True)}

    def prefix_from_numpy(self, keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> list[Any]:
        """For validation only: a prefix cache made from given arrays (e.g. the PyTorch model's)."""
        arrays = dict(zip(self.cache_names, (keys, values, mask), strict=True))
        return [ort.OrtValue.ortvalue_from_numpy(self._cast("expert", n, a)) for n, a in arrays.items()]
