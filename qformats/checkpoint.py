"""Hugging Face safetensors checkpoint folders: validated reading, one tensor at a time.

`open_checkpoint(folder)` finds `model.safetensors` or `model.safetensors.index.json`, parses
config.json and checks every shard header (qformats.safetensors_file) before a byte of tensor data is
read. `iter_checkpoint_tensors(folder)` then yields `(name, tensor)` shard by shard, one tensor in
memory at a time, optionally hashing each shard on the way. Writing is qformats.sharded_writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qformats.checkpoint_files import list_shards
from qformats.errors import QError
from qformats.json_file import read_json_object
from qformats.safetensors_file import SafetensorsHeader, TensorInfo, iter_shard_tensors, read_safetensors_header

CONFIG_FILE = "config.json"

# Files copied verbatim next to the weights: tokenizer, generation defaults, chat template.
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "generation_config.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)  # fmt: skip


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
    return read_json_object(path)


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

