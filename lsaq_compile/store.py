"""Streaming safetensors writer for the bundle's weight store.

Tensors are appended one at a time, so a model never has to sit in memory at once. The header
(which safetensors puts first) is written last into space reserved up front: the tensor names
are known before any data is, and a header entry has a bounded length, so the reservation is
computed from the names alone. The format allows padding the header with spaces.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LsaqError

_ST_DTYPES = {"float16": "F16", "float32": "F32", "uint8": "U8", "int32": "I32", "int64": "I64"}
# Upper bound of one header entry's length beyond its name: dtype, a shape of up to 4 dims and
# two offsets, each number at most 20 digits, plus JSON punctuation.
_ENTRY_OVERHEAD = 200


@dataclass
class TensorRef:
    """Where one stored tensor lies. `offset` is absolute within the file (what ONNX external
    data wants); `file` is relative to the bundle root."""

    file: str
    offset: int
    length: int
    dtype: str          # "float16" | "float32" | "uint8"
    shape: tuple[int, ...]


class SafetensorsWriter:
    """Writes one .safetensors file; `names` must list every tensor that will be added."""

    def __init__(self, root: Path, rel_path: str, names: list[str]):
        self.root = Path(root)
        self.rel_path = rel_path
        self._planned = set(names)
        if len(self._planned) != len(names):
            raise ValueError(f"{rel_path}: duplicate tensor names planned")
        reserve = 64 + sum(len(n.encode()) + _ENTRY_OVERHEAD for n in names)
        self._header_len = reserve + (-reserve) % 8          # data section starts 8-aligned
        self._data_start = 8 + self._header_len
        path = self.root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "wb")
        self._f.seek(self._data_start)
        self._pos = 0                                          # bytes written into the data section
        self._entries: dict[str, dict] = {}

    def add(self, name: str, array: np.ndarray) -> TensorRef:
        return self.add_rows(name, [array])

    def add_rows(self, name: str, parts: list[np.ndarray]) -> TensorRef:
        """One tensor from row ranges given in order (their concatenation along axis 0,
        without making it)."""
        if name not in self._planned:
            raise ValueError(f"{self.rel_path}: tensor {name} was not planned")
        if name in self._entries:
            raise ValueError(f"{self.rel_path}: tensor {name} written twice")
        first = np.asarray(parts[0])
        dtype = first.dtype.name
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored")
        if any(np.asarray(a).dtype != first.dtype or np.shape(a)[1:] != first.shape[1:]
               for a in parts):   # checked before a byte is written
            raise ValueError(f"{name}: row ranges differ in dtype or shape")
        start = self._pos
        for part in parts:
            a = np.ascontiguousarray(part)
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
            self._f.write(memoryview(a).cast("B"))
            self._pos += a.nbytes
        shape = (sum(np.shape(a)[0] for a in parts), *first.shape[1:]) if first.ndim else ()
        self._entries[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                               "data_offsets": [start, self._pos]}
        return TensorRef(self.rel_path, self._data_start + start, self._pos - start, dtype,
                         tuple(shape))

    def close(self) -> None:
        header = json.dumps(self._entries, separators=(",", ":")).encode()
        if len(header) > self._header_len:  # cannot happen while _ENTRY_OVERHEAD bounds an entry
            raise LsaqError(f"{self.rel_path}: safetensors header overflowed its reservation")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self._header_len))
        self._f.write(header.ljust(self._header_len, b" "))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._f.close()


_NP_OF_ST = {v: k for k, v in _ST_DTYPES.items()}


def read_index(bundle: Path) -> dict[str, TensorRef]:
    """The index of an existing bundle's weight store (every tensor of weights/*.safetensors),
    as write_weight_store returned it: to build another graph over the same store. Headers are
    read with the runtime's checked reader."""
    from lsaq_runtime.integrity import safetensors_index

    root = Path(bundle)
    out = {}
    for f in sorted((root / "weights").glob("*.safetensors")):
        rel = f.relative_to(root).as_posix()
        for name, (dtype, shape, offset, length) in safetensors_index(f).items():
            out[name] = TensorRef(rel, offset, length, _NP_OF_ST[dtype], tuple(shape))
    return out
