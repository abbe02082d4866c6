"""The wire format: our msgpack subset against the msgpack library, and the protocol's refusals."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from pi0_client import protocol, wire

VALUES = [
    None,
    True,
    False,
    0,
    1,
    127,
    128,
    255,
    256,
    65535,
    65536,
    2**32,
    2**63 - 1,
    2**64 - 1,
    -1,
    -32,
    -33,
    -129,
    -(2**15) - 1,
    -(2**31) - 1,
    -(2**63),
    0.5,
    -1.25e300,
    "",
    "a",
    "é" * 40,
    "x" * 300,
    "y" * 70000,
    b"",
    b"\x00" * 300,
    [],
    [1, [2, [3]]],
    list(range(20)),
    {},
    {"a": 1, "b": [True, None]},
    {str(i): i for i in range(20)},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: repr(v)[:30])
def test_wire_agrees_with_msgpack(value) -> None:
    ours = wire.pack(value)
    assert msgpack.unpackb(ours, raw=False, strict_map_key=False) == value
    theirs = msgpack.packb(value, use_bin_type=True)
    assert wire.unpack(theirs) == value
    assert wire.unpack(ours) == value


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "truncated"),
        (b"\x92\x01", "longer than the header"),
        (b"\x92\x01\xcd\x01", "truncated"),
        (b"\xdd\xff\xff\xff\xff", "longer than the header"),
        (b"\xdf\x7f\xff\xff\xff", "longer than the header"),
        (b"\xc6\xff\xff\xff\xff", "truncated"),
        (b"\x91" * 100 + b"\x01", "too deep"),
        (b"\x01\x02", "trailing"),
        (b"\xc1", "unsupported"),
        (b"\xa2\xff\xfe", "UTF-8"),
        (b"\x81\x90\x01", "keys must be"),
    ],
)
def test_wire_refuses_malformed_input(data: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.unpack(data)


def test_protocol_round_trip_is_zero_copy() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    frames = protocol.encode({"kind": "infer", "id": "r1", "prompt": "hi"}, {"observation.images.top": image})
    header, arrays = protocol.decode(frames)
    assert header["kind"] == "infer" and header["v"] == protocol.PROTOCOL_VERSION and header["prompt"] == "hi"
    np.testing.assert_array_equal(arrays["observation.images.top"], image)
    assert np.shares_memory(arrays["observation.images.top"], frames[1])


def frames_with(header: dict, *payloads: bytes) -> list[bytes]:
    return [msgpack.packb({"v": 1, "kind": "infer", **header}), *payloads]


@pytest.mark.parametrize(
    "frames,code,message",
    [
        ([], "bad_request", "empty message"),
        ([b"\x00" * (protocol.MAX_HEADER_BYTES + 1)], "bad_request", "exceeds"),
        ([b"\xc1"], "bad_request", "malformed msgpack"),
        ([msgpack.packb([1, 2])], "bad_request", "must be a msgpack map"),
        ([msgpack.packb({"v": 2})], "unsupported_version", "protocol version 2"),
        ([msgpack.packb({"kind": "infer"})], "unsupported_version", "protocol version None"),
        (
            frames_with({"arrays": [{"name": "a", "dtype": "uint8", "shape": [2]}]}),
            "bad_request",
            "declares 1 arrays but 0",
        ),
        (
            frames_with({"arrays": [{"name": "a", "dtype": "object", "shape": [1]}]}, b"x"),
            "bad_request",
            "dtype 'object'",
        ),
        (
            frames_with({"arrays": [{"name": "a", "dtype": "uint8", "shape": [-1]}]}, b"x"),
            "bad_request",
            "shape must be",
        ),
        (
            frames_with({"arrays": [{"name": "a", "dtype": "uint8", "shape": [2**30, 2**30]}]}, b"x"),
            "bad_request",
            "exceeds",
        ),
        (
            frames_with({"arrays": [{"name": "a", "dtype": "float32", "shape": [3]}]}, b"x" * 8),
            "bad_request",
            "12 bytes, its frame 8",
        ),
        (
            frames_with({"arrays": [{"name": "a", "dtype": "uint8", "shape": [1]}] * 2}, b"x", b"y"),
            "bad_request",
            "twice",
        ),
        (frames_with({"arrays": "nope"}), "bad_request", "'arrays' must be a list"),
    ],
)
def test_protocol_refusals(frames: list[bytes], code: str, message: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=message) as info:
        protocol.decode(frames)
    assert info.value.code == code


def test_declared_size_is_checked_before_any_allocation() -> None:
    """A header may declare a huge array; nothing of that size is ever built."""
    shape = [2**30, 2**30, 2**10]
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode(frames_with({"arrays": [{"name": "a", "dtype": "float64", "shape": shape}]}, b""))
    assert math.prod(shape) * 8 > 2**60


def test_a_zero_dimension_does_not_hide_a_huge_shape() -> None:
    """Found by the fuzzer: [0, 13001, 13004, 13007, 4194294] is 0 bytes, yet numpy refuses to shape it."""
    spec = {"name": "a", "dtype": "uint8", "shape": [0, 13001, 13004, 13007, 4194294]}
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode(frames_with({"arrays": [spec]}, b""))
    empty = {"name": "a", "dtype": "uint8", "shape": [0, 480, 640]}
    assert protocol.decode(frames_with({"arrays": [empty]}, b""))[1]["a"].shape == (0, 480, 640)
