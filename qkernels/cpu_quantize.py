"""NF4 quantization on CPU through the fused C++ kernel (cpu_quantize.cpp): the same NF4Weight as
`qformats.nf4.quantize_nf4` (the reference), byte for byte, faster. Callers reach it as
`qkernels.ops.quantize_nf4`, the CPU entry of that op's table.

The reference makes ~12 torch passes per chunk of the weight; the kernel reads each element once and
writes its packed nibble (absmax, nearest code and packing in one pass, blocks split over torch's
threads). Double quantization of the absmax (1/blocksize of the data) is a second C++ op after torch
computes the offset `absmax.mean()` exactly as the reference does: torch's summation order depends on
its thread count, so the offset's last bit does too, and both paths take the same one. (On a
SmolLM2-sized weight the reference's ~15 small torch ops for this cost as much as the whole kernel.)

Falls back to the reference, which it then equals trivially: off CPU, without the extension (no
compiler, QKERNELS_CPU_EXT=0), for input the reference rejects (it raises the error), and for a
weight with a NaN in it (the fp32 bits of a NaN absmax depend on which torch conversion routine
widened it, so only the reference reproduces them). Scales with an infinite mean (an inf in the
weight) are double-quantized by qformats' own `quantize_absmax_dq`.
"""

from __future__ import annotations

import math

import torch

# _DYNAMIC_CELLS, _NF4_MIDPOINTS: the reference's own fp32 midpoints; the kernels compare against exactly these.
from qformats.nf4 import (
    _DYNAMIC_CELLS,
    _NF4_MIDPOINTS,
    DYNAMIC_MAP_SIGNED,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    SUPPORTED_INPUT_DTYPES,
    NF4Weight,
    quantize_absmax_dq,
    valid_blocksize,
)
from qformats.nf4 import quantize_nf4 as quantize_nf4_reference
from qkernels import cpu

# Elements per thread below which a weight runs on one thread. A SmolLM2 linear (0.1-0.9M weights)
# takes under a millisecond on one core; forking it over two threads on a busy shared box can wait
# longer than that for the second one to be scheduled. Set 0 to always split.
PARALLEL_MIN_ELEMENTS = 1 << 20


def fast_path_available(weight: torch.Tensor) -> bool:
    """Whether `quantize_nf4_cpu(weight)` runs the C++ kernel (CPU tensor of a supported dtype, extension built)."""
    return (weight.device.type == "cpu" and weight.dtype in SUPPORTED_INPUT_DTYPES and weight.numel() > 0
            and cpu.extension_available())  # fmt: skip


def _grain(threads: int | None, numel: int, blocksize: int) -> int:
    """The grain (elements per thread) to pass the C++ kernels so that they run on at most `threads`
    of torch's threads (None: all) over `numel` elements in blocks of `blocksize`. One thread is a
    grain no weight reaches; a count in between, a grain that splits this tensor that many ways.
    Never `torch.set_num_threads`: that is process-wide, and the quantizer's scan thread meanwhile
    computes offsets whose last bit depends on torch's thread count."""
    if threads is None or threads >= torch.get_num_threads():
        return PARALLEL_MIN_ELEMENTS
    if threads <= 1:
        return 1 << 62
    return max(PARALLEL_MIN_ELEMENTS, -(-numel // (threads * blocksize)) * blocksize)


def quantize_nf4_cpu(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                     threads: int | None = None, offset: float | None = None) -> NF4Weight:  # fmt: skip
    """`qformats.nf4.quantize_nf4`, identical output, through the fused C++ kernel when it can run.

    `threads` caps the kernel's threads (its output does not depend on them); the offset's mean
    runs at torch's thread count whatever it is, since that decides its last bit. `offset`: the
    weight's `double_quant_offset`, when the caller already computed it from `block_absmax` (the
    quantizer's scan), saves computing it again (a parallel op: a thread wake-up per weight)."""
    if not fast_path_available(weight) or not valid_blocksize(blocksize):
        return quantize_nf4_reference(weight, blocksize=blocksize, double_quant=double_quant)
    flat = weight.detach().reshape(-1).contiguous()
    n = flat.numel()
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8)
    grain = _grain(threads, n, blocksize)
    nan_blocks = torch.ops.qkernels_cpu.quantize_nf4(flat, _NF4_MIDPOINTS, blocksize, absmax, packed, grain)
    if nan_blocks:
        return quantize_nf4_reference(weight, blocksize=blocksize, double_quant=double_quant)
    w = NF4Weight(packed=packed.unsqueeze(1), absmax=absmax, quant_map=NF4_CODE.clone(), shape=tuple(weight.shape),
                  dtype=weight.dtype, blocksize=blocksize)  # fmt: skip
    if double_quant:
        w.absmax, w.nested_absmax, w.offset = _double_quantize(absmax, threads, offset)
        w.nested_quant_map = DYNAMIC_MAP_SIGNED.clone()
    return w


def block_absmax(flat: torch.Tensor, blocksize: int, out: torch.Tensor, threads: int | None = None) -> int:
    """The fp32 block absmax that `quantize_nf4_cpu` computes, into `out`, without the codes (memory-bound):
    `flat` is a contiguous 1-D slice of whole blocks (the last may be partial) with
    `fast_path_available(flat)`. Returns how many blocks hold a NaN or an inf."""
    return torch.ops.qkernels_cpu.block_absmax(flat, blocksize, out, _grain(threads, flat.numel(), blocksize))


def double_quant_offset(absmax: torch.Tensor) -> float:
    """The double-quant offset of a weight's fp32 block absmax, as `quantize_nf4_cpu` stores it."""
    return absmax.mean().item()  # the reference's own call (see the module docstring)


def _double_quantize(absmax: torch.Tensor, threads: int | None, offset: float | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
    """`qformats.nf4.quantize_absmax_dq(absmax)`, identical output: (uint8 codes, nested_absmax, offset)."""
    offset = double_quant_offset(absmax) if offset is None else offset
    if not math.isfinite(offset):
        return quantize_absmax_dq(absmax)
    codes = torch.empty(absmax.numel(), dtype=torch.uint8)
    nested = torch.empty(-(-absmax.numel() // NESTED_BLOCKSIZE), dtype=torch.float32)
    torch.ops.qkernels_cpu.quantize_absmax_dq(absmax, offset, _DYNAMIC_CELLS.midpoints, NESTED_BLOCKSIZE, codes,
                                              nested, _grain(threads, absmax.numel(), NESTED_BLOCKSIZE))  # fmt: skip
    return codes, nested, offset

