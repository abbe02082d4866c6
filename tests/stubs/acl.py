"""Stand-in for pyACL (`import acl`), which only exists where CANN is installed.

It enforces the contract our backend relies on, as CANN documents it (docs/cann-facts.md), and fails the
way ACL does (non-zero return codes): init before anything and finalize last; a device set before a
context; a current context in the calling thread for memcpy and execute; memcpy kinds that match where
the pointers live (host memory is real memory, read and written through ctypes; device memory is ours)
and sizes within bounds; datasets holding exactly the model's tensors, each buffer big enough; frees of
live pointers only, each kind by its own call (acl.rt.free for acl.rt.malloc, acl.rt.free_host for
acl.rt.malloc_host). finalize refuses (and records the leak in `LEAKS`) while anything is still held;
`held()` says what is. `COUNTS` counts host<->device copies and executions, `CALLED` every API call by
name, for tests.

Host pointers (cann-facts §4): `acl.util.bytes_to_ptr(data)` gives the address of a bytes object's own
buffer (the bytes must outlive the pointer), `acl.util.ptr_to_bytes(ptr, size)` copies host memory into
a new bytes object; `acl.util.numpy_to_ptr` still works but warns that it will be deprecated, as
pyACL does. A device->host copy into a bytes object's buffer is refused: bytes are immutable (pyACL
would write into them regardless; the result is undefined).

Model I/O names (cann-facts §1): `acl.mdl.get_input_name_by_index` gives the ONNX graph's input name;
`acl.mdl.get_output_name_by_index` gives `<producing op>:<its output index>:<output name>`, what ATC
returns for an ONNX model built without --out_nodes, computed from the ONNX graph. With
PI0_ACL_STAND_IN_OUTPUT_NAMES=fused (or `OUTPUT_NAMES = "fused"`) it gives `FusedOp_<n>:<edge>`
instead, as for a model built with --out_nodes whose output ops graph fusion renamed: no output name
at all. `get_*_index_by_name` compare whole strings, as ACL's model.cpp does.

Faults, for the reliability tests: `PI0_ACL_STAND_IN_FAULT=error:N` makes the execute after N successful
ones return a device error (once); `hang:N` makes it block forever, as a wedged device would.
`PI0_ACL_STAND_IN_FAIL_AT=acl.rt.create_stream` (or `FAIL_AT = ...`; `acl.rt.malloc#3` for the third
call) makes that API call fail: an error code where it returns one, a null handle (0) where it returns a
handle, 0 / "" / -1 from the description getters.

Models: an "OM file" here is what tests/stubs/atc.py writes; it names the ONNX graph it was compiled
from (and its sha256), which is run with onnxruntime.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import itertools
import os
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort

SUCCESS = 0
ERROR_INVALID_PARAM = 100000
ERROR_UNINITIALIZE = 100001
ERROR_REPEAT_INITIALIZE = 100002
ERROR_INVALID_FILE = 100003
ERROR_CONTEXT_NOT_SET = 107002
ERROR_RESOURCE_LEAK = 107100
ERROR_MODEL_INPUT = 148046
ERROR_BAD_ALLOC = 200000  # ACL_ERROR_BAD_ALLOC: what an injected failure (FAIL_AT) returns
ERROR_RT_AICORE_EXCEPTION = 507015  # ACL_ERROR_RT_AICORE_EXCEPTION: a fault on the device during execution

# aclDataType (pyACL get_input_data_type / get_output_data_type; CANN 6.0.1 aclpythondevg_01_0181)
ACL_DT_UNDEFINED = -1
_ACL_DTYPES = {
    "tensor(float)": 0,
    "tensor(float16)": 1,
    "tensor(int8)": 2,
    "tensor(int32)": 3,
    "tensor(uint8)": 4,
    "tensor(int16)": 6,
    "tensor(uint16)": 7,
    "tensor(uint32)": 8,
    "tensor(int64)": 9,
    "tensor(uint64)": 10,
    "tensor(double)": 11,
    "tensor(bool)": 12,
}

COUNTS: collections.Counter = collections.Counter()
CALLED: collections.Counter = collections.Counter()
LEAKS: list[str] = []
FAIL_AT: str | None = None  # None: PI0_ACL_STAND_IN_FAIL_AT
OUTPUT_NAMES: str | None = None  # "documented" or "fused"; None: PI0_ACL_STAND_IN_OUTPUT_NAMES (default documented)
DEPRECATED_NUMPY_TO_PTR = "acl.util.numpy_to_ptr will be deprecated. Please use acl.util.bytes_to_ptr instead."


class _State:
    def __init__(self) -> None:
        self.initialized = False
        self.finalized = False  # ACL allows one init per process
        self.devices: set[int] = set()
        self.contexts: dict[int, int] = {}
        self.streams: set[int] = set()
        self.memory: dict[int, bytearray] = {}  # device memory
        self.host_memory: dict[int, ctypes.Array] = {}  # acl.rt.malloc_host's (pinned host memory)
        self.bytes_pointers: dict[int, int] = {}  # acl.util.bytes_to_ptr's: address -> the bytes' length
        self.data_buffers: dict[int, tuple[int, int]] = {}
        self.datasets: dict[int, list[int]] = {}
        self.models: dict[int, ort.InferenceSession] = {}
        self.output_names: dict[int, list[str]] = {}  # per model: what get_output_name_by_index returns
        self.graph_names: dict[int, str] = {}  # per model: the graph it was compiled from (for the ledger)
        self.descs: dict[int, int | None] = {}
        self.local = threading.local()
        self.handles = itertools.count(0x1000)
        self.addresses = itertools.count(0x7F00_0000_0000, 0x1_0000_0000)


_S = _State()


def get_soc_name() -> str:
    """`acl.get_soc_name()`: the chip's version name (docs: "Ascend310P*" on a 310P); the same chip as the
    npu-smi stand-in reports (STANDIN_NPU_CHIP, 310P3 by default)."""
    return "Ascend" + os.environ.get("STANDIN_NPU_CHIP", "310P3")


def reset() -> None:
    """For tests: forget everything (as a new process would), faults and name mode included."""
    global _S, FAIL_AT, OUTPUT_NAMES
    _S = _State()
    COUNTS.clear()
    CALLED.clear()
    LEAKS.clear()
    FAIL_AT = None
    OUTPUT_NAMES = None


def held() -> list[str]:
    """What is still allocated or open, by kind ("2 device allocations", ...); [] when nothing is."""
    return [
        f"{len(v)} {name}"
        for name, v in (
            ("device allocations", _S.memory),
            ("host allocations", _S.host_memory),
            ("data buffers", _S.data_buffers),
            ("datasets", _S.datasets),
            ("models", _S.models),
            ("model descriptions", _S.descs),
            ("streams", _S.streams),
            ("contexts", _S.contexts),
            ("devices", _S.devices),
        )
        if v
    ]


def _live() -> bool:
    return _S.initialized


def _current_context() -> int | None:
    return getattr(_S.local, "context", None)


def _fails(name: str) -> bool:
    target = FAIL_AT or os.environ.get("PI0_ACL_STAND_IN_FAIL_AT", "")
    call, _, nth = target.partition("#")
    return call == name and CALLED[name] == int(nth or 1)


def _api(name: str, failed: object) -> Callable:
    """An API call by its pyACL name: counted in CALLED; when FAIL_AT names it, returns `failed` instead
    (or `failed(*args)`, where the failure value depends on the arguments)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: object) -> object:
            CALLED[name] += 1
            if _fails(name):
                COUNTS["injected"] += 1
                return failed(*args) if callable(failed) else failed
            return fn(*args)

        return call

    return wrap


_ERR = ERROR_BAD_ALLOC
_NULL_ERR = (0, ERROR_BAD_ALLOC)


# --- top level -------------------------------------------------------------------------------------


@_api("acl.init", _ERR)
def init(config_path: str | None = None) -> int:
    if _S.initialized or _S.finalized:
        return ERROR_REPEAT_INITIALIZE
    _S.initialized = True
    return SUCCESS


def finalize() -> int:
    if not _live():
        return ERROR_UNINITIALIZE
    leaks = held()
    if leaks:
        LEAKS.extend(leaks)
        return ERROR_RESOURCE_LEAK
    _S.initialized = False
    _S.finalized = True
    return SUCCESS


@_api("acl.create_data_buffer", 0)
def create_data_buffer(ptr: int, size: int) -> int:
    handle = next(_S.handles)
    _S.data_buffers[handle] = (ptr, size)
    return handle


@_api("acl.destroy_data_buffer", _ERR)
def destroy_data_buffer(handle: int) -> int:
    if _S.data_buffers.pop(handle, None) is None:
        return ERROR_INVALID_PARAM
    return SUCCESS


# --- rt --------------------------------------------------------------------------------------------


@_api("acl.rt.set_device", _ERR)
def _set_device(device_id: int) -> int:
    if not _live():
        return ERROR_UNINITIALIZE
    _S.devices.add(device_id)
    return SUCCESS


@_api("acl.rt.reset_device", _ERR)
def _reset_device(device_id: int) -> int:
    if device_id not in _S.devices or any(d == device_id for d in _S.contexts.values()):
        return ERROR_INVALID_PARAM
    _S.devices.discard(device_id)
    return SUCCESS


@_api("acl.rt.create_context", _NULL_ERR)
def _create_context(device_id: int) -> tuple[int, int]:
    if device_id not in _S.devices:
        return 0, ERROR_INVALID_PARAM
    handle = next(_S.handles)
    _S.contexts[handle] = device_id
    _S.local.context = handle
    return handle, SUCCESS


@_api("acl.rt.set_context", _ERR)
def _set_context(context: int) -> int:
    if context not in _S.contexts:
        return ERROR_INVALID_PARAM
    _S.local.context = context
    return SUCCESS


@_api("acl.rt.destroy_context", _ERR)
def _destroy_context(context: int) -> int:
    if _S.contexts.pop(context, None) is None:
        return ERROR_INVALID_PARAM
    if _current_context() == context:
        _S.local.context = None
    return SUCCESS


@_api("acl.rt.create_stream", _NULL_ERR)
def _create_stream() -> tuple[int, int]:
    if _current_context() is None:
        return 0, ERROR_CONTEXT_NOT_SET
    handle = next(_S.handles)
    _S.streams.add(handle)
    return handle, SUCCESS


@_api("acl.rt.destroy_stream", _ERR)
def _destroy_stream(stream: int) -> int:
    if stream not in _S.streams:
        return ERROR_INVALID_PARAM
    _S.streams.discard(stream)
    return SUCCESS


@_api("acl.rt.malloc", _NULL_ERR)
def _malloc(size: int, policy: int) -> tuple[int, int]:
    if _current_context() is None:
        return 0, ERROR_CONTEXT_NOT_SET
    if size <= 0 or policy not in (0, 1, 2):
        return 0, ERROR_INVALID_PARAM
    ptr = next(_S.addresses)
    _S.memory[ptr] = bytearray(size)
    COUNTS["malloc"] += 1
    return ptr, SUCCESS


@_api("acl.rt.free", _ERR)
def _free(ptr: int) -> int:
    if _S.memory.pop(ptr, None) is None:  # a host pointer (malloc_host's) is refused too
        return ERROR_INVALID_PARAM
    return SUCCESS


@_api("acl.rt.malloc_host", _NULL_ERR)
def _malloc_host(size: int) -> tuple[int, int]:
    """Host memory ("锁页内存", page-locked), real here: a ctypes buffer; "size不能为0"."""
    if size <= 0:
        return 0, ERROR_INVALID_PARAM
    buffer = (ctypes.c_char * size)()
    ptr = ctypes.addressof(buffer)
    _S.host_memory[ptr] = buffer
    COUNTS["malloc_host"] += 1
    return ptr, SUCCESS


@_api("acl.rt.free_host", _ERR)
def _free_host(ptr: int) -> int:
    """Frees only what acl.rt.malloc_host allocated (aclrtFreeHost's documented restriction)."""
    if _S.host_memory.pop(ptr, None) is None:
        return ERROR_INVALID_PARAM
    return SUCCESS


def _host_room(ptr: int) -> int | None:
    """Bytes from `ptr` to the end of the malloc_host allocation holding it; None: not in one."""
    for base, buffer in _S.host_memory.items():
        if base <= ptr < base + len(buffer):
            return base + len(buffer) - ptr
    return None


def _on_device(ptr: int) -> bool:
    return any(base <= ptr < base + len(memory) for base, memory in _S.memory.items())


def _host_source_ok(src: int, count: int) -> bool:
    if _on_device(src):
        return False
    room = _host_room(src)
    if room is None:
        room = _S.bytes_pointers.get(src)
    return room is None or count <= room


def _host_destination_ok(dst: int, count: int) -> bool:
    if _on_device(dst):
        return False
    room = _host_room(dst)
    if room is not None:
        return count <= room
    return dst not in _S.bytes_pointers  # a bytes object's buffer is not writable


@_api("acl.rt.memcpy", _ERR)
def _memcpy(dst: int, dst_max: int, src: int, count: int, kind: int) -> int:
    if _current_context() is None:
        return ERROR_CONTEXT_NOT_SET
    if count > dst_max or count < 0:
        return ERROR_INVALID_PARAM
    if kind == 1:  # host -> device
        if dst not in _S.memory or not _host_source_ok(src, count) or count > len(_S.memory[dst]):
            return ERROR_INVALID_PARAM
        _S.memory[dst][:count] = ctypes.string_at(src, count)
        COUNTS["H2D"] += 1
        COUNTS["H2D_bytes"] += count
    elif kind == 2:  # device -> host
        if src not in _S.memory or not _host_destination_ok(dst, count) or count > len(_S.memory[src]):
            return ERROR_INVALID_PARAM
        ctypes.memmove(dst, bytes(_S.memory[src][:count]), count)
        COUNTS["D2H"] += 1
        COUNTS["D2H_bytes"] += count
    elif kind == 3:  # device -> device
        if src not in _S.memory or dst not in _S.memory:
            return ERROR_INVALID_PARAM
        _S.memory[dst][:count] = _S.memory[src][:count]
        COUNTS["D2D"] += 1
    else:
        return ERROR_INVALID_PARAM
    return SUCCESS


# What the device offers the application (`acl.rt.get_mem_info`'s total: all of it but the system's reserve).
DEVICE_MEMORY_TOTAL = 21 * 2**30


@_api("acl.rt.get_mem_info", (0, 0, ERROR_BAD_ALLOC))
def _get_mem_info(attr: int) -> tuple[int, int, int]:
    """free, total, ret (cann-facts §9): a device must be set first (this thread's context); a 310P has no
    HBM, so an HBM attribute is answered with the DDR's; the P2P attributes (6-9) are reserved: 0 and 0."""
    if _current_context() is None:
        return 0, 0, ERROR_CONTEXT_NOT_SET
    if attr not in range(10):
        return 0, 0, ERROR_INVALID_PARAM
    if attr >= 6:
        return 0, 0, SUCCESS
    used = sum(len(block) for block in _S.memory.values())
    return DEVICE_MEMORY_TOTAL - used, DEVICE_MEMORY_TOTAL, SUCCESS


rt = SimpleNamespace(
    get_mem_info=_get_mem_info,
    set_device=_set_device,
    reset_device=_reset_device,
    create_context=_create_context,
    set_context=_set_context,
    destroy_context=_destroy_context,
    create_stream=_create_stream,
    destroy_stream=_destroy_stream,
    malloc=_malloc,
    free=_free,
    malloc_host=_malloc_host,
    free_host=_free_host,
    memcpy=_memcpy,
)


# --- mdl -------------------------------------------------------------------------------------------


def _om_output_names(onnx_path: Path) -> list[str]:
    """What ATC's model reports for each graph output (cann-facts §1): `op:edge:name` from the ONNX
    graph's producing nodes, or, in the fused mode, `FusedOp_<n>:<edge>` with no output name."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {
        out: (node.name or f"{node.op_type}_{i}", k)
        for i, node in enumerate(graph.node)
        for k, out in enumerate(node.output)
    }
    fused = (OUTPUT_NAMES or os.environ.get("PI0_ACL_STAND_IN_OUTPUT_NAMES", "documented")) == "fused"
    names = []
    for index, output in enumerate(graph.output):
        op, edge = producer.get(output.name, (output.name, 0))  # a graph input passed through: its Data op
        names.append(f"FusedOp_{700 + index}:{edge}" if fused else f"{op}:{edge}:{output.name}")
    return names


@_api("acl.mdl.load_from_file", _NULL_ERR)
def _load_from_file(path: str) -> tuple[int, int]:
    if _current_context() is None:
        return 0, ERROR_CONTEXT_NOT_SET
    om = Path(path)
    if not om.is_file():
        return 0, ERROR_INVALID_FILE
    match = re.match(r"ATC-STANDIN soc=(\S+) model=(\S+) sha256=(\w+)", om.read_text())
    onnx_path = om.parent.parent / match.group(2) if match else None
    if (
        onnx_path is None
        or not onnx_path.is_file()
        or hashlib.sha256(onnx_path.read_bytes()).hexdigest() != match.group(3)
    ):
        return 0, ERROR_INVALID_FILE
    model_id = next(_S.handles)
    _S.models[model_id] = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    _S.output_names[model_id] = _om_output_names(onnx_path)
    _S.graph_names[model_id] = onnx_path.stem  # the ledger counts executions per graph too
    return model_id, SUCCESS


@_api("acl.mdl.unload", _ERR)
def _unload(model_id: int) -> int:
    if _S.models.pop(model_id, None) is None:
        return ERROR_INVALID_PARAM
    _S.output_names.pop(model_id, None)
    return SUCCESS


@_api("acl.mdl.create_desc", 0)
def _create_desc() -> int:
    handle = next(_S.handles)
    _S.descs[handle] = None
    return handle


@_api("acl.mdl.get_desc", _ERR)
def _get_desc(desc: int, model_id: int) -> int:
    if desc not in _S.descs or model_id not in _S.models:
        return ERROR_INVALID_PARAM
    _S.descs[desc] = model_id
    return SUCCESS


@_api("acl.mdl.destroy_desc", _ERR)
def _destroy_desc(desc: int) -> int:
    if desc not in _S.descs:
        return ERROR_INVALID_PARAM
    del _S.descs[desc]
    return SUCCESS


_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.uint8,
    "tensor(uint8)": np.uint8,
}


def _tensors(desc: int, outputs: bool) -> list:
    model = _S.descs.get(desc)
    if model not in _S.models:  # not described (get_desc not called), or its model unloaded
        return []
    session = _S.models[model]
    return session.get_outputs() if outputs else session.get_inputs()


def _tensor(desc: int, index: int, outputs: bool) -> object | None:
    tensors = _tensors(desc, outputs)
    return tensors[index] if 0 <= index < len(tensors) else None


def _size(desc: int, index: int, outputs: bool) -> int:
    t = _tensor(desc, index, outputs)
    return 0 if t is None else int(np.prod(t.shape)) * np.dtype(_NP[t.type]).itemsize


def _name(desc: int, index: int, outputs: bool) -> str:
    t = _tensor(desc, index, outputs)
    if t is None:
        return ""
    return _S.output_names[_S.descs[desc]][index] if outputs else t.name


def _data_type(desc: int, index: int, outputs: bool) -> int:
    t = _tensor(desc, index, outputs)
    return ACL_DT_UNDEFINED if t is None else _ACL_DTYPES.get(t.type, ACL_DT_UNDEFINED)


def _dims(desc: int, index: int, outputs: bool) -> tuple[dict, int]:
    """pyACL's `dims, ret = acl.mdl.get_output_dims(desc, i)`: {"name", "dimCount", "dims"} (aclpythondevg_01_0203)."""
    t = _tensor(desc, index, outputs)
    if t is None:
        return {}, ERROR_INVALID_PARAM
    shape = [int(d) for d in t.shape]
    return {"name": _name(desc, index, outputs), "dimCount": len(shape), "dims": shape}, SUCCESS


def _index_by_name(desc: int, name: str, outputs: bool) -> tuple[int, int]:
    """Exact whole-string compare (ACL's model.cpp: `desc[i].name == tensorName`), else ACL_ERROR_INVALID_PARAM."""
    for index in range(len(_tensors(desc, outputs))):
        if _name(desc, index, outputs) == name:
            return index, SUCCESS
    return -1, ERROR_INVALID_PARAM


@_api("acl.mdl.create_dataset", 0)
def _create_dataset() -> int:
    handle = next(_S.handles)
    _S.datasets[handle] = []
    return handle


@_api("acl.mdl.destroy_dataset", _ERR)
def _destroy_dataset(dataset: int) -> int:
    if _S.datasets.pop(dataset, None) is None:
        return ERROR_INVALID_PARAM
    return SUCCESS


@_api("acl.mdl.add_dataset_buffer", lambda dataset, data_buffer: (dataset, ERROR_BAD_ALLOC))
def _add_dataset_buffer(dataset: int, data_buffer: int) -> tuple[int, int]:
    if dataset not in _S.datasets or data_buffer not in _S.data_buffers:
        return dataset, ERROR_INVALID_PARAM
    _S.datasets[dataset].append(data_buffer)
    return dataset, SUCCESS


def _injected_fault() -> int:
    kind, _, after = os.environ.get("PI0_ACL_STAND_IN_FAULT", "").partition(":")
    if not kind or COUNTS["execute"] != int(after) or COUNTS["faults"]:
        return SUCCESS
    COUNTS["faults"] += 1
    if kind == "hang":
        threading.Event().wait()
    return ERROR_RT_AICORE_EXCEPTION


@_api("acl.mdl.execute", _ERR)
def _execute(model_id: int, inputs: int, outputs: int) -> int:
    if _current_context() is None:
        return ERROR_CONTEXT_NOT_SET
    if (fault := _injected_fault()) != SUCCESS:
        return fault
    if model_id not in _S.models or inputs not in _S.datasets or outputs not in _S.datasets:
        return ERROR_INVALID_PARAM
    session = _S.models[model_id]
    specs_in, specs_out = session.get_inputs(), session.get_outputs()
    if len(_S.datasets[inputs]) != len(specs_in) or len(_S.datasets[outputs]) != len(specs_out):
        return ERROR_MODEL_INPUT
    feeds = {}
    for spec, handle in zip(specs_in, _S.datasets[inputs], strict=True):
        ptr, size = _S.data_buffers[handle]
        dtype = np.dtype(_NP[spec.type])
        need = int(np.prod(spec.shape)) * dtype.itemsize
        if ptr not in _S.memory or size < need or len(_S.memory[ptr]) < need:
            return ERROR_MODEL_INPUT
        array = np.frombuffer(bytes(_S.memory[ptr][:need]), dtype=dtype).reshape(spec.shape)
        feeds[spec.name] = array.astype(bool) if spec.type == "tensor(bool)" else array
    results = session.run(None, feeds)
    for spec, handle, value in zip(specs_out, _S.datasets[outputs], results, strict=True):
        ptr, size = _S.data_buffers[handle]
        data = np.ascontiguousarray(value, dtype=_NP[spec.type]).tobytes()
        if ptr not in _S.memory or size < len(data):
            return ERROR_MODEL_INPUT
        _S.memory[ptr][: len(data)] = data
    COUNTS["execute"] += 1
    COUNTS[f"execute:{_S.graph_names[model_id]}"] += 1
    return SUCCESS


def _getter(name: str, failed: object, fn: Callable) -> Callable:
    return _api(name, failed)(fn)


mdl = SimpleNamespace(
    load_from_file=_load_from_file,
    unload=_unload,
    create_desc=_create_desc,
    get_desc=_get_desc,
    destroy_desc=_destroy_desc,
    get_num_inputs=_getter("acl.mdl.get_num_inputs", 0, lambda desc: len(_tensors(desc, False))),
    get_num_outputs=_getter("acl.mdl.get_num_outputs", 0, lambda desc: len(_tensors(desc, True))),
    get_input_size_by_index=_getter("acl.mdl.get_input_size_by_index", 0, lambda d, i: _size(d, i, False)),
    get_output_size_by_index=_getter("acl.mdl.get_output_size_by_index", 0, lambda d, i: _size(d, i, True)),
    get_input_name_by_index=_getter("acl.mdl.get_input_name_by_index", "", lambda d, i: _name(d, i, False)),
    get_output_name_by_index=_getter("acl.mdl.get_output_name_by_index", "", lambda d, i: _name(d, i, True)),
    get_input_data_type=_getter("acl.mdl.get_input_data_type", ACL_DT_UNDEFINED, lambda d, i: _data_type(d, i, False)),
    get_output_data_type=_getter("acl.mdl.get_output_data_type", ACL_DT_UNDEFINED, lambda d, i: _data_type(d, i, True)),
    get_input_dims=_getter("acl.mdl.get_input_dims", ({}, _ERR), lambda d, i: _dims(d, i, False)),
    get_output_dims=_getter("acl.mdl.get_output_dims", ({}, _ERR), lambda d, i: _dims(d, i, True)),
    get_input_index_by_name=_getter(
        "acl.mdl.get_input_index_by_name", (-1, _ERR), lambda d, n: _index_by_name(d, n, False)
    ),
    get_output_index_by_name=_getter(
        "acl.mdl.get_output_index_by_name", (-1, _ERR), lambda d, n: _index_by_name(d, n, True)
    ),
    create_dataset=_create_dataset,
    destroy_dataset=_destroy_dataset,
    add_dataset_buffer=_add_dataset_buffer,
    execute=_execute,
)


# --- util ------------------------------------------------------------------------------------------


def _bytes_to_ptr(data: bytes) -> int:
    """The address of `data`'s own buffer (no copy); valid while `data` lives (aclpythondevg_01_0055)."""
    if not isinstance(data, bytes):
        raise ValueError("needs an byte as argument")  # pyACL's bytes_convert.cpp
    ptr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    _S.bytes_pointers[ptr] = len(data)
    return ptr


def _ptr_to_bytes(ptr: int, size: int) -> bytes:
    """A new bytes object holding `size` bytes of host memory at `ptr` (aclpythondevg_01_0056)."""
    if _on_device(ptr):
        raise ValueError(f"acl.util.ptr_to_bytes: {ptr:#x} is device memory (pyACL would read garbage or crash)")
    room = _host_room(ptr)
    if room is not None and size > room:
        raise ValueError(f"acl.util.ptr_to_bytes: {size} bytes asked from a host allocation with {room} left")
    return ctypes.string_at(ptr, size)


def _numpy_to_ptr(array: np.ndarray) -> int:
    warnings.warn(DEPRECATED_NUMPY_TO_PTR, DeprecationWarning, stacklevel=2)
    return array.ctypes.data


util = SimpleNamespace(bytes_to_ptr=_bytes_to_ptr, ptr_to_bytes=_ptr_to_bytes, numpy_to_ptr=_numpy_to_ptr)
