"""Which files a Hugging Face safetensors checkpoint folder is made of, without importing torch:
`qconvert quantize` starts hashing them before torch has loaded (qformats/manifest.py)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from qformats.errors import QError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
