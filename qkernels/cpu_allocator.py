"""Switch this process's CPU tensors to the caching allocator of `cpu_caching_allocator.cpp` (training).

Measured with bench/finetune.py (SmolLM2 NF4, LoRA r=16, batch 4 x 256, gradient checkpointing,
2 threads): glibc's heap alone peaks at 2.0 GB resident and grows step by step; one mmap per large
block holds 1.05 GB but makes each step ~35% slower (a page fault per 4 KiB); the cache holds
1.03 GB at a step time a little below glibc's.
"""

from __future__ import annotations

import os
import sys

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


def use_caching_allocator(cap_bytes: int | None = None) -> bool:
    """From now on, CPU tensors of 256 KiB or more come from the block cache (process-wide, Linux only).

    Returns False, changing nothing, where the C++ extension is not available or not on Linux.
    Calling it again only changes the cap.
    """
    if not sys.platform.startswith("linux") or not extension_available():
        return False
    torch.ops.qkernels_cpu.use_caching_allocator(default_cap() if cap_bytes is None else cap_bytes, MIN_BYTES)
    return True


def cached_bytes() -> int:
    """Bytes of freed blocks the cache holds for reuse (0 before `use_caching_allocator`)."""
    return int(torch.ops.qkernels_cpu.allocator_cached_bytes()) if extension_available() else 0
