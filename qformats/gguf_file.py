"""Reading a GGUF file: its metadata, its tensor table, and each tensor dequantized to fp32.

The `gguf` package's `GGUFReader` builds numpy views for every metadata string (about 100k for
a 49k-token vocabulary, slow on a CPU), so the header is parsed here with `struct` from a
memory map instead. Tensor data stays in the map until asked for, and is
dequantized by `gguf.quants.dequantize` (llama.cpp's own reference code for every block type).
Layout (GGUF v2/v3, little-endian): magic, version, tensor count, metadata count, metadata
key/values, tensor infos (name, dims fastest-first, ggml type, offset), padding to the
alignment, tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from qformats.errors import QError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
_MAX_ARRAY_DEPTH = 4  # arrays of arrays: none in practice; bounded so a hostile file cannot exhaust the stack
# The fewest bytes one item can take in the file: a count claiming more items than the remaining bytes
# could hold is refused before any list is allocated, so memory stays bounded by the file size.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_ITEM_BYTES = {_STRING: 8, _ARRAY: 4 + 8}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (slowest dimension first)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> Python value) and `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # mmap of an empty file
            raise QError(f"{self.path}: not a GGUF file (it is empty)") from None
        if self._map[:4] != b"GGUF":
            raise QError(f"{self.path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, ValueError) as e:
            raise QError(f"{self.path}: the GGUF header is truncated or corrupt ({type(e).__name__}: {e})") from None

    def _parse(self) -> None:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self._map, 4)
        if version not in (2, 3):
            raise QError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3)")
        self._pos = 24
        self._check_count(n_kv, _MIN_KV_BYTES, "metadata key/value pairs")
        self._check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensors")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))

        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if n_dims > _MAX_DIMS:
                raise QError(f"{self.path}: tensor {name} declares {n_dims} dimensions (at most {_MAX_DIMS})")
            dims = [self._unpack("<Q") for _ in range(n_dims)]
            type_id, offset = self._unpack("<I"), self._unpack("<Q")
            infos.append((name, tuple(reversed(dims)), type_id, offset))

        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise QError(f"{self.path}: general.alignment is {alignment!r}; it must be a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, type_id, offset in infos:
            try:
                ggml_type = GGMLQuantizationType(type_id)
            except ValueError:
                raise QError(f"{self.path}: tensor {name} has unknown ggml type {type_id}") from None
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            if not shape or shape[-1] % block:
                raise QError(f"{self.path}: tensor {name} has shape {list(shape)}, not whole {ggml_type.name} blocks")
            nbytes = prod(shape) // block * block_bytes
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise QError(
                    f"{self.path}: tensor {name} ends at byte {start + nbytes} but the file has "
                    f"{len(self._map)} bytes (truncated?)"
                )
            self.tensors[name] = GGUFTensor(name, shape, ggml_type, start, nbytes)

    def _check_count(self, count: int, item_bytes: int, what: str) -> None:
        if count * item_bytes > len(self._map) - self._pos:
            raise QError(f"{self.path}: the header declares {count} {what}, more than the file's "
                         f"{len(self._map)} bytes can hold (truncated or corrupt)")  # fmt: skip

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        raw = self._map[self._pos : self._pos + n]
        if len(raw) != n:
            raise IndexError("string runs past the end of the file")
        self._pos += n
        return raw.decode("utf-8")

    def _value(self, value_type: int, depth: int = 0) -> Any:
        if value_type in _SCALARS:
            return self._unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise QError(f"{self.path}: metadata arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            item_type, count = self._unpack("<I"), self._unpack("<Q")
            if item_type in _NUMPY:  # numbers in one read: a vocabulary's token types are 49k of them
                values = np.frombuffer(self._map, dtype=_NUMPY[item_type], count=count, offset=self._pos)
                self._pos += values.nbytes
                return values.tolist()
            self._check_count(count, _MIN_ITEM_BYTES.get(item_type, 1), "array items")
            return [self._value(item_type, depth + 1) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")

    def field(self, key: str) -> Any:
        """A required metadata value; a QError naming the field when it is missing."""
        if key not in self.metadata:
            raise QError(f"{self.path}: metadata field {key} is missing")
        return self.metadata[key]

    def count(self, key: str, default: int | None = None) -> int:
        """A required (or defaulted) metadata value that must be a whole number of at least 1: sizes, counts."""
        value = self.metadata.get(key, default) if default is not None else self.field(key)
        if type(value) is not int or value < 1:
            raise QError(f"{self.path}: metadata field {key} is {value!r}; expected a whole number of at least 1")
        return value

    def positive(self, key: str, default: float | None = None) -> float:
        """A required (or defaulted) metadata value that must be a finite number above 0: epsilons, bases."""
        value = self.metadata.get(key, default) if default is not None else self.field(key)
        if type(value) not in (int, float) or not 0 < value < float("inf"):
            raise QError(f"{self.path}: metadata field {key} is {value!r}; expected a positive number")
        return value

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, uint8 of shape `[*shape[:-1], bytes per row]` (a view of the map)."""
        t = self.tensors[name]
        data = np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return data.reshape(*t.shape[:-1], -1)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a writable fp32 array of its shape (torch order)."""
        t = self.tensors[name]
        try:
            values = dequantize(self.raw(name), t.ggml_type)
        except NotImplementedError:
            raise QError(f"{self.path}: tensor {name} is {t.ggml_type.name}, which gguf cannot dequantize") from None
        values = np.asarray(values, dtype=np.float32).reshape(t.shape)
        return values if values.flags.writeable else values.copy()
