"""Every Triton kernel in qkernels, run by the Triton interpreter on CPU tensors, against the torch reference.

Run in a process of their own (the variable must be set before triton is imported):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/qkernels/interpreter

What this proves: the kernels' indexing, masking, nibble order, double-quant decode, split-K and
bias epilogue compute the right numbers for odd shapes. What it cannot: GPU speed, and GPU-only
numerics (bench/gpu.py re-checks every kernel on the card before timing it).
"""

import os

assert os.environ.get("TRITON_INTERPRET") == "1", (
    "tests/qkernels/interpreter needs TRITON_INTERPRET=1 set before triton is imported: "
    "run `TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/qkernels/interpreter` in its own process"
)

import importlib.util
from pathlib import Path

import pytest
import torch

from qformats.nf4 import dequantize_nf4, quantize_nf4
from qkernels import triton_nf4

DTYPES = [torch.float16, torch.bfloat16]
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}  # so that tiny shapes still span many tiles


def make_weight(n, k, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(n, k, generator=g), blocksize=blocksize, double_quant=double_quant)


def reference(x, w, bias=None):
    """F.linear on the reference dequantization in x's dtype, accumulated in fp64; also the size
    of the result, which bounds its rounding error."""
    y = x.double() @ dequantize_nf4(w, x.dtype).double().t()
    if bias is not None:
        y += bias.double()
    return y, y.abs()


def assert_close(y, ref, x, w, dtype):
    """One rounding of y to dtype, plus fp32 accumulation error."""
    ref, size = ref
    assert y.dtype == dtype and y.shape == ref.shape
    accumulation = (x.double().abs() @ dequantize_nf4(w).double().abs().t()) * 2**-20
    bound = size * torch.finfo(dtype).eps + accumulation
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-6).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("n,k,blocksize,dq", [(37, 70, 64, True), (16, 128, 128, False), (5, 33, 64, True),
                                              (300, 256, 64, True), (9, 96, 128, True), (5, 96, 32, True),
                                              (6, 2048, 4096, True), (3, 2048, 4096, False)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_is_bit_identical(n, k, blocksize, dq, dtype):
    w = make_weight(n, k, blocksize, dq, seed=n + k)
    assert torch.equal(triton_nf4.dequantize(w, dtype), dequantize_nf4(w, dtype))


# (M, N, K, blocksize, double quant, bias, split-K): odd M and N, K not a multiple of the tile,
# >256 blocks (several nested scales), with and without bias and split-K, blocksizes below, at
# and above the K tile. Blocks straddling rows (K % blocksize != 0) take the dequantize path
# inside fused_matmul.
CASES = [
    (1, 37, 70, 64, True, False, 1),
    (3, 37, 70, 64, True, True, 2),
    (16, 20, 200, 128, True, False, 1),
    (5, 48, 130, 64, False, True, 4),
    (1, 130, 256, 128, False, False, 2),
    (7, 33, 512, 64, True, True, 3),
    (1, 37, 192, 64, True, False, 1),
    (3, 37, 320, 64, True, True, 2),
    (16, 20, 384, 128, True, False, 1),
    (5, 48, 96, 32, False, True, 4),
    (2, 19, 512, 256, True, True, 2),
]


@pytest.mark.parametrize("m,n,k,blocksize,dq,has_bias,split", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matmul(m, n, k, blocksize, dq, has_bias, split, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = make_weight(n, k, blocksize, dq, seed=k)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    y = triton_nf4.fused_matmul(x, w, bias, config={**SMALL_TILES, "SPLIT_K": split})
    assert_close(y, reference(x, w, bias), x, w, dtype)


@pytest.mark.parametrize("blocksize,dq", [(32, True), (64, True), (64, False), (256, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_matmul_default_config(blocksize, dq, dtype):
    """The tiles fused_config ships (BLOCK_K 128 or 64, so 1, 2 or 4 scale blocks a tile row)."""
    g = torch.Generator().manual_seed(blocksize)
    w = make_weight(70, 512, blocksize, dq, seed=3)
    x = torch.randn(3, 512, generator=g).to(dtype)
    y = triton_nf4.fused_matmul(x, w)
    assert_close(y, reference(x, w), x, w, dtype)


def test_fused_matmul_rows_without_whole_blocks_take_dequantize():
    w = make_weight(21, 70, 64)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(triton_nf4.fused_matmul(x, w), triton_nf4.dequant_matmul(x, w))


def test_fused_matmul_fp32_x_and_strided_rows():
    w = make_weight(24, 96)
    x = torch.randn(4, 192)[:, :96]  # row stride 192
    y = triton_nf4.fused_matmul(x, w, config={**SMALL_TILES, "SPLIT_K": 2})
    ref, _ = reference(x, w)
    bound = (x.double().abs() @ dequantize_nf4(w).double().abs().t()) * 2**-20
    assert y.dtype == torch.float32 and ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_dispatch(dtype):
    """linear(): the default config (split-K chosen for a 4-'SM' device) for small M, dequantize +
    matmul for large M and for odd K; leading dims kept."""
    g = torch.Generator().manual_seed(7)
    for m, k in ((3, 64), (triton_nf4.TRITON_FUSED_MAX_M + 4, 64), (2, 65)):
        w = make_weight(40, k, seed=k)
        x = torch.randn(1, m, k, generator=g).to(dtype)
        bias = torch.randn(40, generator=g).to(dtype)
        y = triton_nf4.linear(x, w, bias)
        assert y.shape == (1, m, 40)
        assert_close(y[0], reference(x[0], w, bias), x[0], w, dtype)


def test_default_config_splits_k_for_decode():
    cfg = triton_nf4.fused_config(1, 4096, 4096, torch.device("cpu"))
    assert cfg["BLOCK_M"] == 16 and cfg["SPLIT_K"] >= 1
    big = triton_nf4.fused_config(1, 64, 8192, torch.device("cpu"))
    assert big["SPLIT_K"] > 1  # one output tile: the K loop is split to occupy more programs


def test_gpu_bench_checks_run_in_the_interpreter():
    """bench/gpu.py's correctness checks (the part that runs before any timing) on tiny shapes."""
    path = Path(__file__).resolve().parents[3] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.check_kernels([(40, 96)], rows=(1, 5, 20), device=torch.device("cpu"))
    assert report and all(line.endswith("ok") for line in report), report
