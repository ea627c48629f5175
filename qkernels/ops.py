"""One dispatch entry per op on the NF4 format, registered as torch.library custom ops.

`nf4_linear(x, w, bias)` computes `x @ dequantize(w).T + bias` without keeping a dequantized
copy of the weight; `dequantize(w, dtype)` materialises it. On CUDA the ops run Triton kernels,
on CPU a torch path. Fake (meta) implementations let torch.compile trace through them.
"""

from __future__ import annotations

import torch

from qformats.nf4 import NF4Weight, dequantize_nf4

_LIB = "qkernels"


def _weight(packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
            out_features, in_features, dtype) -> NF4Weight:  # fmt: skip
    return NF4Weight(packed=packed, absmax=absmax, quant_map=quant_map, shape=(out_features, in_features),
                     dtype=dtype, blocksize=blocksize, nested_absmax=nested_absmax,
                     nested_quant_map=nested_quant_map, offset=offset if nested_absmax is not None else None,
                     nested_blocksize=nested_blocksize)  # fmt: skip


@torch.library.custom_op(f"{_LIB}::nf4_linear", mutates_args=())
def _nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
    quant_map: torch.Tensor, nested_quant_map: torch.Tensor | None, offset: float, blocksize: int,
    nested_blocksize: int, out_features: int, in_features: int, bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    w = _weight(packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
                out_features, in_features, x.dtype)  # fmt: skip
    return torch.nn.functional.linear(x, dequantize_nf4(w, x.dtype), bias)


@_nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
      out_features, in_features, bias):  # fmt: skip
    return x.new_empty(*x.shape[:-1], out_features)


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for an NF4 weight W of shape [out, in], computed in x's dtype."""
    return _nf4_linear(x, w.packed, w.absmax, w.nested_absmax, w.quant_map, w.nested_quant_map,
                       float(w.offset or 0.0), w.blocksize, w.nested_blocksize, w.shape[0], w.shape[1], bias)  # fmt: skip


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full weight in `dtype` (default: the dtype it was quantized from)."""
    return dequantize_nf4(w, dtype)
