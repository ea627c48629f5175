"""`qconvert.json`: what a converted checkpoint was made from, how, and the sha256 of every file.

Written last into the output folder by the quantizer; `verify_manifest(folder)` recomputes every
listed output hash (the Hub push calls it before uploading, `qconvert inspect --verify` shows it).
Files added later that the manifest does not list (a model card) are not an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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
