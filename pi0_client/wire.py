"""The msgpack subset the protocol's headers use, in plain Python: nil, bool, int, float, str, bin,
array, map. Standard msgpack on the wire (any msgpack library can talk to the daemon); written here so
that the controller's client needs only numpy and pyzmq, and so that decoding is bounded: a hostile
header cannot make us allocate more than it is long, nor recurse deeper than MAX_DEPTH.
"""

from __future__ import annotations

import struct
from typing import Any

MAX_DEPTH = 16


class WireError(ValueError):
    """Bytes that are not a well-formed header in our msgpack subset."""


def pack(value: Any) -> bytes:
    out = bytearray()
    _pack(value, out, 0)
    return bytes(out)


def _pack(value: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise WireError("nesting too deep")
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        if 0 <= value < 0x80:
            out.append(value)
        elif -32 <= value < 0:
            out.append(value & 0xFF)
        elif -(2**63) <= value < 2**63:
            out += b"\xd3" + struct.pack(">q", value)
        elif 0 <= value < 2**64:
            out += b"\xcf" + struct.pack(">Q", value)
        else:
            raise WireError(f"integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        out += b"\xcb" + struct.pack(">d", value)
    elif isinstance(value, str):
        data = value.encode()
        _pack_len(out, len(data), 0xA0, 32, b"\xd9", b"\xda", b"\xdb")
        out += data
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        _pack_len(out, len(data), None, 0, b"\xc4", b"\xc5", b"\xc6")
        out += data
    elif isinstance(value, list | tuple):
        _pack_len(out, len(value), 0x90, 16, None, b"\xdc", b"\xdd")
        for item in value:
            _pack(item, out, depth + 1)
    elif isinstance(value, dict):
        _pack_len(out, len(value), 0x80, 16, None, b"\xde", b"\xdf")
        for key, item in value.items():
            _pack(key, out, depth + 1)
            _pack(item, out, depth + 1)
    else:
        raise WireError(f"cannot encode {type(value).__name__}")


def _pack_len(
    out: bytearray, n: int, fix: int | None, fix_limit: int, b8: bytes | None, b16: bytes, b32: bytes
) -> None:
    if fix is not None and n < fix_limit:
        out.append(fix | n)
    elif b8 is not None and n < 0x100:
        out += b8 + struct.pack(">B", n)
    elif n < 0x10000:
        out += b16 + struct.pack(">H", n)
    else:
        out += b32 + struct.pack(">I", n)


def unpack(data: bytes) -> Any:
    """Decode one value that must span all of `data`."""
    reader = _Reader(memoryview(data))
    value = reader.value(0)
    if reader.pos != len(data):
        raise WireError(f"{len(data) - reader.pos} trailing bytes after the header")
    return value


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            raise WireError("truncated header")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError("nesting too deep")
        b = self.uint(1)
        if b < 0x80:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.str(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):
            return bytes(self.take(self.uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[b])))
        if b == 0xCA:
            return struct.unpack(">f", self.take(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        if b in (0xCC, 0xCD, 0xCE, 0xCF):
            return self.uint({0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[b])
        if b in (0xD0, 0xD1, 0xD2, 0xD3):
            n = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}[b]
            return int.from_bytes(self.take(n), "big", signed=True)
        if b in (0xD9, 0xDA, 0xDB):
            return self.str(self.uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[b]))
        if b in (0xDC, 0xDD):
            return self.array(self.uint(2 if b == 0xDC else 4), depth)
        if b in (0xDE, 0xDF):
            return self.map(self.uint(2 if b == 0xDE else 4), depth)
        raise WireError(f"unsupported msgpack type byte 0x{b:02x}")

    def str(self, n: int) -> str:
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise WireError("string is not UTF-8") from e

    def array(self, n: int, depth: int) -> list:
        if n > len(self.data) - self.pos:  # every element takes at least one byte
            raise WireError("array longer than the header")
        return [self.value(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> dict:
        if 2 * n > len(self.data) - self.pos:
            raise WireError("map longer than the header")
        out = {}
        for _ in range(n):
            key = self.value(depth + 1)
            if not isinstance(key, str | int | bytes):  # bytes: openpi's ndarray maps (b"__ndarray__", ...)
                raise WireError("map keys must be strings, integers or bytes")
            out[key] = self.value(depth + 1)
        return out
