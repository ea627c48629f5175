"""Triton kernels for batched LoRA (punica-style BGMV): every row of x uses its own adapter, or none.

    y[t] += scale[s] * (x[t] @ A[s]^T) @ B[s]^T      with s = idx[t]; idx[t] < 0 adds nothing

over the adapters of one linear stacked on a first axis: A [n, r_max, in], B [n, out, r_max],
scale [n] (optional), rank [n] (optional: adapters of lower rank are zero-padded to r_max, and with
their rank given the kernels never read the padding).

- `shrink(x, a, idx, rank)`: h = x A[idx]^T as fp32 partial sums [splits, T, r_max], one program
  per (row, slice of the input features); the slices give a decode step (T = 1..16 rows) enough
  programs to keep the GPU busy, and writing partials instead of atomics needs no zeroed buffer.
- `expand_(y, h, b, idx, scale, rank)`: sums the slices, scales, and adds h B[idx]^T into y in
  place, one program per (row, block of output features): each element of y is read and written
  once, with one rounding to y's dtype (the fp32 sum y + delta).
- `add_`: both; what `qkernels.ops.batched_lora_add_` calls for CUDA tensors.

Why per row and not tensor-core tiles of rows: in a decode step neighbouring rows belong to
different requests, so a tile of rows would need a different A/B for each row. Each row is two
matrix-vector products, bound by reading its adapter's A and B (from L2 when rows share one).
Products and sums are fp32 whatever the input dtype (elementwise multiply + tl.sum, no tl.dot,
so the interpreter computes what the GPU does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkernels.triton_nf4 import INTERPRET, _round_to, _sm_count

# fp32 products per program and step: BLOCK_R x BLOCK_K in shrink, BLOCK_N x BLOCK_R in expand.
# At 4096, shrink compiled for sm_90 holds 120-150 registers a thread (rank 16-64) and no spills;
# 8192 took 181-255.
_TILE_ELEMENTS = 4096


@triton.jit
def _rank_columns(rank_ptr, slot, R, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr):
    """The rank columns and which of them adapter `slot` uses: its own rank when ranks are given
    (the zero padding is never read), else all r_max."""
    offs_r = tl.arange(0, BLOCK_R)
    rank = R
    if HAS_RANK:
        rank = tl.load(rank_ptr + slot)
    return offs_r, offs_r < rank


@triton.jit(do_not_specialize=["stride_hs"])  # T * r_max: one compiled kernel for every batch size
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, rank_ptr, h_ptr, K, R, k_per_split, stride_xt, stride_an, stride_ar,
                   stride_hs, stride_ht, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(idx_ptr + t)
    if slot >= 0:
        offs_r, r_mask = _rank_columns(rank_ptr, slot, R, HAS_RANK, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + slot.to(tl.int64) * stride_an + offs_r[:, None] * stride_ar
        x_row = x_ptr + t.to(tl.int64) * stride_xt
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            kk = k + offs_k
            k_mask = kk < k_end
            xv = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
            av = tl.load(a_rows + kk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += av * xv[None, :]
        h = tl.sum(acc, axis=1)
        tl.store(h_ptr + split * stride_hs + t * stride_ht + offs_r, h, mask=offs_r < R)


@triton.jit(do_not_specialize=["splits", "stride_hs"])  # vary with the batch size
def _expand_kernel(y_ptr, h_ptr, b_ptr, idx_ptr, scale_ptr, rank_ptr, N, R, splits, stride_yt, stride_hs,
                   stride_ht, stride_bn, stride_bo, HAS_SCALE: tl.constexpr, HAS_RANK: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, EMULATE_RNE: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(idx_ptr + t)
    if slot >= 0:
        offs_r, r_mask = _rank_columns(rank_ptr, slot, R, HAS_RANK, BLOCK_R)
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s in range(splits):
            h += tl.load(h_ptr + s * stride_hs + t * stride_ht + offs_r, mask=r_mask, other=0.0)
        if HAS_SCALE:
            h = h * tl.load(scale_ptr + slot).to(tl.float32)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        b_rows = b_ptr + slot.to(tl.int64) * stride_bn + offs_n.to(tl.int64)[:, None] * stride_bo
        b = tl.load(b_rows + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(b * h[None, :], axis=1)
        y_ptrs = y_ptr + t.to(tl.int64) * stride_yt + offs_n
        y = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, _round_to(y + delta, y_ptr.dtype.element_ty, EMULATE_RNE), mask=n_mask)


def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM; the interpreter pretends 4 SMs so that tests exercise the splits."""
    if device.type != "cuda":
        return 8
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def block_r(r_max: int) -> int:
    return max(16, triton.next_power_of_2(r_max))


def batched_config(tokens: int, out_features: int, in_features: int, r_max: int, device: torch.device) -> dict:
    """Tiles and input-feature splits: 4096 fp32 products per program, enough programs to fill the GPU."""
    want, tokens = _programs_wanted(device), max(tokens, 1)
    br = block_r(r_max)
    block_k = max(16, min(_TILE_ELEMENTS // br, triton.next_power_of_2(in_features)))
    split = max(1, min(triton.cdiv(in_features, block_k), triton.cdiv(want, tokens)))
    block_n = _TILE_ELEMENTS // br
    while block_n > 32 and tokens * triton.cdiv(out_features, block_n) < want:
        block_n //= 2
    return {"BLOCK_K": block_k, "SPLIT_K": split, "BLOCK_N": max(16, block_n)}


def shrink(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, rank: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """fp32 partial sums [splits, T, r_max] of x[T, in] A[idx]^T; rows with idx < 0 are left unwritten."""
    T, K = x.shape
    R = a.shape[1]
    cfg = config or batched_config(T, 1, K, R, x.device)
    block_k = cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, block_k), cfg["SPLIT_K"]) * block_k
    splits = triton.cdiv(K, k_per_split)
    h = torch.empty(splits, T, R, dtype=torch.float32, device=x.device)
    if T == 0:
        return h
    if x.stride(1) != 1:
        x = x.contiguous()
    a = a.contiguous()
    _shrink_kernel[(T, splits)](x, a, idx, rank if rank is not None else idx, h, K, R, k_per_split, x.stride(0),
                                a.stride(0), a.stride(1), h.stride(0), h.stride(1), HAS_RANK=rank is not None,
                                BLOCK_R=block_r(R), BLOCK_K=block_k)  # fmt: skip
    return h


def expand_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor | None = None,
            rank: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """y[T, out] += scale[idx] * sum(h) B[idx]^T in place, one rounding to y's dtype; returns y."""
    T, N = y.shape
    R = b.shape[2]
    if T == 0:
        return y
    assert y.stride(1) == 1, "expand_ writes y in place: its last dimension must be contiguous"
    cfg = config or batched_config(T, N, 1, R, y.device)
    b = b.contiguous()
    grid = (T, triton.cdiv(N, cfg["BLOCK_N"]))
    _expand_kernel[grid](y, h, b, idx, scale if scale is not None else idx, rank if rank is not None else idx, N, R,
                         h.shape[0], y.stride(0), h.stride(0), h.stride(1), b.stride(0), b.stride(1),
                         HAS_SCALE=scale is not None, HAS_RANK=rank is not None, BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_R=block_r(R), EMULATE_RNE=INTERPRET)  # fmt: skip
    return y


def add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor,
         scale: torch.Tensor | None = None, rank: torch.Tensor | None = None,
         config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """y[T, out] += scale[idx] * (x A[idx]^T) B[idx]^T in place (idx int32, < 0: no adapter); returns y."""
    cfg = config or batched_config(x.shape[0], y.shape[1], x.shape[1], a.shape[1], x.device)
    return expand_(y, shrink(x, a, idx, rank, cfg), b, idx, scale, rank, cfg)
