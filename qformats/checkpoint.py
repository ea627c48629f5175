"""Hugging Face safetensors checkpoints on disk: validated reading, one tensor at a time, and sharded writing.

Reading: `open_checkpoint(folder)` finds `model.safetensors` or `model.safetensors.index.json`, parses
config.json and checks every shard header before a byte of tensor data is read: a truncated shard, a
header whose offsets disagree with the shapes, overlapping or missing data, or a dtype safetensors does
not define is a QError naming the file and tensor. `iter_checkpoint_tensors(folder)` then yields
`(name, tensor)` shard by shard, reading each tensor with plain `readinto` (no mmap), so memory holds one
tensor, not one shard, and a sha256 of each source file can be computed on the way.

Writing: `ShardedWriter` fills shards up to `shard_size` bytes. A writer that knows each shard's
header before its data (`open_shard`, as the quantizer does) streams the data straight into the
final file, hashed as it is written; `add`, for writers that learn tensors one at a time, streams
them to a data file per shard, prefixed with its header when the shard closes. It names the result
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (or `model.safetensors` alone), all
inside `OUT.tmp-<pid>` (qformats.output_folder), renamed to OUT only by `commit()`. Any error removes the
temp folder and leaves OUT as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Self

import torch

from qformats.errors import QError
from qformats.output_folder import make_temp_folder, temp_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# Files copied verbatim next to the weights: tokenizer, generation defaults, chat template.
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "generation_config.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)  # fmt: skip

# safetensors dtype names (the format's spec) -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_COPY_CHUNK = 16 * 1024 * 1024
_IOV_MAX = 1024  # buffers per writev call (Linux's limit)


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


@dataclass
class Checkpoint:
    """An HF checkpoint folder whose config and every shard header have been checked."""

    folder: Path
    config: dict
    shards: list[SafetensorsHeader]
    extra_files: list[Path] = field(default_factory=list)
    index_file: Path | None = None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {name: info for shard in self.shards for name, info in shard.tensors.items()}

    @property
    def source_files(self) -> list[Path]:
        """Every file the checkpoint is made of (what a manifest hashes)."""
        files = [self.folder / CONFIG_FILE] + [s.path for s in self.shards] + self.extra_files
        return files + ([self.index_file] if self.index_file else [])

    @property
    def is_quantized(self) -> bool:
        return bool(self.config.get("quantization_config"))


def load_config(folder: Path) -> dict:
    """config.json of a checkpoint folder as a dict; QError when it is missing or not JSON."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise QError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise QError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise QError(f"{path}: expected a JSON object")
    return config


def list_shards(folder: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of a checkpoint in index order, and the index file if sharded."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise QError(f"{index}: unreadable index ({e!r})") from None
        for n in names:  # plain names inside the folder: an index must not make us open any other file
            inside = isinstance(n, str) and n and "\\" not in n and not PurePosixPath(n).is_absolute()
            if not inside or ".." in PurePosixPath(n).parts:
                raise QError(f"{index}: shard name {n!r} is not a file inside {folder}")
        shards = [folder / n for n in names]
        for s in shards:
            if not s.is_file():
                raise QError(f"{index}: lists shard {s.name}, which is missing")
        return shards, index
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], None
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise QError(f"{folder}: only pickle weights (.bin/.pt) found; qconvert reads safetensors only "
                     "(pickle files can run code)")  # fmt: skip
    raise QError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def open_checkpoint(folder: Path) -> Checkpoint:
    """Check a checkpoint folder (config, shard list, every header, the index against the headers)."""
    folder = Path(folder)
    if not folder.exists():
        raise QError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise QError(f"{folder}: not a folder")
    if not any(folder.iterdir()):
        raise QError(f"{folder}: the folder is empty")
    config = load_config(folder)
    paths, index = list_shards(folder)
    shards = [read_safetensors_header(p) for p in paths]
    seen: dict[str, Path] = {}
    for shard in shards:
        for name in shard.tensors:
            if name in seen:
                raise QError(f"{shard.path}: tensor {name!r} also appears in {seen[name].name}")
            seen[name] = shard.path
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            if seen.get(name, Path()).name != file:
                raise QError(f"{index}: maps {name!r} to {file}, which does not hold it")
    extras = [folder / n for n in EXTRA_FILES if (folder / n).is_file()]
    return Checkpoint(folder=folder, config=config, shards=shards, extra_files=extras, index_file=index)


def iter_checkpoint_tensors(folder: Path | Checkpoint, hashers: dict[Path, object] | None = None
                            ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Yield every `(name, tensor)` of a checkpoint, shard by shard, one tensor in memory at a time.

    `hashers`, if given, receives a sha256 object per shard path (complete once that shard is done).
    """
    ckpt = folder if isinstance(folder, Checkpoint) else open_checkpoint(folder)
    for shard in ckpt.shards:
        hasher = None
        if hashers is not None:
            hasher = hashers[shard.path] = hashlib.sha256()
        yield from iter_shard_tensors(shard, hasher)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parse_size(text: str | float) -> int:
    """'5GB', '500MB', '2GiB', '1e9' or a number -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}  # fmt: skip
    for unit, scale in units.items():
        if s.endswith(unit):
            s, mult = s[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        value = int(float(s) * mult)
    except ValueError:
        raise QError(f"cannot read size {text!r}: use e.g. 5GB, 500MB, 2GiB") from None
    if value <= 0:
        raise QError(f"size {text!r} must be positive")
    return value


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


def starts_new_shard(shard_bytes: int, group_bytes: int, shard_size: int) -> bool:
    """Whether a group of tensors goes to a new shard: the current one has data and would outgrow `shard_size`."""
    return shard_bytes > 0 and shard_bytes + group_bytes > shard_size


class ShardStream:
    """An output shard whose header is known before its data: the header is written first, then the
    tensors' bytes straight after in `write` calls, each byte hashed as it is written."""

    def __init__(self, path: Path, entries: dict[str, dict], metadata: dict[str, str]):
        self.path = path
        self.entries = entries
        self.size = max((e["data_offsets"][1] for e in entries.values()), default=0)
        self.written = 0
        self.hasher = hashlib.sha256()
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in close(); raw: each write is one syscall)
        self._write([memoryview(safetensors_header(entries, metadata))])
        self.written = 0

    def write(self, buffers: list) -> None:
        """Append the bytes of `buffers` (bytes-like or CPU tensors, in header order) in one writev."""
        views = [memoryview(b.reshape(-1).view(torch.uint8).numpy() if isinstance(b, torch.Tensor) else b).cast("B")
                 for b in buffers]  # fmt: skip
        views = [v for v in views if v.nbytes]
        if self.written + sum(v.nbytes for v in views) > self.size:
            raise QError(f"{self.path}: more data than its header describes (internal error)")
        self._write(views)

    def _write(self, views: list) -> None:
        for v in views:
            self.hasher.update(v)
        while views:
            n = os.writev(self.file.fileno(), views[:_IOV_MAX])
            self.written += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def close(self) -> str:
        """Close the file, checking it holds exactly what its header describes; returns its sha256."""
        self.file.close()
        if self.written != self.size:
            raise QError(f"{self.path}: {self.written} bytes of data written, its header describes {self.size} "
                         "(internal error)")  # fmt: skip
        return self.hasher.hexdigest()


class _ShardFile:
    """An output shard being filled: tensor bytes go to a data file; the header comes at close."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_suffix(".data")
        self.data = open(self.data_path, "wb")  # noqa: SIM115 (stays open across add() calls; closed in close())
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise QError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.data.write(raw)
        self.size = add_header_entry(self.entries, name, t.dtype, t.shape, self.size)

    def close(self, metadata: dict[str, str]) -> str:
        """Write `header + data` to the shard path; returns its sha256."""
        self.data.close()
        h = hashlib.sha256()
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            chunk = safetensors_header(self.entries, metadata)
            out.write(chunk)
            h.update(chunk)
            while chunk := data.read(_COPY_CHUNK):
                out.write(chunk)
                h.update(chunk)
        self.data_path.unlink()
        return h.hexdigest()


class ShardedWriter:
    """Write a checkpoint folder atomically: everything goes to `OUT.tmp-<pid>`, renamed by `commit()`.

    Use as a context manager; leaving it without `commit()` (an exception) removes the temp folder.
    `add(group)` keeps the tensors of one group (a weight and its quant state) in one shard.
    `file_hashes` holds the sha256 of every file written, by name relative to OUT.
    """

    def __init__(self, out: Path, shard_size: int = 5 * 10**9, force: bool = False,
                 metadata: dict[str, str] | None = None):  # fmt: skip
        self.out = Path(out)
        self.shard_size = int(shard_size)
        self.force = force
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp = temp_folder(self.out)
        self.file_hashes: dict[str, str] = {}
        self.weight_map: dict[str, int] = {}  # tensor name -> shard number (1-based)
        self.total_size = 0
        self._closed_shards: list[Path] = []
        self._shard: _ShardFile | None = None  # the shard `add` is filling
        self._stream: ShardStream | None = None  # the shard `open_shard` started
        self._committed = False

    def __enter__(self) -> Self:
        check_output_folder(self.out, self.force)
        make_temp_folder(self.out)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._shard is not None:
            self._shard.data.close()
        if self._stream is not None:
            self._stream.file.close()
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._shard is not None and starts_new_shard(self._shard.size, nbytes, self.shard_size):
            self._close_shard()
        if self._shard is None:
            n = len(self._closed_shards) + 1
            self._shard = _ShardFile(self.tmp / f"shard-{n:05d}.safetensors")
        for name, t in tensors.items():
            if name in self.weight_map:
                raise QError(f"{name}: written twice")
            self._shard.add(name, t)
            self.weight_map[name] = len(self._closed_shards) + 1
        self.total_size += nbytes

    def open_shard(self, entries: dict[str, dict]) -> ShardStream:
        """Start the next shard with its header known (`add_header_entry` entries): write its data
        with `ShardStream.write`, in header order, then `close_shard` it. Not mixed with `add`."""
        if self._shard is not None or self._stream is not None:
            raise QError("a shard is already open (internal error)")
        n = len(self._closed_shards) + 1
        for name in entries:
            if name in self.weight_map:
                raise QError(f"{name}: written twice")
            self.weight_map[name] = n
        self._stream = ShardStream(self.tmp / f"shard-{n:05d}.safetensors", entries, self.metadata)
        self.total_size += self._stream.size
        return self._stream

    def close_shard(self) -> None:
        """Finish the shard `open_shard` started (QError unless it holds exactly what its header says)."""
        stream, self._stream = self._stream, None
        self.file_hashes[stream.path.name] = stream.close()
        self._closed_shards.append(stream.path)

    def _close_shard(self) -> None:
        digest = self._shard.close(self.metadata)
        self.file_hashes[self._shard.path.name] = digest
        self._closed_shards.append(self._shard.path)
        self._shard = None

    def write_json(self, name: str, obj: object) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        (self.tmp / name).write_bytes(data)
        self.file_hashes[name] = hashlib.sha256(data).hexdigest()

    def copy_file(self, src: Path, name: str | None = None) -> None:
        name = name or Path(src).name
        shutil.copyfile(src, self.tmp / name)
        self.file_hashes[name] = sha256_file(self.tmp / name)

    def finish_shards(self) -> list[str]:
        """Close the last shard and give shards their final names (+ index); returns the shard names."""
        if self._shard is not None:
            self._close_shard()
        n = len(self._closed_shards)
        if n == 0:
            raise QError("no tensors to write")
        names = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for path, name in zip(self._closed_shards, names):
            path.rename(self.tmp / name)
            self.file_hashes[name] = self.file_hashes.pop(path.name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: names[i - 1] for k, i in sorted(self.weight_map.items())}}  # fmt: skip
            self.write_json(INDEX_FILE, index)
        return names

    def commit(self) -> None:
        """Move the finished temp folder to OUT (replacing it when forced)."""
        old = None
        if self.out.exists():
            old = self.out.parent / f"{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        self._committed = True
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless forced, and an OUT that is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QError(f"{out}: folder is not empty (use --force to replace it)")


def copy_extra_files(ckpt: Checkpoint, writer: ShardedWriter, skip: Iterable[str] = ()) -> list[str]:
    """Copy tokenizer / generation config / chat template files; returns the names copied."""
    names = []
    for path in ckpt.extra_files:
        if path.name not in skip:
            writer.copy_file(path)
            names.append(path.name)
    return names
