"""NF4 quantization on CPU through the fused C++ kernel (cpu_quantize.cpp): the same NF4Weight as
`qformats.nf4.quantize_nf4`, byte for byte, several times faster.

The reference makes ~12 torch passes per chunk of the weight; the kernel reads each element once and
writes its packed nibble (absmax, nearest code and packing in one pass, blocks split over torch's
threads). Double quantization of the absmax (1/blocksize of the data) stays in qformats' torch code,
so the 8-bit scale codes, nested absmax and offset come from the reference itself.

Falls back to the reference, which it then equals trivially: off CPU, without the extension (no
compiler, QKERNELS_CPU_EXT=0), for input the reference rejects (it raises the error), and for a
weight with a NaN in it (the fp32 bits of a NaN absmax depend on which torch conversion routine
widened it, so only the reference reproduces them).
"""

from __future__ import annotations

import torch

from qformats.nf4 import (
    _NF4_MIDPOINTS,  # the reference's own fp32 midpoints: the kernel must compare against exactly these
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    SUPPORTED_INPUT_DTYPES,
    NF4Weight,
    quantize_absmax_dq,
)
from qformats.nf4 import quantize_nf4 as quantize_nf4_reference
from qkernels import cpu

# Elements per thread task. A SmolLM2 linear (0.3-0.9M weights) takes ~1 ms on one core; splitting
# that over two threads on a busy shared box waits for the slower one to be scheduled (bench/quantize.py).
PARALLEL_MIN_ELEMENTS = 1 << 20


def fast_path_available(weight: torch.Tensor) -> bool:
    """Whether `quantize_nf4(weight)` runs the C++ kernel (CPU tensor of a supported dtype, extension built)."""
    return (weight.device.type == "cpu" and weight.dtype in SUPPORTED_INPUT_DTYPES and weight.numel() > 0
            and cpu.extension_available())  # fmt: skip


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """`qformats.nf4.quantize_nf4`, identical output, through the fused C++ kernel when it can run."""
    if not fast_path_available(weight) or blocksize not in _BLOCKSIZES:
        return quantize_nf4_reference(weight, blocksize=blocksize, double_quant=double_quant)
    flat = weight.detach().reshape(-1).contiguous()
    n = flat.numel()
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8)
    nan_blocks = torch.ops.qkernels_cpu.quantize_nf4(flat, _NF4_MIDPOINTS, blocksize, absmax, packed,
                                                     PARALLEL_MIN_ELEMENTS)  # fmt: skip
    if nan_blocks:
        return quantize_nf4_reference(weight, blocksize=blocksize, double_quant=double_quant)
    w = NF4Weight(packed=packed.unsqueeze(1), absmax=absmax, quant_map=NF4_CODE.clone(), shape=tuple(weight.shape),
                  dtype=weight.dtype, blocksize=blocksize)  # fmt: skip
    if double_quant:
        w.absmax, w.nested_absmax, w.offset = quantize_absmax_dq(absmax)
        w.nested_quant_map = DYNAMIC_MAP_SIGNED.clone()
    return w


_BLOCKSIZES = {1 << k for k in range(5, 13)}  # 32..4096; anything else: the reference raises its error
