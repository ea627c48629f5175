"""Triton kernels on the stored NF4 + double-quant format (CUDA; tests run them with TRITON_INTERPRET=1).

The kernels read exactly what is on disk, with no load-time relayout: packed nibbles (element 2k in
the high nibble of byte k of the row-major flattened weight), the uint8 scale codes, the fp32
nested scales and offset, and the stored 16-entry and 256-entry code maps.

- `dequantize(w, dtype)`: one pass, bytes in, fp16/bf16/fp32 out, bit-identical to
  `qformats.nf4.dequantize_nf4` (compiled with `enable_fp_fusion=False` so that
  `map[q] * nested + offset` is rounded twice, like the reference, not fused into one FMA).
- `fused_matmul`: y = x W^T (+ bias) with W dequantized in registers, tile
  by tile, never written out: the decode GEMV/GEMM (M = 1..16, one BLOCK_M 16 row tile, so each
  weight byte is read once). A tile is packed bytes [BLOCK_N, GROUPS, GROUP_BYTES] (contiguous,
  vectorizable) whose groups each lie in one 64-weight scale block: the block scales are decoded
  once per block ([BLOCK_N, GROUPS], from the 8-bit code and the nested scale), broadcast over
  their bytes, both nibbles looked up in the code map, and two tensor-core dots take x's even
  columns against the high-nibble values and x's odd columns against the low ones (no interleave).
  fp32 accumulation; split-K (fp32 atomics) when there are too few output tiles to fill the GPU.
  Bias, M, blocksize and the split count are arguments, not specializations: one
  compiled kernel per x dtype, double quant, scale groups a tile and split-or-not.
  tests/qkernels/test_triton_compile.py compiles every launched specialization for sm_80 and sm_90 and
  holds fp16/bf16 to <= 128 registers a thread with no spills.
- `dequant_matmul`: for large M, the weight dequantized to a temporary in x's dtype and cuBLAS.
- `linear`: picks between them (`TRITON_FUSED_MAX_M`); bench/gpu.py measures both on each shape.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qformats.nf4 import NF4Weight, valid_blocksize
from qkernels.nf4_args import kernel_args

# Under the interpreter a bf16/fp16 tl.dot returns garbage and fp32 -> bf16 casts truncate: dot
# operands are upcast to fp32 (after rounding W to x's dtype, so the product is the one the GPU
# computes) and bf16 rounding is done on the bits.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_FUSED_MAX_M = 16  # up to here the fused kernel; above, dequantize + cuBLAS (re-check with bench/gpu.py)
_DEQUANT_BLOCK = 1024  # bytes per program in the dequantize kernel


@triton.jit
def _round_to(v, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. The interpreter truncates fp32 -> bf16, so there
    the rounding is done on the bits; on the GPU it is the plain (RNE) conversion."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, blk, mask, DQ: tl.constexpr,
                  NESTED_BLOCKSIZE: tl.constexpr):  # fmt: skip
    """fp32 absmax of blocks `blk`: `map[q] * nested[blk // 256] + offset` with double quant.
    One return: the compiler type-checks every return of a function against the first."""
    if DQ:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_map_ptr + code) * nested + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit(do_not_specialize=["blocksize_log2"])
def _dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, qmap_ptr, nested_map_ptr, offset, out_ptr, numel,
                    blocksize_log2, NESTED_BLOCKSIZE: tl.constexpr, DQ: tl.constexpr,
                    GROUPS: tl.constexpr, GROUP_BYTES: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """GROUPS x GROUP_BYTES bytes a program; a group's bytes share one scale block (GROUP_BYTES
    divides blocksize / 2), so each scale is decoded once per group, not per element. The blocksize
    is an argument (its log2), not a specialization: one compiled kernel serves every blocksize."""
    pid = tl.program_id(0).to(tl.int64)
    BLOCK: tl.constexpr = GROUPS * GROUP_BYTES
    group = pid * GROUPS + tl.arange(0, GROUPS)
    offs = group[:, None] * GROUP_BYTES + tl.arange(0, GROUP_BYTES)[None, :]  # byte indices [GROUPS, GROUP_BYTES]
    mask = offs < (numel + 1) // 2
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    s = _block_scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, (2 * GROUP_BYTES * group) >> blocksize_log2,
                      group * (2 * GROUP_BYTES) < numel, DQ, NESTED_BLOCKSIZE)[:, None]  # fmt: skip
    hi = tl.load(qmap_ptr + (byte >> 4)) * s
    lo = tl.load(qmap_ptr + (byte & 15)) * s
    vals = _round_to(tl.reshape(tl.interleave(hi, lo), (2 * BLOCK,)), out_ptr.dtype.element_ty, INTERPRET)
    el = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + el, vals, mask=el < numel)


@triton.jit(do_not_specialize=["M", "split_k", "has_bias", "blocksize_log2"])
def _fused_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, qmap_ptr, nested_map_ptr, offset, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, split_k, has_bias, blocksize_log2,
    NESTED_BLOCKSIZE: tl.constexpr, DQ: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """A tile is [BLOCK_N rows, BLOCK_K columns] of W = [BLOCK_N, GROUPS, GROUP_BYTES] packed bytes,
    where the GROUP_BYTES bytes of a group share one scale block (K % blocksize == 0): the scales of
    a tile are decoded once, [BLOCK_N, GROUPS], and broadcast over their bytes."""
    GROUP_BYTES: tl.constexpr = BLOCK_K // (2 * GROUPS)
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_j = offs_g[:, None] * GROUP_BYTES + tl.arange(0, GROUP_BYTES)[None, :]  # byte j of a tile row: [G, B]
    m_mask, n_mask = offs_m < M, offs_n < N
    row_start = offs_n.to(tl.int64) * K  # flat index of each weight row (K even: starts on a byte)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, split_k)
    for t in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_tiles)):
        k0 = t * BLOCK_K
        group_k = k0 + offs_g * (2 * GROUP_BYTES)  # first column of each group
        s = _block_scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset,
                          (row_start[:, None] + group_k[None, :]) >> blocksize_log2,
                          n_mask[:, None] & (group_k < K)[None, :], DQ, NESTED_BLOCKSIZE)[:, :, None]  # fmt: skip
        kk = k0 + 2 * offs_j  # the even columns of this tile, [G, B]
        w_mask = n_mask[:, None, None] & (kk < K)[None, :, :]
        byte = tl.load(packed_ptr + (row_start[:, None, None] + kk[None, :, :]) // 2, mask=w_mask, other=0)
        byte = byte.to(tl.int32)
        kk = tl.reshape(kk, (BLOCK_K // 2,))
        x_mask = m_mask[:, None] & (kk < K)[None, :]
        xe = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
        xo = tl.load(x_rows + kk[None, :] + 1, mask=x_mask, other=0.0)
        # W rounded to x's dtype, as F.linear on the dequantized weight sees it.
        w_hi = _round_to(tl.reshape(tl.load(qmap_ptr + (byte >> 4)) * s, (BLOCK_N, BLOCK_K // 2)), xe.dtype, UPCAST)
        w_lo = _round_to(tl.reshape(tl.load(qmap_ptr + (byte & 15)) * s, (BLOCK_N, BLOCK_K // 2)), xe.dtype, UPCAST)
        if UPCAST:
            xe, xo, w_hi, w_lo = xe.to(tl.float32), xo.to(tl.float32), w_hi.to(tl.float32), w_lo.to(tl.float32)
        acc = tl.dot(xe, tl.trans(w_hi), acc, input_precision=PRECISION)
        acc = tl.dot(xo, tl.trans(w_lo), acc, input_precision=PRECISION)
    # The bias is added once, by the first K split. Two ifs: Triton's `and` does not take a tensor.
    if pid_k == 0:  # noqa: SIM102
        if has_bias:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if not ATOMIC:  # one K split: y in x's dtype; several: fp32 sums
        tl.store(y_ptrs, _round_to(acc, y_ptr.dtype.element_ty, UPCAST), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


def _weight_args(w: NF4Weight) -> tuple:
    """The kernels' six weight arguments (`kernel_args` order); without double quant, the unused nested
    pointers get stand-ins (a kernel argument cannot be None: it would compile another specialization)."""
    packed, absmax, nested_absmax, quant_map, nested_quant_map, offset = kernel_args(w)[:6]
    if not w.double_quant:
        nested_absmax, nested_quant_map = absmax, quant_map
    return packed, absmax, nested_absmax, quant_map, nested_quant_map, offset


def supports(w: NF4Weight) -> bool:
    """The kernels' layout assumptions: a valid NF4 blocksize (a power of two), so a byte never straddles
    two blocks and a tile's bytes split into whole blocks. Other weights take the torch reference."""
    return valid_blocksize(w.blocksize) and w.nested_blocksize > 0


def _fused_fits(w: NF4Weight) -> bool:
    """The fused kernel decodes scales per block of a row: each row must hold whole blocks."""
    return supports(w) and w.shape[1] % w.blocksize == 0


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole weight in `dtype` in one kernel pass."""
    dtype = dtype or w.dtype
    if not supports(w):
        from qformats.nf4 import dequantize_nf4

        return dequantize_nf4(w, dtype)
    out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    group_bytes = min(w.blocksize // 2, 32)
    grid = (triton.cdiv(w.packed.numel(), _DEQUANT_BLOCK),)
    _dequant_kernel[grid](*_weight_args(w), out, w.numel, w.blocksize.bit_length() - 1,
                          NESTED_BLOCKSIZE=w.nested_blocksize, DQ=w.double_quant,
                          GROUPS=_DEQUANT_BLOCK // group_bytes, GROUP_BYTES=group_bytes, INTERPRET=INTERPRET,
                          enable_fp_fusion=False)  # fmt: skip
    return out


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def fused_config(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Tile sizes, warps and split-K: enough programs to cover the GPU ~2x. One tile shape for every
    M: the kernel is for decode (linear takes it up to TRITON_FUSED_MAX_M rows); larger M tiles did not fit
    128 registers a thread (tests/qkernels/test_triton_compile.py checks this one). fp32 x takes a quarter of
    the K tile: its exact dot is not on tensor cores, and at BLOCK_K 64 it needs all 255 registers."""
    block_m, block_n, block_k = 16, 64, 32 if dtype == torch.float32 else 128
    if device.type != "cuda":
        n_sm = 4  # the interpreter: pretend 4 SMs, so tests exercise split-K
    else:
        n_sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    k_tiles = triton.cdiv(K, block_k)
    split = 1
    while tiles * split < 2 * n_sm and split * 2 <= max(1, k_tiles // 4):
        split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 8}


def fused_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, config: dict | None = None,
                 **launch) -> torch.Tensor:  # fmt: skip
    """y[M, N] = x[M, K] W^T (+ bias), in x's dtype.

    Rows of W that do not hold whole scale blocks (K % blocksize != 0: no real model's linears)
    take `dequant_matmul`. Bias and the split count are kernel arguments, not
    specializations: one compiled kernel per x dtype, double quant and tile config."""
    M, K = x.shape
    N = w.shape[0]
    assert K == w.shape[1], f"x has {K} features, the weight {list(w.shape)}"
    if not _fused_fits(w):
        return dequant_matmul(x, w, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = dict(config or fused_config(M, N, K, x.device, x.dtype))
    split = cfg.pop("SPLIT_K")
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if split > 1 else x.new_empty(M, N)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
    # No FMA contraction: W's scale `map[q] * nested + offset` is rounded twice, as in dequantize.
    launch.setdefault("enable_fp_fusion", False)
    _fused_matmul_kernel[grid](
        x, *_weight_args(w), bias if bias is not None else x, y, M, N, K, x.stride(0), y.stride(0), split,
        int(bias is not None), w.blocksize.bit_length() - 1, NESTED_BLOCKSIZE=w.nested_blocksize,
        DQ=w.double_quant, GROUPS=max(1, cfg["BLOCK_K"] // w.blocksize), ATOMIC=split > 1, UPCAST=INTERPRET,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg, **launch,
    )  # fmt: skip
    return y.to(x.dtype) if split > 1 else y


def dequant_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large M: dequantize W to x's dtype, then cuBLAS."""
    return F.linear(x, dequantize(w, x.dtype), bias)


def linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` in x's dtype, any leading dims of x."""
    N, K = w.shape
    x2 = x.reshape(-1, K)
    if x2.shape[0] <= TRITON_FUSED_MAX_M and _fused_fits(w):
        y = fused_matmul(x2, w, bias)
    else:
        y = dequant_matmul(x2, w, bias)
    return y.view(*x.shape[:-1], N)
