"""Stand-in for pyACL (`import acl`), which only exists where CANN is installed.

It enforces the contract our backend relies on and fails the way ACL does (non-zero return codes):
init before anything and finalize last; a device set before a context; a current context in the
calling thread for memcpy and execute; memcpy kinds that match where the pointers live (host memory is
real memory, read and written through ctypes; device memory is ours) and sizes within bounds; datasets
holding exactly the model's tensors, each buffer big enough; frees of live pointers only. finalize
refuses (and records the leak) while anything is still allocated. `COUNTS` counts host<->device copies
and executions, for tests.

Faults, for the reliability tests: `PI0_ACL_STAND_IN_FAULT=error:N` makes the execute after N successful
ones return a device error (once); `hang:N` makes it block forever, as a wedged device would.

Models: an "OM file" here is what tests/stubs/atc.py writes; it names the ONNX graph it was compiled
from (and its sha256), which is run with onnxruntime.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import itertools
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

SUCCESS = 0
ERROR_INVALID_PARAM = 100000
ERROR_UNINITIALIZE = 100001
ERROR_REPEAT_INITIALIZE = 100002
ERROR_INVALID_FILE = 100003
ERROR_CONTEXT_NOT_SET = 107002
ERROR_RESOURCE_LEAK = 107100
ERROR_MODEL_INPUT = 148046
ERROR_RT_AICORE_EXCEPTION = 507015  # a fault on the device during execution

COUNTS: collections.Counter = collections.Counter()
LEAKS: list[str] = []


class _State:
    def __init__(self) -> None:
        self.initialized = False
        self.finalized = False  # ACL allows one init per process
        self.devices: set[int] = set()
        self.contexts: dict[int, int] = {}
        self.streams: set[int] = set()
        self.memory: dict[int, bytearray] = {}
        self.data_buffers: dict[int, tuple[int, int]] = {}
        self.datasets: dict[int, list[int]] = {}
        self.models: dict[int, ort.InferenceSession] = {}
        self.descs: dict[int, int | None] = {}
        self.local = threading.local()
        self.handles = itertools.count(0x1000)
        self.addresses = itertools.count(0x7F00_0000_0000, 0x1_0000_0000)


_S = _State()


def reset() -> None:
    """For tests: forget everything (as a new process would)."""
    global _S
    _S = _State()
    COUNTS.clear()
    LEAKS.clear()


def _live() -> bool:
    return _S.initialized


def _current_context() -> int | None:
    return getattr(_S.local, "context", None)


# --- top level -------------------------------------------------------------------------------------


def init(config_path: str | None = None) -> int:
    if _S.initialized or _S.finalized:
        return ERROR_REPEAT_INITIALIZE
    _S.initialized = True
    return SUCCESS


def finalize() -> int:
    if not _live():
        return ERROR_UNINITIALIZE
    leaks = [
        f"{len(v)} {name}"
        for name, v in (
            ("device allocations", _S.memory),
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
    if leaks:
        LEAKS.extend(leaks)
        return ERROR_RESOURCE_LEAK
    _S.initialized = False
    _S.finalized = True
    return SUCCESS


def create_data_buffer(ptr: int, size: int) -> int:
    handle = next(_S.handles)
    _S.data_buffers[handle] = (ptr, size)
    return handle


def destroy_data_buffer(handle: int) -> int:
    if _S.data_buffers.pop(handle, None) is None:
        return ERROR_INVALID_PARAM
    return SUCCESS


# --- rt --------------------------------------------------------------------------------------------


def _set_device(device_id: int) -> int:
    if not _live():
        return ERROR_UNINITIALIZE
    _S.devices.add(device_id)
    return SUCCESS


def _reset_device(device_id: int) -> int:
    if device_id not in _S.devices or any(d == device_id for d in _S.contexts.values()):
        return ERROR_INVALID_PARAM
    _S.devices.discard(device_id)
    return SUCCESS


def _create_context(device_id: int) -> tuple[int, int]:
    if device_id not in _S.devices:
        return 0, ERROR_INVALID_PARAM
    handle = next(_S.handles)
    _S.contexts[handle] = device_id
    _S.local.context = handle
    return handle, SUCCESS


def _set_context(context: int) -> int:
    if context not in _S.contexts:
        return ERROR_INVALID_PARAM
    _S.local.context = context
    return SUCCESS


def _destroy_context(context: int) -> int:
    if _S.contexts.pop(context, None) is None:
        return ERROR_INVALID_PARAM
    if _current_context() == context:
        _S.local.context = None
    return SUCCESS


def _create_stream() -> tuple[int, int]:
    if _current_context() is None:
        return 0, ERROR_CONTEXT_NOT_SET
    handle = next(_S.handles)
    _S.streams.add(handle)
    return handle, SUCCESS


def _destroy_stream(stream: int) -> int:
    if stream not in _S.streams:
        return ERROR_INVALID_PARAM
    _S.streams.discard(stream)
    return SUCCESS


def _malloc(size: int, policy: int) -> tuple[int, int]:
    if _current_context() is None:
        return 0, ERROR_CONTEXT_NOT_SET
    if size <= 0 or policy not in (0, 1, 2):
        return 0, ERROR_INVALID_PARAM
    ptr = next(_S.addresses)
    _S.memory[ptr] = bytearray(size)
    COUNTS["malloc"] += 1
    return ptr, SUCCESS


def _free(ptr: int) -> int:
    if _S.memory.pop(ptr, None) is None:
        return ERROR_INVALID_PARAM
    return SUCCESS


def _memcpy(dst: int, dst_max: int, src: int, count: int, kind: int) -> int:
    if _current_context() is None:
        return ERROR_CONTEXT_NOT_SET
    if count > dst_max or count < 0:
        return ERROR_INVALID_PARAM
    if kind == 1:  # host -> device
        if dst not in _S.memory or src in _S.memory or count > len(_S.memory[dst]):
            return ERROR_INVALID_PARAM
        _S.memory[dst][:count] = ctypes.string_at(src, count)
        COUNTS["H2D"] += 1
        COUNTS["H2D_bytes"] += count
    elif kind == 2:  # device -> host
        if src not in _S.memory or dst in _S.memory or count > len(_S.memory[src]):
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


rt = SimpleNamespace(
    set_device=_set_device,
    reset_device=_reset_device,
    create_context=_create_context,
    set_context=_set_context,
    destroy_context=_destroy_context,
    create_stream=_create_stream,
    destroy_stream=_destroy_stream,
    malloc=_malloc,
    free=_free,
    memcpy=_memcpy,
)


# --- mdl -------------------------------------------------------------------------------------------


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
    return model_id, SUCCESS


def _unload(model_id: int) -> int:
    if _S.models.pop(model_id, None) is None:
        return ERROR_INVALID_PARAM
    return SUCCESS


def _create_desc() -> int:
    handle = next(_S.handles)
    _S.descs[handle] = None
    return handle


def _get_desc(desc: int, model_id: int) -> int:
    if desc not in _S.descs or model_id not in _S.models:
        return ERROR_INVALID_PARAM
    _S.descs[desc] = model_id
    return SUCCESS


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
    session = _S.models[_S.descs[desc]]
    return session.get_outputs() if outputs else session.get_inputs()


def _size(desc: int, index: int, outputs: bool) -> int:
    t = _tensors(desc, outputs)[index]
    return int(np.prod(t.shape)) * np.dtype(_NP[t.type]).itemsize


def _create_dataset() -> int:
    handle = next(_S.handles)
    _S.datasets[handle] = []
    return handle


def _destroy_dataset(dataset: int) -> int:
    if _S.datasets.pop(dataset, None) is None:
        return ERROR_INVALID_PARAM
    return SUCCESS


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
    return SUCCESS


mdl = SimpleNamespace(
    load_from_file=_load_from_file,
    unload=_unload,
    create_desc=_create_desc,
    get_desc=_get_desc,
    destroy_desc=_destroy_desc,
    get_num_inputs=lambda desc: len(_tensors(desc, False)),
    get_num_outputs=lambda desc: len(_tensors(desc, True)),
    get_input_size_by_index=lambda desc, i: _size(desc, i, False),
    get_output_size_by_index=lambda desc, i: _size(desc, i, True),
    get_input_name_by_index=lambda desc, i: _tensors(desc, False)[i].name,
    get_output_name_by_index=lambda desc, i: _tensors(desc, True)[i].name,
    create_dataset=_create_dataset,
    destroy_dataset=_destroy_dataset,
    add_dataset_buffer=_add_dataset_buffer,
    execute=_execute,
)

util = SimpleNamespace(numpy_to_ptr=lambda array: array.ctypes.data)
