"""`qconvert.json`: what a converted checkpoint was made from, how, and the sha256 of every file.

Written last into the output folder by the quantizer; `verify_manifest(folder)` recomputes every
listed output hash (the Hub push calls it before uploading, `qconvert inspect --verify` shows it).
Files added later that the manifest does not list (a model card) are not an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from qformats.errors import QError
from qformats.json_file import read_json_object

MANIFEST_FILE = "qconvert.json"
MANIFEST_FORMAT = "qconvert-manifest/1"
_HASH_CHUNK = 16 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class BackgroundSha256:
    """The sha256 of files, computed in order by a daemon thread while the caller does other work.

    hashlib releases the GIL while it hashes, so the thread runs beside the caller on another core:
    `qconvert quantize` starts it on the source before torch is imported, when a small machine has a
    core idle, and its reader then never hashes. It reads the files once more (from the page cache,
    or first: then the scan and the main pass find them cached) and stays at most `window` bytes
    ahead of what the caller reports done (`advance`), so a source larger than memory is not read
    far ahead and evicted before its main pass. `digest(path)` waits for that file; a file whose
    size or modification time changed since the thread started is an error, naming it: its hash
    would no longer describe the bytes that were quantized.
    """

    def __init__(self, paths: Iterable[str | Path], window: int = 4 << 30):
        self._paths = list(dict.fromkeys(Path(p).resolve() for p in paths))  # the key digest() looks up
        self._stamps = {p: _stamp(p) for p in self._paths}
        self._digests: dict[Path, str] = {}
        self._errors: dict[Path, OSError] = {}
        self._allowed, self._hashed = window, 0
        self._cond = threading.Condition()
        self._stop = self._finished = False
        self._thread = threading.Thread(target=self._run, name="qconvert-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._hash_files()
        finally:  # however it ends, no digest() waits forever
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _hash_files(self) -> None:
        # One buffer (no fresh pages to fault in per chunk), large: between its GIL-free read and hash
        # the thread waits for the GIL, up to 5 ms each time while the caller imports torch.
        buf = memoryview(bytearray(4 * _HASH_CHUNK))
        for path in self._paths:
            h = hashlib.sha256()
            try:
                with open(path, "rb", buffering=0) as f:
                    while True:
                        with self._cond:
                            self._cond.wait_for(lambda: self._stop or self._hashed < self._allowed)
                            if self._stop:
                                return
                        n = f.readinto(buf)
                        if not n:
                            break
                        h.update(buf[:n])
                        with self._cond:
                            self._hashed += n
            except OSError as e:
                self._done(self._errors, path, e)
                continue
            self._done(self._digests, path, h.hexdigest())

    def _done(self, results: dict, path: Path, value) -> None:
        with self._cond:
            results[path] = value
            self._cond.notify_all()  # a digest() may be waiting for this file

    def advance(self, n: int) -> None:
        """The caller is `n` more bytes into the files: the thread may read that much further."""
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    def digest(self, path: str | Path) -> str | None:
        """The file's hex sha256 (waiting for the thread to reach it; None if it was not one of the
        files given). QError if it could not be read or has changed since the thread started."""
        path = Path(path).resolve()
        if path not in self._stamps:
            return None
        with self._cond:
            self._allowed = float("inf")  # the caller is done: hash the rest at full speed
            self._cond.notify_all()
            self._cond.wait_for(lambda: path in self._digests or path in self._errors or self._finished)
        if path in self._errors:
            raise QError(f"{path}: unreadable ({self._errors[path]})")
        if path not in self._digests and self._finished:
            raise QError(f"{path}: hashing was stopped" if self._stop else f"{path}: hashing ended early (internal error)")
        if path not in self._digests or _stamp(path) != self._stamps[path]:
            raise QError(f"{path}: changed while it was being read; run again")
        return self._digests[path]

    def stop(self) -> None:
        """End the thread early (the caller failed): it stops before its next chunk."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def tool_version() -> str:
    try:
        return importlib.metadata.version("qlora-toolkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_manifest(
    parameters: dict,
    source: dict,
    source_files: dict[str, str],
    tensors: dict[str, dict],
    files: dict[str, str],
) -> dict:
    """The manifest object.

    parameters: the quantizer's settings; source: where SRC came from (path, repo id, revision);
    source_files / files: sha256 by file name of the inputs / outputs; tensors: per source tensor
    `{"shape": [...], "dtype": "F16", "kind": "nf4" | "kept"}`.
    """
    return {
        "format": MANIFEST_FORMAT,
        "tool": "qlora-toolkit",
        "version": tool_version(),
        "parameters": parameters,
        "source": {**source, "files": dict(sorted(source_files.items()))},
        "tensors": tensors,
        "files": dict(sorted(files.items())),
    }


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise QError(f"{folder}: no {MANIFEST_FILE} manifest (not written by qconvert, or incomplete)")
    manifest = read_json_object(path)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise QError(f"{path}: unreadable manifest (format {manifest.get('format')!r})")
    return manifest


def manifest_problems(folder: Path) -> list[str]:
    """Every mismatch between the manifest and the folder (missing file, changed sha256); [] when intact."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST_FILE} but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs from {MANIFEST_FILE} (file changed or corrupt)")
    return problems


def verify_manifest(folder: Path) -> None:
    """Raise QError naming every file whose sha256 differs from the manifest (or that is missing)."""
    problems = manifest_problems(folder)
    if problems:
        raise QError(f"{folder}: manifest check failed: " + "; ".join(problems))
