"""The Ascend backend: the bundle's OM graphs through pyACL (`import acl`, shipped with CANN).

Set-up: acl.init once per process (ACL allows no second init, so a backend rebuilt after a device
error reuses it; acl.finalize runs at exit), then device, context, stream; each model loaded and its
description checked against the manifest's lists of inputs and outputs (names, sizes, order). Device
buffers are allocated once: the VLM's inputs and the expert's per-step inputs and output are shared;
each prefix cache has a `CacheSlot` of its own: the VLM's output buffers, which are *the expert's cache
input buffers* (the same device pointers in a VLM output dataset and an expert input dataset), and
the request's state. So the cache never leaves the device, and several may be alive at once (up to
`BackendOptions.live_caches`, 2 by default): `prefix()` takes a free slot (allocating one up to the
limit, the first at set-up) and its handle gives it back when released or dropped. Per request the
VLM's inputs go host->device and the state once; per step only x_t and t, and the velocity comes back.
close() frees in reverse order and resets the device.

Never run on a real 310P so far: it is tested against the stand-in `tests/stubs/acl.py`, which
enforces the API's contract and computes through onnxruntime.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from runtime.backends import BackendOptions, Capabilities
from runtime.bundle.graphs import EXPERT, STEP_INPUTS, VLM
from runtime.bundle.manifest import OM, Bundle
from runtime.errors import ApplianceError
from runtime.pipeline.model_io import ModelInputs

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2


class AclError(ApplianceError):
    """An ACL call failed (its error code named), or an OM model does not match the manifest."""


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
    """One OM model: its description, checked against the manifest's inputs and outputs."""

    def __init__(self, acl: Any, path: str, io: dict[str, list[dict]]) -> None:
        self.acl = acl
        self.model_id, ret = acl.mdl.load_from_file(path)
        _check(ret, f"acl.mdl.load_from_file({path})")
        self.desc = acl.mdl.create_desc()
        try:
            _check(acl.mdl.get_desc(self.desc, self.model_id), "acl.mdl.get_desc")
            mdl = acl.mdl
            self.inputs = self._checked(
                io["inputs"], mdl.get_num_inputs, mdl.get_input_size_by_index, mdl.get_input_name_by_index
            )
            self.outputs = self._checked(
                io["outputs"], mdl.get_num_outputs, mdl.get_output_size_by_index, mdl.get_output_name_by_index
            )
        except AclError:
            self.close()
            raise

    def _checked(self, specs: list[dict], count_of: Any, size_of: Any, name_of: Any) -> list[dict]:
        count = count_of(self.desc)
        if count != len(specs):
            raise AclError(f"the OM model has {count} tensors where the manifest names {len(specs)}")
        for index, spec in enumerate(specs):
            if name_of(self.desc, index) != spec["name"]:
                raise AclError(
                    f"OM tensor {index} is {name_of(self.desc, index)!r}, the manifest says {spec['name']!r}"
                )
            size, expected = size_of(self.desc, index), _nbytes(spec)
            if size != expected:
                raise AclError(f"OM tensor {spec['name']} is {size} bytes, the manifest says {expected}")
        return specs

    def execute(self, inputs: Dataset, outputs: Dataset) -> None:
        _check(self.acl.mdl.execute(self.model_id, inputs.handle, outputs.handle), "acl.mdl.execute")

    def close(self) -> None:
        _check(self.acl.mdl.unload(self.model_id), "acl.mdl.unload")
        _check(self.acl.mdl.destroy_desc(self.desc), "acl.mdl.destroy_desc")


def _nbytes(spec: dict) -> int:
    return int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize


class Dataset:
    """An ACL dataset over device buffers, in a model's tensor order (its own data buffers)."""

    def __init__(self, acl: Any, buffers: list[DeviceBuffer]) -> None:
        self.acl = acl
        self.handle = acl.mdl.create_dataset()
        self.data_buffers: list[Any] = []
        for buffer in buffers:
            data_buffer = acl.create_data_buffer(buffer.ptr, buffer.size)
            self.data_buffers.append(data_buffer)
            _, ret = acl.mdl.add_dataset_buffer(self.handle, data_buffer)
            _check(ret, "acl.mdl.add_dataset_buffer")

    def close(self) -> None:
        _check(self.acl.mdl.destroy_dataset(self.handle), "acl.mdl.destroy_dataset")
        for data_buffer in reversed(self.data_buffers):
            _check(self.acl.destroy_data_buffer(data_buffer), "acl.destroy_data_buffer")


class DeviceMemory:
    """Device buffers allocated for the backend, freed in reverse order by `close`."""

    def __init__(self, acl: Any) -> None:
        self.acl = acl
        self.buffers: list[DeviceBuffer] = []

    def allocate(self, spec: dict) -> DeviceBuffer:
        size = _nbytes(spec)
        ptr, ret = self.acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
        _check(ret, "acl.rt.malloc")
        buffer = DeviceBuffer(spec["name"], ptr, size, np.dtype(spec["dtype"]), tuple(spec["shape"]))
        self.buffers.append(buffer)
        return buffer

    def free(self, buffers: list[DeviceBuffer]) -> None:
        for buffer in reversed(buffers):
            _check(self.acl.rt.free(buffer.ptr), "acl.rt.free")
            self.buffers.remove(buffer)


@dataclass
class CacheSlot:
    """One prefix cache's device memory: the VLM's outputs (the cache) and the request's state, with the
    VLM output dataset that writes them and the expert input dataset that reads them."""

    buffers: list[DeviceBuffer]
    vlm_outputs: Dataset
    expert_inputs: Dataset
    by_name: dict[str, DeviceBuffer] = field(default_factory=dict)
    state_sent: bool = False


class AclPrefixCache:
    """A live prefix cache: its slot, given back to the backend's pool on `release()` or when dropped."""

    def __init__(self, backend: AclBackend, slot: CacheSlot) -> None:
        self.slot: CacheSlot | None = slot
        self._finalizer = weakref.finalize(self, backend._give_back, slot)

    def release(self) -> None:
        self.slot = None
        self._finalizer()


class AclBackend:
    name = "acl"
    capabilities: ClassVar[Capabilities] = Capabilities(
        artefact=OM, library="acl", weights_in_host_memory=False, max_live_caches=2
    )

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None) -> None:
        import acl  # lazily: only robots with CANN have it

        options = options or BackendOptions()
        self.acl = acl
        self.device_id = options.device_id
        self.max_live_caches = options.live_caches or self.capabilities.max_live_caches
        _init_once(acl)
        _check(acl.rt.set_device(self.device_id), "acl.rt.set_device")
        self.context, ret = acl.rt.create_context(self.device_id)
        _check(ret, "acl.rt.create_context")
        self.stream, ret = acl.rt.create_stream()
        _check(ret, "acl.rt.create_stream")
        om = bundle.artefact(OM)
        if om is None:
            raise AclError("the acl backend needs OM files: this bundle was not compiled with atc")
        graphs = bundle.graphs
        self.vlm = AclModel(acl, str(om[VLM]), {"inputs": graphs[VLM].inputs, "outputs": graphs[VLM].outputs})
        self.expert = AclModel(
            acl, str(om[EXPERT]), {"inputs": graphs[EXPERT].inputs, "outputs": graphs[EXPERT].outputs}
        )
        provided = {f.name for f in fields(ModelInputs)}
        unknown = [s["name"] for s in self.vlm.inputs if s["name"] not in provided]
        cache_names = {s["name"] for s in self.vlm.outputs}
        # Per slot: the cache and the state (sent once per request); shared: the VLM's inputs, x_t and t, the velocity.
        self.per_slot = [s for s in self.expert.inputs if s["name"] in cache_names or s["name"] == "state"]
        shared_steps = [s for s in self.expert.inputs if s not in self.per_slot]
        unknown += [s["name"] for s in shared_steps if s["name"] not in STEP_INPUTS]
        if unknown:
            raise AclError(f"the bundle's graphs take inputs this runtime does not provide: {unknown}")
        self.memory = DeviceMemory(acl)
        self.vlm_inputs = {s["name"]: self.memory.allocate(s) for s in self.vlm.inputs}
        self.step_inputs = {s["name"]: self.memory.allocate(s) for s in shared_steps}
        self.velocity_out = self.memory.allocate(self.expert.outputs[0])
        self.vlm_input_set = Dataset(acl, list(self.vlm_inputs.values()))
        self.expert_output_set = Dataset(acl, [self.velocity_out])
        self._lock = threading.Lock()
        self._slots: list[CacheSlot] = []
        self._free: list[CacheSlot] = [self._new_slot()]  # the first at set-up: no allocation per request

    def _new_slot(self) -> CacheSlot:
        by_name = {s["name"]: self.memory.allocate(s) for s in self.vlm.outputs}
        if "state" in (s["name"] for s in self.per_slot):
            by_name["state"] = self.memory.allocate(next(s for s in self.per_slot if s["name"] == "state"))
        vlm_outputs = Dataset(self.acl, [by_name[s["name"]] for s in self.vlm.outputs])
        inputs = [by_name.get(s["name"]) or self.step_inputs[s["name"]] for s in self.expert.inputs]
        slot = CacheSlot(list(by_name.values()), vlm_outputs, Dataset(self.acl, inputs), by_name)
        self._slots.append(slot)
        return slot

    def _take_slot(self) -> CacheSlot:
        with self._lock:
            if self._free:
                return self._free.pop()
            if len(self._slots) >= self.max_live_caches:
                raise AclError(
                    f"all {self.max_live_caches} prefix caches this backend allows are in use; release one first"
                )
            return self._new_slot()

    def _give_back(self, slot: CacheSlot) -> None:
        with self._lock:
            if slot in self._slots and slot not in self._free:
                self._free.append(slot)

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

    def prefix(self, inputs: ModelInputs) -> AclPrefixCache:
        """Run the VLM into a free cache slot; the expert reads that slot's buffers directly."""
        # ACL contexts are per thread: the engine may run in another thread than the one that set up.
        _check(self.acl.rt.set_context(self.context), "acl.rt.set_context")
        slot = self._take_slot()
        try:
            for name, buffer in self.vlm_inputs.items():
                self._to_device(buffer, getattr(inputs, name))
            self.vlm.execute(self.vlm_input_set, slot.vlm_outputs)
        except AclError:
            self._give_back(slot)
            raise
        slot.state_sent = False
        return AclPrefixCache(self, slot)

    def velocity(self, cache: AclPrefixCache, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        slot = cache.slot
        if slot is None:
            raise AclError("this prefix cache was released")
        if not slot.state_sent and "state" in slot.by_name:  # the same for every step; pi0.5's expert takes none
            self._to_device(slot.by_name["state"], state)
            slot.state_sent = True
        values = {"x_t": x_t, "t": t}
        for name, buffer in self.step_inputs.items():
            self._to_device(buffer, values[name])
        self.expert.execute(slot.expert_inputs, self.expert_output_set)
        return self._to_host(self.velocity_out)

    def close(self) -> None:
        """Free everything, in the reverse order of creation (live handles then fail if used)."""
        acl = self.acl
        _check(acl.rt.set_context(self.context), "acl.rt.set_context")
        with self._lock:
            for slot in reversed(self._slots):
                slot.expert_inputs.close()
                slot.vlm_outputs.close()
            self._slots, self._free = [], []
        self.expert_output_set.close()
        self.vlm_input_set.close()
        self.memory.free(list(self.memory.buffers))
        self.expert.close()
        self.vlm.close()
        _check(acl.rt.destroy_stream(self.stream), "acl.rt.destroy_stream")
        _check(acl.rt.destroy_context(self.context), "acl.rt.destroy_context")
        _check(acl.rt.reset_device(self.device_id), "acl.rt.reset_device")
