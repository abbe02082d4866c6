"""The daemon's wire protocol, version 1 (docs/protocol.md): a msgpack header frame, then one raw frame
per array. Imported by the server and by the client, so both ends agree by construction.

Every declared array is checked against its frame (dtype allowed, shape sane, byte count equal)
before anything is built from it, and arrays are views of the received frames (no copy).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pi0_client import wire

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAME_BYTES = 64 * 2**20
MAX_ARRAYS = 16
MAX_NDIM = 8
DTYPES = ("uint8", "bool", "int32", "int64", "float16", "float32", "float64")
KINDS = ("infer", "metadata", "stats", "ping")


class ProtocolError(Exception):
    """A request or reply we refuse; `code` is machine-readable, the message says what was expected."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _buffer(frame: Any) -> memoryview:
    """The bytes of a frame (a zmq.Frame, bytes, or a contiguous array), as a flat memoryview."""
    view = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


# An observation's fields on the wire (LeRobot's feature names): the header carries the prompt and the
# seed, everything else is an array. runtime.pipeline.observation builds its one Observation type from these.
IMAGE_PREFIX = "observation.images."
STATE = "observation.state"
TOKENS = "lang_tokens"
TOKEN_MASK = "lang_masks"
NOISE = "noise"
PROMPT = "prompt"
SEED = "seed"
# Real-time chunking (docs/protocol.md): the previous chunk's actions not yet executed, and how many of
# them the robot executes while this request is computed.
PREV_ACTIONS = "prev_actions"
DELAY = "delay"
# Classifier-free guidance's beta for this request (a bundle exported with guidance; docs/guidance.md).
GUIDANCE_SCALE = "guidance_scale"
HEADER_FIELDS = (PROMPT, SEED, DELAY, GUIDANCE_SCALE)


def split_observation(obs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A client-side observation dict -> (header fields, arrays by name)."""
    header = {k: v for k, v in obs.items() if k in HEADER_FIELDS}
    return header, {k: np.asarray(v) for k, v in obs.items() if k not in HEADER_FIELDS}


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> list[Any]:
    """Header dict and named arrays -> frames for `socket.send_multipart(..., copy=False)`."""
    arrays = {name: np.ascontiguousarray(a) for name, a in (arrays or {}).items()}
    header = {
        **header,
        "v": PROTOCOL_VERSION,
        "arrays": [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()],
    }
    return [wire.pack(header), *arrays.values()]


def decode(frames: list[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Frames -> (header, arrays), or ProtocolError saying what is wrong."""
    if not frames:
        raise ProtocolError("bad_request", "empty message: expected a msgpack header frame")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError("bad_request", f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = wire.unpack(bytes(head))
    except wire.WireError as e:
        raise ProtocolError("bad_request", f"malformed msgpack header: {e}") from e
    if not isinstance(header, dict):
        raise ProtocolError("bad_request", "the header must be a msgpack map")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version", f"protocol version {header.get('v')!r}; this end speaks {PROTOCOL_VERSION}"
        )
    specs = header.get("arrays", [])
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise ProtocolError("bad_request", f"'arrays' must be a list of at most {MAX_ARRAYS} array descriptions")
    if len(specs) != len(frames) - 1:
        raise ProtocolError("bad_request", f"header declares {len(specs)} arrays but {len(frames) - 1} frames follow")
    arrays = {}
    for spec, frame in zip(specs, frames[1:], strict=True):
        name, array = _array(spec, _buffer(frame))
        if name in arrays:
            raise ProtocolError("bad_request", f"array {name!r} appears twice")
        arrays[name] = array
    return header, arrays


def _array(spec: Any, buffer: memoryview) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("bad_request", "each array description must be a map with a string 'name'")
    name, dtype, shape = spec["name"], spec.get("dtype"), spec.get("shape")
    if dtype not in DTYPES:
        raise ProtocolError("bad_request", f"array {name!r}: dtype {dtype!r} is not one of {list(DTYPES)}")
    valid_shape = isinstance(shape, list) and len(shape) <= MAX_NDIM
    if not valid_shape or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise ProtocolError("bad_request", f"array {name!r}: shape must be a list of at most {MAX_NDIM} sizes >= 0")
    # The bound ignores zero dimensions: a shape with one is 0 bytes whatever the others are, but numpy
    # still refuses non-zero dimensions that multiply past its limit (found by the fuzzer).
    itemsize = np.dtype(dtype).itemsize
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_FRAME_BYTES:
        raise ProtocolError("bad_request", f"array {name!r} of shape {shape} exceeds the {MAX_FRAME_BYTES}-byte limit")
    nbytes = math.prod(shape) * itemsize
    if nbytes != len(buffer):
        raise ProtocolError("bad_request", f"array {name!r}: {dtype}{shape} is {nbytes} bytes, its frame {len(buffer)}")
    return name, np.frombuffer(buffer, dtype=dtype).reshape(shape)


# The state guard (docs/reliability.md, "A state the policy never saw"): the infer reply's header key naming
# the state dimensions beyond the training range (a warning: the actions are there), and the refusal's code.
STATE_OUT_OF_RANGE = "state_out_of_range"
OUT_OF_RANGE = "out_of_range"


def describe_state_out_of_range(report: dict[str, Any]) -> str:
    """A `state_out_of_range` report -> one line naming its dimensions (for a warning, a refusal, a log)."""
    dims = report.get("dims") or []
    listed = ", ".join(
        f"dim {d.get('index')} = {d.get('value'):.4g} (normalized {d.get('normalized'):.4g})"
        for d in dims
        if isinstance(d, dict) and isinstance(d.get("value"), float) and isinstance(d.get("normalized"), float)
    )
    count = report.get("count", len(dims))
    more = f" and {count - len(dims)} more" if isinstance(count, int) and count > len(dims) else ""
    return (
        f"state outside the policy's training range ({report.get('norm')} statistics, |normalized| <= "
        f"{report.get('bound')}): {listed}{more}; sent in degrees instead of radians, or normalized already?"
    )


def error_header(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}
