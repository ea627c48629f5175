"""Writing a checkpoint folder: safetensors shards of at most `shard_size` bytes, atomically.

`ShardedWriter` fills shards up to `shard_size` bytes. A writer that knows each shard's header
before its data (`open_shard`, as the quantizer does) streams the data straight into the final
file (O_DIRECT where the filesystem takes it: qformats/direct_file.py), hashed as it is written; `add`, for writers that learn tensors one at a time, streams them to
a data file per shard, prefixed with its header when the shard closes. It names the result
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (or `model.safetensors` alone), all
inside `OUT.tmp-<pid>` (qformats.output_folder), renamed to OUT only by `commit()`. Any error removes the
temp folder and leaves OUT as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import torch

from qformats.checkpoint import Checkpoint
from qformats.checkpoint_files import INDEX_FILE, SINGLE_FILE
from qformats.direct_file import DirectFile
from qformats.errors import QError
from qformats.manifest import sha256_file
from qformats.output_folder import check_output_folder, make_temp_folder, temp_folder
from qformats.safetensors_file import TORCH_TO_SAFETENSORS, add_header_entry, safetensors_header

_COPY_CHUNK = 16 * 1024 * 1024


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
        # Hashes each write's bytes while they are written (both release the GIL): on a 2-core
        # machine hashing in line with writing made the writer the pipeline's slowest stage.
        self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconvert-sha256-out")
        self.file = DirectFile(path)  # closed by close() or, on failure, by the writer's abort()
        self._write([memoryview(safetensors_header(entries, metadata))])
        self.written = 0

    def write(self, buffers: list) -> None:
        """Append the bytes of `buffers` (bytes-like or CPU tensors, in header order)."""
        views = [memoryview(b.reshape(-1).view(torch.uint8).numpy() if isinstance(b, torch.Tensor) else b).cast("B")
                 for b in buffers]  # fmt: skip
        views = [v for v in views if v.nbytes]
        if self.written + sum(v.nbytes for v in views) > self.size:
            raise QError(f"{self.path}: more data than its header describes (internal error)")
        self._write(views)

    def _write(self, views: list) -> None:
        to_hash = tuple(views)
        hashed = self._hashing.submit(lambda: [self.hasher.update(v) for v in to_hash])
        try:
            for v in views:
                self.file.write(v)
                self.written += v.nbytes
        finally:
            hashed.result()  # before returning: the caller may reuse the buffers

    def abort(self) -> None:
        """Close the file and the hashing thread without checks (the writer failed)."""
        self.file.abort()
        self._hashing.shutdown()

    def close(self) -> str:
        """Close the file, checking it holds exactly what its header describes; returns its sha256."""
        self.file.close()
        self._hashing.shutdown()
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
            self._stream.abort()
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



def copy_extra_files(ckpt: Checkpoint, writer: ShardedWriter, skip: Iterable[str] = ()) -> list[str]:
    """Copy tokenizer / generation config / chat template files; returns the names copied."""
    names = []
    for path in ckpt.extra_files:
        if path.name not in skip:
            writer.copy_file(path)
            names.append(path.name)
    return names
