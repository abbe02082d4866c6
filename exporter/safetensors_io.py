"""Read a .safetensors file as tensors that live in a memory map, not in copies of it.

A 3.5 B-parameter checkpoint is 14 GB in float32: loading it through `safetensors.torch.load_file`
leaves both the copy and the touched file pages resident. Here a tensor whose dtype is the one
wanted is a zero-copy view of the (private, copy-on-write) map; one that must be converted is
copied once and its file pages are released right after, so the peak stays near one model's size.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len

    def tensor_names(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`, as `dtype` if given: a view of the map when no conversion is needed."""
        entry = self._entries[key]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {entry['dtype']}")
        stored = DTYPES[entry["dtype"]]
        begin, end = (self._data_start + offset for offset in entry["data_offsets"])
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        if numel == 0:
            return torch.empty(entry["shape"], dtype=dtype or stored)
        view = torch.frombuffer(self._map, dtype=stored, count=numel, offset=begin).reshape(entry["shape"])
        if dtype is None or dtype == stored:
            return view
        converted = view.to(dtype)
        self._release(begin, end)
        return converted

    def _release(self, begin: int, end: int) -> None:
        """Drop the resident file pages of [begin, end) (they are clean: re-read on demand if touched)."""
        page = mmap.PAGESIZE
        start = (begin + page - 1) // page * page
        stop = end // page * page
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors to a .safetensors file one at a time (no second copy of the model in memory)."""
    header: dict[str, dict] = {}
    offset = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
