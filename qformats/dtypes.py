"""Dtype names: the one table every command, config reader and library function goes through.

Checkpoints (config.json's `dtype`/`torch_dtype`, quant states) and options (`--dtype`,
`--compute-dtype`) name the three float dtypes the toolkit computes and stores in; the short
aliases (`bf16`, `fp16`, `fp32`) are accepted wherever a user types a name. torch is imported
only to build a `torch.dtype`, so the CLIs can list the names for `--help` without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qformats.errors import QError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(name: str | torch.dtype | None, what: str = "dtype") -> str | None:
    """The canonical name (`float32`, `bfloat16`, `float16`) of a name, alias or torch.dtype; None for None/`auto`.

    Anything else is a QError naming `what` (e.g. `--dtype`)."""
    if name is None:
        return None
    key = str(name).strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key == "auto":
        return None
    if key not in DTYPE_NAMES:
        raise QError(f"{what} {str(name)!r} is not supported: use auto, float32, bfloat16 or float16 "
                     "(or fp32, bf16, fp16)")  # fmt: skip
    return key


def parse_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """`float32`/`fp32`, `bfloat16`/`bf16`, `float16`/`fp16` (or a torch.dtype) -> torch.dtype; None/`auto` -> None."""
    import torch

    key = dtype_name(name, what)
    return None if key is None else getattr(torch, key)


def known_dtype(name: str | None) -> torch.dtype | None:
    """The dtype a config states (`dtype`, `torch_dtype`, `bnb_4bit_compute_dtype`); None if absent or unknown."""
    try:
        return parse_dtype(name)
    except QError:
        return None
