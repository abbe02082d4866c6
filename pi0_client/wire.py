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
    # Every request's header passes through here: the common cases first, by exact type (a subclass,
    # bool among them, takes the general path below).
    kind = type(value)
    if kind is str and len(value) < 32 and value.isascii():
        out.append(0xA0 | len(value))
        out += value.encode()
    elif kind is int and 0 <= value < 0x80:
        out.append(value)
    elif kind is dict:
        _pack_len(out, len(value), 0x80, 16, None, b"\xde", b"\xdf")
        for key, item in value.items():
            _pack(key, out, depth + 1)
            _pack(item, out, depth + 1)
    elif kind is list:
        _pack_len(out, len(value), 0x90, 16, None, b"\xdc", b"\xdd")
        for item in value:
            _pack(item, out, depth + 1)
    elif value is None:
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
    reader = _Reader(bytes(data))
    value = reader.value(0)
    if reader.pos != len(reader.data):
        raise WireError(f"{len(reader.data) - reader.pos} trailing bytes after the header")
    return value


# Type bytes beyond the fixed-size ranges: constants, and the width of what follows them.
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_INT = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_ARRAY = {0xDC: 2, 0xDD: 4}
_MAP = {0xDE: 2, 0xDF: 4}


class _Reader:
    """A cursor over the header's bytes. Every request's header passes through it on the serving path,
    so the common types (fixint, fixmap, fixarray, fixstr) are read inline by indexing the bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n > len(self.data) - pos:
            raise WireError("truncated header")
        self.pos = pos + n
        return self.data[pos : pos + n]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError("nesting too deep")
        pos = self.pos
        if pos >= len(self.data):
            raise WireError("truncated header")
        b = self.data[pos]
        self.pos = pos + 1
        if b < 0x80:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b < 0x90:
            return self.map(b & 0x0F, depth)
        if b < 0xA0:
            return self.array(b & 0x0F, depth)
        if b < 0xC0:  # fixstr, read here: most of a header's values are short strings
            end = pos + 1 + (b & 0x1F)
            if end > len(self.data):
                raise WireError("truncated header")
            self.pos = end
            return _utf8(self.data[pos + 1 : end])
        if b in _CONSTANTS:
            return _CONSTANTS[b]
        if b in _BIN:
            return self.take(self.uint(_BIN[b]))
        if b == 0xCA:
            return struct.unpack(">f", self.take(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        if b in _UINT:
            return self.uint(_UINT[b])
        if b in _INT:
            return int.from_bytes(self.take(_INT[b]), "big", signed=True)
        if b in _STR:
            return self.str(self.uint(_STR[b]))
        if b in _ARRAY:
            return self.array(self.uint(_ARRAY[b]), depth)
        if b in _MAP:
            return self.map(self.uint(_MAP[b]), depth)
        raise WireError(f"unsupported msgpack type byte 0x{b:02x}")

    def str(self, n: int) -> str:
        return _utf8(self.take(n))

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


def _utf8(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise WireError("string is not UTF-8") from e
