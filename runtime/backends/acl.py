"""The Ascend backend: the bundle's OM graphs through pyACL (`import acl`, shipped with CANN).

Set-up: acl.init once per process (ACL allows no second init, so a backend rebuilt after a device
error reuses it; acl.finalize runs at exit), then device, context, stream; each model loaded with its
description read; every input and output buffer allocated on the device once, with its dataset. Per
request: the VLM's inputs copied host->device, the VLM run; its prefix keys/values/mask *output
buffers are the expert's input buffers* (the same device pointers in both datasets), so the cache
never leaves the device. Per step only x_t and t go host->device and the velocity comes back.
close() frees in reverse order and resets the device.

Never run on a real 310P so far: it is tested against the stand-in `tests/stubs/acl.py`, which
enforces the API's contract and computes through onnxruntime.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.bundle import Bundle
from runtime.graphs import EXPERT, EXPERT_OUTPUTS, PREFIX_CACHE, VLM, VLM_INPUTS
from runtime.pipeline import ModelInputs

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2


class AclError(RuntimeError):
    pass


_init_lock = threading.Lock()
_initialized: weakref.WeakSet = weakref.WeakSet()  # the acl module(s) this process has initialized


def _init_once(acl: Any) -> None:
    """acl.init for the process; acl.finalize registered for its exit (not in a destructor: CANN warns
    that destructors run in an unknown order at exit)."""
    with _init_lock:
        if acl not in _initialized:
            _check(acl.init(), "acl.init")
            atexit.register(acl.finalize)
            _initialized.add(acl)


def _check(ret: int, call: str) -> None:
    if ret != 0:
        raise AclError(f"{call} failed with ACL error {ret}")


@dataclass
class DeviceBuffer:
    name: str
    ptr: int
    size: int
    dtype: np.dtype
    shape: tuple[int, ...]


class AclModel:
    """One OM model: its description, device buffers for every input and output, and datasets."""

    def __init__(self, acl: Any, path: str, io: dict[str, list[dict]], shared_inputs: dict[str, DeviceBuffer]) -> None:
        self.acl = acl
        self.model_id, ret = acl.mdl.load_from_file(path)
        _check(ret, f"acl.mdl.load_from_file({path})")
        self.desc = acl.mdl.create_desc()
        _check(acl.mdl.get_desc(self.desc, self.model_id), "acl.mdl.get_desc")
        self.owned: list[DeviceBuffer] = []
        self.data_buffers: list[Any] = []
        mdl = acl.mdl
        self.inputs = self._dataset(
            io["inputs"],
            mdl.get_num_inputs(self.desc),
            mdl.get_input_size_by_index,
            mdl.get_input_name_by_index,
            shared_inputs,
        )
        self.outputs = self._dataset(
            io["outputs"],
            mdl.get_num_outputs(self.desc),
            mdl.get_output_size_by_index,
            mdl.get_output_name_by_index,
            {},
        )

    def _dataset(
        self, specs: list[dict], count: int, size_of: Any, name_of: Any, shared: dict[str, DeviceBuffer]
    ) -> tuple[Any, dict[str, DeviceBuffer]]:
        if count != len(specs):
            raise AclError(f"the OM model has {count} tensors where the manifest names {len(specs)}")
        dataset = self.acl.mdl.create_dataset()
        buffers = {}
        for index, spec in enumerate(specs):
            if name_of(self.desc, index) != spec["name"]:
                raise AclError(
                    f"OM tensor {index} is {name_of(self.desc, index)!r}, the manifest says {spec['name']!r}"
                )
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            size = size_of(self.desc, index)
            expected = int(np.prod(shape)) * dtype.itemsize
            if size != expected:
                raise AclError(f"OM tensor {spec['name']} is {size} bytes, the manifest says {expected}")
            if spec["name"] in shared:
                buffer = shared[spec["name"]]
            else:
                ptr, ret = self.acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
                _check(ret, "acl.rt.malloc")
                buffer = DeviceBuffer(spec["name"], ptr, size, dtype, shape)
                self.owned.append(buffer)
            data_buffer = self.acl.create_data_buffer(buffer.ptr, buffer.size)
            self.data_buffers.append(data_buffer)
            _, ret = self.acl.mdl.add_dataset_buffer(dataset, data_buffer)
            _check(ret, "acl.mdl.add_dataset_buffer")
            buffers[spec["name"]] = buffer
        return dataset, buffers

    def execute(self) -> None:
        _check(self.acl.mdl.execute(self.model_id, self.inputs[0], self.outputs[0]), "acl.mdl.execute")

    def close(self) -> None:
        acl = self.acl
        for dataset in (self.outputs[0], self.inputs[0]):
            _check(acl.mdl.destroy_dataset(dataset), "acl.mdl.destroy_dataset")
        for data_buffer in reversed(self.data_buffers):
            _check(acl.destroy_data_buffer(data_buffer), "acl.destroy_data_buffer")
        for buffer in reversed(self.owned):
            _check(acl.rt.free(buffer.ptr), "acl.rt.free")
        _check(acl.mdl.unload(self.model_id), "acl.mdl.unload")
        _check(acl.mdl.destroy_desc(self.desc), "acl.mdl.destroy_desc")


class AclBackend:
    name = "acl"

    def __init__(self, bundle: Bundle, device_id: int = 0) -> None:
        import acl  # lazily: only robots with CANN have it

        self.acl = acl
        self.device_id = device_id
        _init_once(acl)
        _check(acl.rt.set_device(device_id), "acl.rt.set_device")
        self.context, ret = acl.rt.create_context(device_id)
        _check(ret, "acl.rt.create_context")
        self.stream, ret = acl.rt.create_stream()
        _check(ret, "acl.rt.create_stream")
        graphs = bundle.graphs
        io = {name: {"inputs": g.inputs, "outputs": g.outputs} for name, g in graphs.items()}
        self.vlm = AclModel(acl, str(graphs[VLM].om), io[VLM], {})
        cache = {k: self.vlm.outputs[1][k] for k in PREFIX_CACHE}  # the expert reads the VLM's output buffers
        self.expert = AclModel(acl, str(graphs[EXPERT].om), io[EXPERT], cache)
        self._state_sent = False

    def _to_device(self, buffer: DeviceBuffer, value: np.ndarray) -> None:
        host = np.ascontiguousarray(value, dtype=buffer.dtype).reshape(buffer.shape)
        ret = self.acl.rt.memcpy(
            buffer.ptr, buffer.size, self.acl.util.numpy_to_ptr(host), host.nbytes, ACL_MEMCPY_HOST_TO_DEVICE
        )
        _check(ret, f"acl.rt.memcpy(H2D {buffer.name})")

    def _to_host(self, buffer: DeviceBuffer) -> np.ndarray:
        host = np.empty(buffer.shape, dtype=buffer.dtype)
        ret = self.acl.rt.memcpy(
            self.acl.util.numpy_to_ptr(host), host.nbytes, buffer.ptr, buffer.size, ACL_MEMCPY_DEVICE_TO_HOST
        )
        _check(ret, f"acl.rt.memcpy(D2H {buffer.name})")
        return host

    def prefix(self, inputs: ModelInputs) -> None:
        """Run the VLM; the prefix cache stays in its output buffers, which the expert reads directly."""
        # ACL contexts are per thread: the engine may run in another thread than the one that set up.
        _check(self.acl.rt.set_context(self.context), "acl.rt.set_context")
        for name in VLM_INPUTS:
            self._to_device(self.vlm.inputs[1][name], getattr(inputs, name))
        self.vlm.execute()
        self._state_sent = False

    def velocity(self, cache: None, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        inputs = self.expert.inputs[1]
        if not self._state_sent and "state" in inputs:  # the same for every step; pi0.5's expert takes none
            self._to_device(inputs["state"], state)
            self._state_sent = True
        self._to_device(inputs["x_t"], x_t)
        self._to_device(inputs["t"], t)
        self.expert.execute()
        return self._to_host(self.expert.outputs[1][EXPERT_OUTPUTS[0]])

    def close(self) -> None:
        """Free everything, in the reverse order of creation."""
        acl = self.acl
        _check(acl.rt.set_context(self.context), "acl.rt.set_context")
        self.expert.close()
        self.vlm.close()
        _check(acl.rt.destroy_stream(self.stream), "acl.rt.destroy_stream")
        _check(acl.rt.destroy_context(self.context), "acl.rt.destroy_context")
        _check(acl.rt.reset_device(self.device_id), "acl.rt.reset_device")
