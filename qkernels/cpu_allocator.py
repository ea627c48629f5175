"""The training allocator: inside `caching_allocator()`, this process's CPU tensors come from the block
cache of `cpu_caching_allocator.cpp`; on exit the previous allocator is back and the cache emptied.

With glibc's heap alone a checkpointed training step's resident memory grows step by step; one mmap
per large block holds it near what is live but pays a page fault per 4 KiB on every allocation; the
cache holds as little at glibc's speed (bench/finetune.py; figures in bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from qkernels.cpu import extension_available

MIN_BYTES = 256 << 10  # smaller tensors stay with torch's default allocator


def default_cap() -> int:
    """Free blocks kept for reuse: 1 GiB, or an eighth of physical memory if that is less."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        ram = 8 << 30
    return min(1 << 30, ram // 8)


@contextlib.contextmanager
def caching_allocator(cap_bytes: int | None = None) -> Iterator[bool]:
    """CPU tensors of 256 KiB or more come from the block cache inside the block (process-wide, Linux
    only); yields whether the cache is in use. Where the C++ extension is not available or not on
    Linux, nothing changes (False). Nested, the outer block's exit restores; an inner one only sets the cap.
    """
    if not sys.platform.startswith("linux") or not extension_available():
        yield False
        return
    installed = torch.ops.qkernels_cpu.use_caching_allocator(default_cap() if cap_bytes is None else cap_bytes,
                                                             MIN_BYTES)  # fmt: skip
    try:
        yield True
    finally:
        if installed:
            torch.ops.qkernels_cpu.restore_cpu_allocator()


def cached_bytes() -> int:
    """Bytes of freed blocks the cache holds for reuse (0 outside `caching_allocator`)."""
    return int(torch.ops.qkernels_cpu.allocator_cached_bytes()) if extension_available() else 0
