"""The safetensors file format: reading and checking a header against the file, reading tensors, writing headers.

`read_safetensors_header(path)` checks every entry before a byte of tensor data is read: a truncated
file, a header whose offsets disagree with the shapes, overlapping or missing data, or a dtype
safetensors does not define is a QError naming the file and tensor. Tensors are read with plain
`readinto` (no mmap), so memory holds one tensor, not one file, and a sha256 of the file can be
computed on the way. `add_header_entry` / `safetensors_header` build the header a writer puts first.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qformats.errors import QError

# safetensors dtype names (the format's spec) -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes lie in its file (absolute offsets) and what they are."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        return TORCH_TO_SAFETENSORS[self.dtype]


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    header_bytes: int  # 8 + JSON length: where tensor data starts

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header against the file size; QError names the file and tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise QError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise QError(f"{path}: header length {n} exceeds the file size {size} (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise QError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise QError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_start = 8 + n
    entries = []
    for name, entry in header.items():
        entries.append(_tensor_info(path, name, entry, data_start))
    entries.sort(key=lambda t: (t.start, t.end))
    expected = data_start
    for t in entries:  # safetensors requires the data to be packed with no gap and no overlap
        if t.start != expected:
            what = "overlaps the previous tensor" if t.start < expected else f"leaves a gap at byte {expected}"
            raise QError(f"{path}: tensor {t.name!r} starts at byte {t.start} and {what} (corrupt header)")
        if t.end > size:
            raise QError(f"{path}: tensor {t.name!r} ends at byte {t.end} but the file has {size} bytes "
                         "(truncated shard)")  # fmt: skip
        expected = t.end
    if expected != size:
        raise QError(f"{path}: header describes {expected} bytes but the file has {size} (corrupt or truncated)")
    return SafetensorsHeader(path=path, tensors={t.name: t for t in entries}, metadata=metadata,
                             header_bytes=data_start)  # fmt: skip


def _whole_numbers(value: object) -> bool:
    """A JSON list of integers (not floats such as 2.0 or 2.5, not booleans)."""
    return isinstance(value, list) and all(type(v) is int for v in value)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    try:
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError) as e:
        raise QError(f"{path}: tensor {name!r} has a malformed header entry ({e!r})") from None
    if not _whole_numbers(shape) or not _whole_numbers(offsets) or len(offsets) != 2:
        raise QError(f"{path}: tensor {name!r} has a malformed header entry (shape {shape!r}, data_offsets "
                     f"{offsets!r}: lists of whole numbers expected)")  # fmt: skip
    shape, (begin, end) = tuple(shape), offsets
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise QError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which safetensors does not define")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    if any(s < 0 for s in shape) or begin < 0 or end < begin:
        raise QError(f"{path}: tensor {name!r} has negative sizes or offsets in its header")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise QError(f"{path}: tensor {name!r} header says {end - begin} bytes but {dtype_name} {list(shape)} "
                     f"needs {expected} (header lies about sizes)")  # fmt: skip
    return TensorInfo(name=name, file=path, dtype=dtype, shape=shape, start=data_start + begin, end=data_start + end)


def read_into(f, view: memoryview, info: TensorInfo, at: int) -> None:
    """Fill `view` from the open file at absolute byte `at` (inside tensor `info`); QError if the file ends first."""
    f.seek(at)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise QError(f"{info.file}: tensor {info.name!r} is cut short at byte {at + got} (truncated shard)")
        got += n


def read_tensor(f, info: TensorInfo, hasher=None) -> torch.Tensor:
    """Read one tensor from an open file positioned anywhere; `hasher` (sha256) sees its bytes."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    read_into(f, view, info, info.start)
    if hasher is not None:
        hasher.update(view)
    return buf.view(info.dtype).view(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)


def iter_shard_tensors(header: SafetensorsHeader, hasher=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` of one shard in file order. With `hasher`, it ends up holding the
    sha256 of the whole file (header included), read once."""
    with open(header.path, "rb") as f:
        if hasher is not None:
            hasher.update(f.read(header.header_bytes))
        for info in header.tensors.values():
            yield info.name, read_tensor(f, info, hasher)



def add_header_entry(entries: dict[str, dict], name: str, dtype: torch.dtype, shape: Iterable[int], at: int) -> int:
    """Append a tensor's safetensors header entry, its data starting at byte `at` of the data;
    returns where the next tensor's data starts."""
    shape = [int(s) for s in shape]
    end = at + math.prod(shape) * dtype.itemsize
    entries[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": shape, "data_offsets": [at, end]}
    return end


def safetensors_header(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    """The bytes a safetensors file starts with: the header's length, then the header (entries in order)."""
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(header)) + header

