"""The one order in which every NF4 kernel takes a weight: the C++ CPU ops (cpu_nf4.cpp), the Triton
kernels (triton_nf4.py) and the custom ops of qkernels.ops all receive an `NF4Weight` as `kernel_args(w)`,
or a prefix of it."""

from __future__ import annotations

from qformats.nf4 import NF4Weight


def kernel_args(w: NF4Weight) -> tuple:
    """`(packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
    out_features, in_features)` of a 2-D weight; the nested entries are None without double quant."""
    return (w.packed.contiguous(), w.absmax, w.nested_absmax, w.quant_map, w.nested_quant_map, float(w.offset or 0.0),
            w.blocksize, w.nested_blocksize, w.shape[0], w.shape[1])  # fmt: skip
