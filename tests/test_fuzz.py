"""Property-based fuzzing of what a client can send: the protocol decoder and the request validator,
through the daemon's own request handling (`Service.handle`, then `Service.run` for an `infer` job)
with the real engine on the pi0-dummy bundle.

For every generated message: no exception escapes, exactly one reply comes back, it decodes, and it
is either actions or an error with a known code; decoding allocates no more than the message's own
size (a declared shape is checked against its frame before anything is built); and it answers within
the deadline. `make test` runs a short pass; `make fuzz` sets PI0_FUZZ_EXAMPLES=100000 per strategy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pi0_client import protocol
from runtime.backends import BackendOptions
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.daemon.service import InferJob, Service
from runtime.engine import Engine

EXAMPLES = int(os.environ.get("PI0_FUZZ_EXAMPLES", "300"))
# `make test` draws the same messages every run (a suite that fails at random rejects good work); `make fuzz`
# (PI0_FUZZ_EXAMPLES set) explores new ones each time, and what it finds joins tests/test_server.py's cases.
EXPLORE = "PI0_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per message: a hang fails the run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    database=None,
    derandomize=not EXPLORE,
)
CODES = {"bad_request", "unsupported_version", "unknown_kind", "busy", "bad_output"}
TALLY: Counter = Counter()
PROMPT = "transfer the cube"  # the dummy bundle's tokenizer takes any text; this one is in its budget


@pytest.fixture(scope="module")
def service(dummy_bundle: Path) -> Service:
    logging.getLogger("pi0-runtime").setLevel(logging.CRITICAL)  # one warning per refusal: thousands
    bundle = load_bundle(dummy_bundle)
    return Service(lambda: Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle, BackendOptions(threads=1))))


def answer(service: Service, frames: list[bytes]) -> list[Any]:
    """One message through the service as a transport hands it over; returns the reply's frames."""
    result = service.handle([zmq.Frame(f) for f in frames])
    return service.run(result) if isinstance(result, InferJob) else result


def decode_peak_allocation(frames: list[bytes]) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(protocol.ProtocolError):
            protocol.decode(frames)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check(service: Service, frames: list[bytes]) -> None:
    size = sum(len(f) for f in frames)
    peak = min(decode_peak_allocation(frames) for _ in range(2))  # the smaller: not a one-time import
    assert peak <= size + 256 * 1024, f"decoding {size} bytes allocated {peak}"

    start = time.perf_counter()
    reply_header, reply_arrays = protocol.decode([bytes(memoryview(f)) for f in answer(service, frames)])
    assert time.perf_counter() - start < 2.0
    if reply_header["ok"]:
        assert reply_header["kind"] in protocol.KINDS
        if reply_header["kind"] == "infer":
            assert np.isfinite(reply_arrays["actions"]).all()
        TALLY[f"ok:{reply_header['kind']}"] += 1
    else:
        assert reply_header["error"]["code"] in CODES, reply_header
        assert isinstance(reply_header["error"]["message"], str) and reply_header["error"]["message"]
        TALLY[reply_header["error"]["code"]] += 1


# --- strategies -----------------------------------------------------------------------------------

NAMES = ["observation.images.top", "observation.state", "noise", "lang_tokens", "lang_masks", "extra", ""]
msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@st.composite
def array_messages(draw: st.DrawFn) -> list[bytes]:
    """Plausible requests with something wrong (or nothing): shapes, dtypes, byte counts, values."""
    arrays, frames = [], []
    for _ in range(draw(st.integers(0, 5))):
        dtype = draw(st.sampled_from([*protocol.DTYPES, "object", "complex64", "U8", 7]))
        shape = draw(
            st.lists(st.integers(0, 640), max_size=4)
            | st.lists(st.integers(-5, 2**40), max_size=9)
            | st.sampled_from([[480, 640, 3], [14], [1, 48], [1, 50, 32], [3, 224, 224]])
            | msgpack_values
        )
        name = draw(st.sampled_from(NAMES) | st.text(max_size=30))
        arrays.append({"name": name, "dtype": dtype, "shape": shape})
        declared = math.prod(shape) * np.dtype(dtype).itemsize if _sane(dtype, shape) else 0
        length = draw(st.sampled_from([declared, declared - 1, declared + 1, 0]) if declared < 2**22 else st.just(8))
        fill = draw(st.sampled_from([0, 255, "nan", "inf", "random"]))
        frames.append(_payload(max(length, 0), fill, dtype))
    header: dict[str, Any] = {
        "v": draw(st.sampled_from([protocol.PROTOCOL_VERSION, 0, 2, "1", None])),
        "kind": draw(st.sampled_from([*protocol.KINDS, "shutdown", "", None])),
        "id": draw(st.text(max_size=40) | st.integers(-(2**63), 2**64 - 1) | st.none()),
        "arrays": arrays,
    }
    for key in draw(st.lists(st.sampled_from(["prompt", "seed", "unknown", "arrays", "v"]), max_size=3)):
        header[key] = draw(msgpack_values | st.text(max_size=200) | st.integers(-(2**63), 2**64 - 1))
    packed = msgpack.packb(header, use_bin_type=True)
    cut = draw(st.sampled_from([len(packed), len(packed), max(0, len(packed) - 1), len(packed) // 2]))
    return [packed[:cut], *frames]


def _sane(dtype: Any, shape: Any) -> bool:
    return (
        dtype in protocol.DTYPES
        and isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    )


def _payload(length: int, fill: Any, dtype: Any) -> bytes:
    if fill in ("nan", "inf") and dtype in ("float16", "float32", "float64"):
        item = np.dtype(dtype).itemsize
        values = np.full(length // item, np.nan if fill == "nan" else np.inf, dtype=dtype).tobytes()
        return values + b"\0" * (length - len(values))
    if fill == "random":
        return np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    return bytes([fill if isinstance(fill, int) else 0xFF]) * length


MUTATIONS = (
    "none", "state_nan", "state_inf", "state_int", "state_shape", "image_dtype", "image_shape", "image_huge", "image_thin",
    "bytes_short", "bytes_long", "missing_state", "missing_image", "extra_array", "duplicate_array",
    "noise_shape", "noise_nan", "tokens_shape", "prompt_type", "prompt_long", "seed_type", "seed_negative",
    "unknown_field", "wrong_kind",
)  # fmt: skip


@st.composite
def mutated_requests(draw: st.DrawFn, spec: Any) -> list[bytes]:
    """A valid infer request for the bundle, then one thing made wrong (or none: it is served)."""
    mutation = draw(st.sampled_from(MUTATIONS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    (camera,) = spec.camera_keys
    _, h, w = spec.camera_shapes[0]
    arrays: dict[str, np.ndarray] = {
        camera: rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "observation.state": rng.normal(size=spec.state_dim).astype(np.float32),
    }
    header: dict[str, Any] = {"kind": "infer", "id": "fuzz", "prompt": PROMPT, "seed": int(rng.integers(0, 2**31))}
    state = arrays["observation.state"]
    if mutation == "state_nan":
        state[draw(st.integers(0, state.size - 1))] = np.nan
    elif mutation == "state_inf":
        state[0] = -np.inf
    elif mutation == "state_int":
        arrays["observation.state"] = state.astype(np.int64)
    elif mutation == "state_shape":
        arrays["observation.state"] = rng.normal(size=draw(st.integers(0, 40))).astype(np.float32)
    elif mutation == "image_dtype":
        arrays[camera] = arrays[camera].astype(draw(st.sampled_from(["float32", "int32", "bool", "float16"])))
    elif mutation == "image_shape":
        shape = draw(st.lists(st.integers(0, 700), min_size=0, max_size=4).filter(lambda s: math.prod(s) < 2**22))
        arrays[camera] = np.zeros(shape, dtype=np.uint8)
    elif mutation == "image_huge":
        arrays[camera] = np.zeros((1, 5000, 3), dtype=np.uint8)
    elif mutation == "image_thin":
        thin = (draw(st.integers(1, 4)), draw(st.integers(500, 1000)), 3)
        arrays[camera] = np.zeros(thin if draw(st.booleans()) else (thin[1], thin[0], 3), dtype=np.uint8)
    elif mutation == "missing_state":
        del arrays["observation.state"]
    elif mutation == "missing_image":
        del arrays[camera]
    elif mutation == "extra_array":
        arrays[draw(st.sampled_from(["observation.images.side", "extra", "lang_masks"]))] = np.zeros(3, np.float32)
    elif mutation == "noise_shape":
        arrays["noise"] = rng.normal(size=draw(st.integers(0, 5000))).astype(np.float32)
    elif mutation == "noise_nan":
        arrays["noise"] = np.full((1, spec.chunk_size, spec.max_action_dim), np.nan, np.float32)
    elif mutation == "tokens_shape":
        arrays["lang_tokens"] = rng.integers(-5, 10**6, size=draw(st.integers(0, 100)))
    elif mutation == "prompt_type":
        header["prompt"] = draw(msgpack_values)
    elif mutation == "prompt_long":
        header["prompt"] = draw(st.text(min_size=100, max_size=3000))
    elif mutation == "seed_type":
        header["seed"] = draw(msgpack_values)
    elif mutation == "seed_negative":
        header["seed"] = draw(st.integers(-(2**63), -1))
    elif mutation == "unknown_field":
        header[draw(st.text(max_size=10))] = draw(msgpack_values)
    elif mutation == "wrong_kind":
        header["kind"] = draw(st.text(max_size=10))
    frames = protocol.encode(header, arrays)
    frames = [f if isinstance(f, bytes) else f.tobytes() for f in frames]
    if mutation == "bytes_short" and len(frames) > 1:
        frames[1] = frames[1][:-1]
    elif mutation == "bytes_long":
        frames[-1] = frames[-1] + b"\0"
    elif mutation == "duplicate_array":
        description = msgpack.unpackb(frames[0], raw=False)
        description["arrays"].append(description["arrays"][0])
        frames = [msgpack.packb(description, use_bin_type=True), *frames[1:], frames[1]]
    return frames


@given(data=st.data())
@FUZZ
def test_mutated_requests(service: Service, data: st.DataObject) -> None:
    check(service, data.draw(mutated_requests(service.engine.spec)))


@given(frames=st.lists(st.binary(max_size=300), max_size=6))
@FUZZ
def test_random_frames(service: Service, frames: list[bytes]) -> None:
    check(service, frames)


@given(header=msgpack_values, extra=st.lists(st.binary(max_size=64), max_size=3))
@FUZZ
def test_random_msgpack_headers(service: Service, header: Any, extra: list[bytes]) -> None:
    check(service, [msgpack.packb(header, use_bin_type=True), *extra])


@given(frames=array_messages())
@FUZZ
def test_requests_with_arrays(service: Service, frames: list[bytes]) -> None:
    check(service, frames)


@given(depth=st.integers(1, 5000))
@settings(max_examples=min(EXAMPLES, 200), deadline=2000, database=None, derandomize=not EXPLORE)
def test_deep_nesting(service: Service, depth: int) -> None:
    check(service, [b"\x91" * depth + b"\xc0"])  # [[[...nil...]]]


def test_tally(service: Service) -> None:
    """Runs last in the module: what the fuzz produced, printed for `make fuzz`, and proof it reached
    past the decoder (some messages were valid enough to be served)."""
    print(f"\nfuzz replies by outcome ({EXAMPLES} examples per strategy): {dict(sorted(TALLY.items()))}")
    assert TALLY["bad_request"] > 0 and sum(v for k, v in TALLY.items() if k.startswith("ok:")) > 0
