"""The Ascend backend: the bundle's OM graphs through pyACL (`import acl`, shipped with CANN).

Refused up front: an fp32 bundle, unless `BackendOptions.allow_ai_cpu` (`serve --allow-ai-cpu`): the
310P's Cube has no float32, so every matmul of such a bundle would run on the AI CPU
(docs/cann-facts.md §3, §8).

Set-up: acl.init once per process (ACL allows no second init, so a backend rebuilt after a device
error reuses it; acl.finalize runs at exit), then device, context, stream; each model loaded and its
description checked against the manifest's lists of inputs and outputs. Inputs by name (the ONNX
graph's input names, which ATC keeps), size and data type, in order. Outputs as ATC names them
(cann-facts §1): `op:edge:output_name` for an ONNX model built without --out_nodes, matched to the
manifest by the trailing output name; `op:edge` with no output name (--out_nodes, the op possibly a
fused one), matched by index, checked by size, data type and dims (so two same-shaped outputs swapped
by ATC could not be told apart: nothing in the description says which is which). The OM's own output
order is what the datasets follow. Every graph of the bundle is loaded (guidance adds `expert_guided`
and, for a condition in the prompt, `vlm_guided`). Device buffers are allocated once: each VLM graph's
inputs and the experts' per-step inputs (x_t, t) and output are shared, and one pinned host buffer
(acl.rt.malloc_host) receives the velocity; each prefix cache has a `CacheSlot` of its own: its VLM
graph's output buffers, which are *the cache input buffers of every expert graph that reads them*
(the same device pointers in a VLM output dataset and an expert input dataset per reader, as the
manifest's shapes say: `runtime.backends.cache_readers`), and the request's constants (the state, the
guidance scale). So the cache never leaves the device, and several may be alive at once (up to
`BackendOptions.live_caches` per VLM graph, 2 by default): `prefix()` takes a free slot (allocating
one up to the limit, the first at set-up) and its handle gives it back when released or dropped. Per
request the VLM's inputs go host->device and the constants once; per step only x_t and t, and the
velocity comes back. Host memory goes to ACL as `acl.util.bytes_to_ptr` of a bytes object and
comes back through `acl.util.ptr_to_bytes` (numpy_to_ptr / ptr_to_numpy are deprecated, cann-facts §4).

Everything acquired is recorded with the call that releases it; close() releases it all in reverse
order (carrying on past a failed release, then naming every failure) and resets the device, and a
set-up that fails at any step releases what it had acquired before raising. So the daemon's rebuild
after a device error (close, then a new backend) starts from a device this process no longer holds.

Never run on a real 310P so far: it is tested against the stand-in `tests/stubs/acl.py`, which
enforces the API's documented contract (names, pointers, leaks) and computes through onnxruntime.
Not yet checked on a device: the exact output-name strings a real ATC build gives our graphs, the
data type codes it reports for bool inputs (ACL_BOOL expected; ACL_UINT8 is accepted too), and
that the OM keeps the ONNX graph's output order where names are missing.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from runtime.backends import BackendOptions, Capabilities, cache_readers, check_reads, expert_graph
from runtime.bundle.graphs import EXPERT, GUIDANCE_SCALE, PREFIX_CACHE, STEP_INPUTS, VLM, VLM_GRAPHS
from runtime.bundle.manifest import OM, Bundle
from runtime.errors import ApplianceError
from runtime.pipeline.model_io import ModelInputs

log = logging.getLogger(__name__)

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
# aclrtMemAttr: ACL_DDR_MEM, the DDR's huge and normal pages (a 310P has no HBM: CANN answers an HBM query
# with the DDR's, docs/cann-facts.md)
ACL_DDR_MEM = 0
# aclDataType, as acl.mdl.get_{input,output}_data_type return it (CANN 6.0.1 aclpythondevg_01_0181)
ACL_DTYPES: dict[int, np.dtype] = {
    code: np.dtype(name)
    for code, name in (
        (0, "float32"),
        (1, "float16"),
        (2, "int8"),
        (3, "int32"),
        (4, "uint8"),
        (6, "int16"),
        (7, "uint16"),
        (8, "uint32"),
        (9, "int64"),
        (10, "uint64"),
        (11, "float64"),
        (12, "bool"),
    )
}
_SAME_BYTES = {frozenset({np.dtype("bool"), np.dtype("uint8")})}  # what we write into either: 0 or 1
REQUEST_CONSTANTS = ("state", GUIDANCE_SCALE)  # expert inputs that stay the same for every step of a request


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


def _handle(handle: int, call: str) -> int:
    """A handle from a call that returns one (a null one, 0, when it failed)."""
    if not handle:
        raise AclError(f"{call} failed (it returned no handle)")
    return handle


class Held:
    """What the backend holds, each with the call that gives it back, released in reverse order."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Callable[[], int]]] = []

    def push(self, call: str, release: Callable[[], int]) -> None:
        self._items.append((call, release))

    def __len__(self) -> int:
        return len(self._items)

    def release_all(self) -> list[str]:
        """Release everything, the last acquired first, carrying on past failures -> the failures."""
        failures = []
        while self._items:
            call, release = self._items.pop()
            try:
                ret = release()
            except Exception as e:  # a release that raised: the others are still released
                failures.append(f"{call} raised {e!r}")
            else:
                if ret != 0:
                    failures.append(f"{call} failed with ACL error {ret}")
        return failures


@dataclass
class DeviceBuffer:
    name: str
    ptr: int
    size: int
    dtype: np.dtype
    shape: tuple[int, ...]


def _nbytes(spec: dict) -> int:
    return int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize


def _same_dtype(a: np.dtype | None, b: np.dtype) -> bool:
    return a == b or frozenset({a, b}) in _SAME_BYTES


def _spec_text(spec: dict) -> str:
    return f"{spec['name']!r} ({_nbytes(spec)} bytes, {np.dtype(spec['dtype'])}, shape {list(spec['shape'])})"


@dataclass(frozen=True)
class OmTensor:
    """One input or output as the OM model's description gives it."""

    index: int
    name: str
    size: int
    dtype: np.dtype | None  # None: a data type code this runtime does not know
    code: int

    def fits(self, spec: dict) -> bool:
        return self.size == _nbytes(spec) and _same_dtype(self.dtype, np.dtype(spec["dtype"]))

    def __str__(self) -> str:
        kind = self.dtype if self.dtype is not None else f"ACL data type {self.code}"
        return f"{self.name!r} ({self.size} bytes, {kind})"


def output_name(om_name: str) -> str | None:
    """The ONNX output name in an OM output's name: `op:edge:name` -> name; `op:edge` (ATC built with
    --out_nodes: no output name) -> None; anything else is taken whole."""
    parts = om_name.rsplit(":", 2)
    if len(parts) >= 2 and parts[-1].isdigit():
        return None
    if len(parts) == 3 and parts[1].isdigit():
        return parts[2]
    return om_name


def _names(om_name: str, spec_name: str) -> bool:
    """Whether an OM output's name is the manifest's output `spec_name`: the name itself, or
    `<op>:<edge>:<spec_name>` (the op's name may hold ':' too)."""
    return om_name == spec_name or re.fullmatch(rf".+:\d+:{re.escape(spec_name)}", om_name, re.DOTALL) is not None


class AclModel:
    """One OM model: loaded, its description read and matched to the manifest's inputs and outputs.
    What it acquires goes on `held` (released by the backend)."""

    def __init__(self, acl: Any, graph: str, path: str, io: dict[str, list[dict]], held: Held) -> None:
        self.acl = acl
        self.graph = graph
        model_id, ret = acl.mdl.load_from_file(path)
        _check(ret, f"acl.mdl.load_from_file({path})")
        self.model_id = model_id
        held.push("acl.mdl.unload", lambda: acl.mdl.unload(model_id))
        desc = _handle(acl.mdl.create_desc(), "acl.mdl.create_desc")
        held.push("acl.mdl.destroy_desc", lambda: acl.mdl.destroy_desc(desc))
        self.desc = desc
        _check(acl.mdl.get_desc(desc, model_id), "acl.mdl.get_desc")
        self.inputs = self._inputs(io["inputs"])
        self.outputs = self._outputs(io["outputs"])
        self.constants = tuple(s["name"] for s in self.inputs if s["name"] in REQUEST_CONSTANTS)

    def _tensor(self, index: int, outputs: bool) -> OmTensor:
        mdl, kind = self.acl.mdl, "output" if outputs else "input"
        name = getattr(mdl, f"get_{kind}_name_by_index")(self.desc, index)
        size = getattr(mdl, f"get_{kind}_size_by_index")(self.desc, index)
        code = getattr(mdl, f"get_{kind}_data_type")(self.desc, index)
        return OmTensor(index, name, size, ACL_DTYPES.get(code), code)

    def _count(self, outputs: bool, specs: list[dict]) -> int:
        kind = "outputs" if outputs else "inputs"
        count = getattr(self.acl.mdl, f"get_num_{kind}")(self.desc)
        if count != len(specs):
            names = [s["name"] for s in specs]
            raise AclError(
                f"the {self.graph} OM model has {count} {kind} where the manifest names {len(specs)}: {names}"
            )
        return count

    def _mismatch(self, t: OmTensor, kind: str, spec: dict, why: str = "") -> AclError:
        return AclError(
            f"{self.graph} OM {kind} {t.index} is {t}{why}; the manifest's {kind} {t.index} is {_spec_text(spec)}"
        )

    def _inputs(self, specs: list[dict]) -> list[dict]:
        """By index: the same name (the ONNX input's), size and data type."""
        for index in range(self._count(False, specs)):
            t, spec = self._tensor(index, False), specs[index]
            if t.name != spec["name"] or not t.fits(spec):
                raise self._mismatch(t, "input", spec)
        return list(specs)

    def _outputs(self, specs: list[dict]) -> list[dict]:
        """The manifest's outputs in the OM's order: by the output name where the OM's name carries one,
        else (no output name) by index, where size, data type and dims agree."""
        tensors = [self._tensor(index, True) for index in range(self._count(True, specs))]
        matched: list[dict | None] = [next((s for s in specs if _names(t.name, s["name"])), None) for t in tensors]
        by_name = {id(s) for s in matched if s is not None}
        for t in tensors:
            spec, own = matched[t.index], specs[t.index]
            if spec is None:
                if output_name(t.name) is not None:
                    listed = ", ".join(repr(s["name"]) for s in specs)
                    raise self._mismatch(t, "output", own, f", which names none of the manifest's outputs ({listed})")
                if id(own) in by_name:
                    raise self._mismatch(t, "output", own, ", with no output name, and another OM output is named that")
                dims, ret = self.acl.mdl.get_output_dims(self.desc, t.index)
                _check(ret, "acl.mdl.get_output_dims")
                if list(dims.get("dims", [])) != list(own["shape"]):
                    raise self._mismatch(
                        t, "output", own, f" of dims {list(dims.get('dims', []))}, with no output name"
                    )
                matched[t.index] = spec = own
            if not t.fits(spec):
                raise AclError(
                    f"{self.graph} OM output {t.index} is {t}; the manifest's output {spec['name']!r} is {_spec_text(spec)}"
                )
        if len({id(s) for s in matched}) != len(specs):
            twice = [s["name"] for s in specs if sum(m is s for m in matched) > 1]
            raise AclError(f"the {self.graph} OM model names the manifest's output(s) {twice} more than once")
        return [s for s in matched if s is not None]

    def execute(self, inputs: int, outputs: int) -> None:
        _check(self.acl.mdl.execute(self.model_id, inputs, outputs), f"acl.mdl.execute({self.graph})")


@dataclass
class CacheSlot:
    """One prefix cache's device memory: the outputs of the VLM graph that writes it (`writer`) and the
    request's constants (the state; guidance's scale), with the VLM output dataset that writes them and, per
    expert graph that reads this cache, its input dataset."""

    writer: str
    buffers: list[DeviceBuffer]
    vlm_outputs: int
    expert_inputs: dict[str, int]
    by_name: dict[str, DeviceBuffer] = field(default_factory=dict)
    sent: dict[str, float | None] = field(default_factory=dict)  # request constants on the device ("state": None)


class AclPrefixCache:
    """A live prefix cache: its slot, given back to the backend's pool on `release()` or when dropped."""

    def __init__(self, backend: AclBackend, slot: CacheSlot) -> None:
        self.slot: CacheSlot | None = slot
        self._finalizer = weakref.finalize(self, backend._give_back, slot)

    def release(self) -> None:
        self.slot = None
        self._finalizer()


def refuse_precision(bundle: Bundle, options: BackendOptions) -> None:
    """int8 bundles always (onnxruntime's int8 operators; the 310P's int8 path is CANN's AMCT, not these
    graphs), fp32 ones unless `allow_ai_cpu`."""
    if bundle.precision == "int8":
        raise AclError(
            "this bundle is int8, for the CPU (onnxruntime) backend only: its int8 operators are onnxruntime's, "
            "not the 310P's; serve it with --backend onnxruntime, or export --precision fp16 for the 310P"
        )
    if bundle.precision == "fp32" and not options.allow_ai_cpu:
        raise AclError(
            "this bundle is fp32: on the 310P every matmul would run on the AI CPU (its Cube has no float32), "
            "many times slower; export it with --precision fp16, or serve it anyway with --allow-ai-cpu "
            "(BackendOptions.allow_ai_cpu)"
        )


class AclBackend:
    name = "acl"
    capabilities: ClassVar[Capabilities] = Capabilities(
        artefact=OM, library="acl", weights_in_host_memory=False, max_live_caches=2
    )

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None) -> None:
        options = options or BackendOptions()
        refuse_precision(bundle, options)
        om = bundle.artefact(OM)
        if om is None:
            raise AclError("the acl backend needs OM files: this bundle was not compiled with atc")
        import acl  # lazily: only robots with CANN have it

        self.acl = acl
        self.device_id = options.device_id
        self.max_live_caches = options.live_caches or self.capabilities.max_live_caches
        self.context: int | None = None
        self._held = Held()
        self._lock = threading.Lock()
        self._slots: list[CacheSlot] = []
        self._free: list[CacheSlot] = []
        try:
            self._set_up(bundle, {name: str(path) for name, path in om.items()})
        except BaseException:
            for failure in self._release():
                log.warning("releasing after a failed ACL set-up: %s", failure)
            raise

    def _set_up(self, bundle: Bundle, om: dict[str, str]) -> None:
        acl, held = self.acl, self._held
        _init_once(acl)
        device = self.device_id
        _check(acl.rt.set_device(device), "acl.rt.set_device")
        held.push("acl.rt.reset_device", lambda: acl.rt.reset_device(device))
        context, ret = acl.rt.create_context(device)
        _check(ret, "acl.rt.create_context")
        self.context = context
        held.push("acl.rt.destroy_context", lambda: acl.rt.destroy_context(context))
        stream, ret = acl.rt.create_stream()
        _check(ret, "acl.rt.create_stream")
        self.stream = stream
        held.push("acl.rt.destroy_stream", lambda: acl.rt.destroy_stream(stream))
        graphs = bundle.graphs
        self.models = {
            name: AclModel(acl, name, om[name], {"inputs": graph.inputs, "outputs": graph.outputs}, held)
            for name, graph in graphs.items()
        }
        self.vlm, self.expert = self.models[VLM], self.models[EXPERT]
        self.readers = cache_readers({name: (m.inputs, m.outputs) for name, m in self.models.items()})
        provided = {f.name for f in fields(ModelInputs)}
        writers = [self.models[name] for name in VLM_GRAPHS if name in self.models]
        experts = [m for name, m in self.models.items() if name not in VLM_GRAPHS]
        unknown = [s["name"] for m in writers for s in m.inputs if s["name"] not in provided]
        # Per slot: the cache and the request's constants (state, guidance scale), sent once per request;
        # shared: each VLM graph's inputs, x_t and t, the velocity (the same shapes for every expert graph).
        shared_specs: dict[str, dict] = {}
        for model in experts:
            for spec in model.inputs:
                if spec["name"] in PREFIX_CACHE or spec["name"] in REQUEST_CONSTANTS:
                    continue
                if spec["name"] not in STEP_INPUTS:
                    unknown.append(spec["name"])
                elif shared_specs.setdefault(spec["name"], spec)["shape"] != spec["shape"]:
                    raise AclError(f"the expert graphs take {spec['name']} in different shapes")
        if unknown:
            raise AclError(f"the bundle's graphs take inputs this runtime does not provide: {unknown}")
        if len({_nbytes(m.outputs[0]) for m in experts}) != 1:
            raise AclError("the expert graphs' velocities differ in size")
        self.vlm_inputs = {m.graph: {s["name"]: self._malloc(s) for s in m.inputs} for m in writers}
        self.step_inputs = {name: self._malloc(spec) for name, spec in shared_specs.items()}
        self.velocity_out = self._malloc(self.expert.outputs[0])
        host, ret = acl.rt.malloc_host(self.velocity_out.size)  # pinned: the velocity comes back every step
        _check(ret, "acl.rt.malloc_host")
        held.push("acl.rt.free_host", lambda: acl.rt.free_host(host))
        self.velocity_host = host
        self.vlm_input_sets = {graph: self._dataset(list(b.values())) for graph, b in self.vlm_inputs.items()}
        self.expert_output_set = self._dataset([self.velocity_out])
        self._free.append(self._new_slot(VLM))  # the first at set-up: no allocation for an unguided request

    def _malloc(self, spec: dict) -> DeviceBuffer:
        acl, size = self.acl, _nbytes(spec)
        ptr, ret = acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
        _check(ret, "acl.rt.malloc")
        self._held.push("acl.rt.free", lambda: acl.rt.free(ptr))
        return DeviceBuffer(spec["name"], ptr, size, np.dtype(spec["dtype"]), tuple(spec["shape"]))

    def _dataset(self, buffers: list[DeviceBuffer]) -> int:
        """An ACL dataset over device buffers, in a model's tensor order (its own data buffers)."""
        acl, held = self.acl, self._held
        dataset = _handle(acl.mdl.create_dataset(), "acl.mdl.create_dataset")
        held.push("acl.mdl.destroy_dataset", lambda: acl.mdl.destroy_dataset(dataset))
        for buffer in buffers:
            data_buffer = _handle(acl.create_data_buffer(buffer.ptr, buffer.size), "acl.create_data_buffer")
            held.push("acl.destroy_data_buffer", lambda b=data_buffer: acl.destroy_data_buffer(b))
            _, ret = acl.mdl.add_dataset_buffer(dataset, data_buffer)
            _check(ret, "acl.mdl.add_dataset_buffer")
        return dataset

    def _new_slot(self, writer: str) -> CacheSlot:
        by_name = {s["name"]: self._malloc(s) for s in self.models[writer].outputs}
        readers = [self.models[name] for name in self.readers[writer]]
        for spec in (s for m in readers for s in m.inputs if s["name"] in REQUEST_CONSTANTS):
            if spec["name"] not in by_name:
                by_name[spec["name"]] = self._malloc(spec)
        vlm_outputs = self._dataset([by_name[s["name"]] for s in self.models[writer].outputs])
        inputs = {
            m.graph: self._dataset([by_name.get(s["name"]) or self.step_inputs[s["name"]] for s in m.inputs])
            for m in readers
        }
        slot = CacheSlot(writer, list(by_name.values()), vlm_outputs, inputs, by_name)
        self._slots.append(slot)
        return slot

    def _take_slot(self, writer: str) -> CacheSlot:
        """A free slot of the `writer` VLM graph's caches, allocating one up to the limit (per VLM graph)."""
        with self._lock:
            free = next((slot for slot in self._free if slot.writer == writer), None)
            if free is not None:
                self._free.remove(free)
                return free
            if sum(slot.writer == writer for slot in self._slots) >= self.max_live_caches:
                raise AclError(
                    f"all {self.max_live_caches} prefix caches of the {writer} graph this backend allows are in use; "
                    "release one first"
                )
            return self._new_slot(writer)

    def _give_back(self, slot: CacheSlot) -> None:
        with self._lock:
            if slot in self._slots and slot not in self._free:
                self._free.append(slot)

    def _to_device(self, buffer: DeviceBuffer, value: np.ndarray) -> None:
        data = np.ascontiguousarray(value, dtype=buffer.dtype).reshape(buffer.shape).tobytes()
        # `data` outlives the pointer: bytes_to_ptr's documented condition (the copy is synchronous)
        ptr = self.acl.util.bytes_to_ptr(data)
        ret = self.acl.rt.memcpy(buffer.ptr, buffer.size, ptr, len(data), ACL_MEMCPY_HOST_TO_DEVICE)
        _check(ret, f"acl.rt.memcpy(H2D {buffer.name})")

    def _to_host(self, buffer: DeviceBuffer) -> np.ndarray:
        host = self.velocity_host  # a bytes object cannot be written into: the pinned buffer takes the copy
        ret = self.acl.rt.memcpy(host, buffer.size, buffer.ptr, buffer.size, ACL_MEMCPY_DEVICE_TO_HOST)
        _check(ret, f"acl.rt.memcpy(D2H {buffer.name})")
        data = self.acl.util.ptr_to_bytes(host, buffer.size)
        return np.frombuffer(data, dtype=buffer.dtype).reshape(buffer.shape).copy()  # writable, like any result

    def prefix(self, inputs: ModelInputs, graph: str = VLM) -> AclPrefixCache:
        """Run a VLM graph into a free cache slot; the expert graphs read that slot's buffers directly."""
        if graph not in self.vlm_inputs:
            raise AclError(f"this bundle has no {graph} graph")
        # ACL contexts are per thread: the engine may run in another thread than the one that set up.
        _check(self.acl.rt.set_context(self.context), "acl.rt.set_context")
        slot = self._take_slot(graph)
        try:
            for name, buffer in self.vlm_inputs[graph].items():
                self._to_device(buffer, getattr(inputs, name))
            self.models[graph].execute(self.vlm_input_sets[graph], slot.vlm_outputs)
        except AclError:
            self._give_back(slot)
            raise
        slot.sent = {}
        return AclPrefixCache(self, slot)

    def velocity(
        self,
        cache: AclPrefixCache,
        state: np.ndarray,
        x_t: np.ndarray,
        t: np.ndarray,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        slot = cache.slot
        if slot is None:
            raise AclError("this prefix cache was released")
        graph = expert_graph(guidance_scale)
        check_reads(self.readers, slot.writer, graph)
        # The request's constants go once (pi0.5's expert takes no state); the scale again if it changes.
        for name in self.models[graph].constants:
            key = None if name == "state" else guidance_scale
            if slot.sent.get(name, ...) != key:
                self._to_device(slot.by_name[name], state if name == "state" else np.array([guidance_scale]))
                slot.sent[name] = key
        values = {"x_t": x_t, "t": t}
        for name, buffer in self.step_inputs.items():
            self._to_device(buffer, values[name])
        self.models[graph].execute(slot.expert_inputs[graph], self.expert_output_set)
        return self._to_host(self.velocity_out)

    def device_memory(self) -> tuple[int, int]:
        """(used, total) bytes of the device's DDR as `acl.rt.get_mem_info` reports them (total excludes
        what the system reserves)."""
        _check(self.acl.rt.set_context(self.context), "acl.rt.set_context")
        free, total, ret = self.acl.rt.get_mem_info(ACL_DDR_MEM)
        _check(ret, "acl.rt.get_mem_info")
        return total - free, total

    def _release(self) -> list[str]:
        """Release everything held, in reverse order, in this thread's context -> what failed."""
        with self._lock:
            self._slots, self._free = [], []
        failures = []
        if self.context is not None and len(self._held):
            ret = self.acl.rt.set_context(self.context)
            if ret != 0:
                failures.append(f"acl.rt.set_context failed with ACL error {ret}")
        failures += self._held.release_all()
        self.context = None
        return failures

    def close(self) -> None:
        """Free everything, in the reverse order of creation (live handles then fail if used); a failed
        release does not stop the others, and is reported after them. A second close does nothing."""
        failures = self._release()
        if failures:
            raise AclError("closing the ACL backend: " + "; ".join(failures))
