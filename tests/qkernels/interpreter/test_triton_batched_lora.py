"""The batched-LoRA Triton kernels (qkernels.triton_batched_lora), run by the Triton interpreter on CPU
tensors, against the torch reference (`qkernels.ops.batched_lora_reference_`) and an fp64 product.

Run in a process of their own (the variable must be set before triton is imported):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/qkernels/interpreter/test_triton_batched_lora.py

Shapes are tiny and odd (not multiples of the tiles), rows mix adapters of different ranks and
rows with none, small tiles force several input-feature splits and output blocks.
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

from qkernels import triton_batched_lora
from qkernels.ops import batched_lora_reference_

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SMALL_TILES = {"BLOCK_K": 16, "SPLIT_K": 3, "BLOCK_N": 16}


def make_adapters(ranks, k, n, dtype, seed=0):
    """Stacked A [len, r_max, in] and B [len, out, r_max], zero past each rank; scales; int32 ranks."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    a = torch.zeros(len(ranks), r_max, k)
    b = torch.zeros(len(ranks), n, r_max)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, k, generator=g) / 4
        b[i, :, :r] = torch.randn(n, r, generator=g) / 4
    scale = torch.rand(len(ranks), generator=g) + 0.5
    return a.to(dtype), b.to(dtype), scale, torch.tensor(ranks, dtype=torch.int32)


def exact(y, x, a, b, idx, scale):
    """fp64 result and the fp32-accumulation slack: |x| |A|^T |B|^T |scale| * 2^-20 per element."""
    ref, slack = y.double().clone(), torch.zeros(y.shape, dtype=torch.float64)
    for t, s in enumerate(idx.tolist()):
        if s >= 0:
            xs, As, Bs = x[t].double(), a[s].double(), b[s].double()
            ref[t] += scale[s].double() * (As @ xs) @ Bs.t()
            slack[t] = scale[s].double() * (As.abs() @ xs.abs()) @ Bs.abs().t() * 2**-20
    return ref, slack


def assert_tight(got, want, bound, dtype):
    """Within one rounding to dtype (eps * |value|) of `want`, plus fp32 summation slack."""
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want.double()).abs()
    limit = torch.finfo(dtype).eps * want.double().abs() + bound + 1e-7
    assert (err <= limit).all(), f"max error {err.max().item():.3g}"


# (T rows, in, out, ranks of the stacked adapters, each row's slot): odd sizes, mixed ranks, -1 = none.
CASES = [
    (1, 70, 37, (8,), (0,)),
    (5, 70, 37, (8, 3, 5), (0, -1, 2, 1, 0)),
    (7, 33, 130, (16, 1), (1, 1, -1, 0, 1, -1, 0)),
    (4, 100, 19, (24, 7, 12, 2), (3, 2, 1, 0)),
    (3, 17, 5, (4, 4), (-1, -1, 1)),
]


@pytest.mark.parametrize("t,k,n,ranks,slots", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_rank", [True, False])
def test_add_matches_reference(t, k, n, ranks, slots, dtype, with_rank):
    g = torch.Generator().manual_seed(t * 100 + k)
    a, b, scale, rank = make_adapters(ranks, k, n, dtype, seed=n)
    x = torch.randn(t, k, generator=g).to(dtype)
    y0 = torch.randn(t, n, generator=g).to(dtype)
    idx = torch.tensor(slots, dtype=torch.int32)
    rank = rank if with_rank else None
    y = triton_batched_lora.add_(y0.clone(), x, a, b, idx, scale, rank, config=SMALL_TILES)
    ref64, slack = exact(y0, x, a, b, idx, scale)
    assert_tight(y, ref64, slack, dtype)
    reference = batched_lora_reference_(y0.clone(), x, a, b, idx, scale, rank)
    assert_tight(y, reference, slack, dtype)
    none = idx < 0
    assert torch.equal(y[none], y0[none])  # rows without an adapter are not touched, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_config_and_no_scale(dtype):
    """The launch config `add_` picks itself (several splits on the 4-'SM' interpreter), scale None = 1."""
    a, b, _, rank = make_adapters((64, 5, 9), 300, 50, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    x, y0 = torch.randn(3, 300, generator=g).to(dtype), torch.randn(3, 50, generator=g).to(dtype)
    idx = torch.tensor([2, 0, 1], dtype=torch.int32)
    cfg = triton_batched_lora.batched_config(3, 50, 300, 64, x.device)
    assert cfg["SPLIT_K"] > 1 and triton_batched_lora.shrink(x, a, idx, rank).shape[0] > 1
    y = triton_batched_lora.add_(y0.clone(), x, a, b, idx, None, rank)
    ones = torch.ones(3)
    assert_tight(y, batched_lora_reference_(y0.clone(), x, a, b, idx, ones, rank), exact(y0, x, a, b, idx, ones)[1],
                 dtype)  # fmt: skip


def test_shrink_partials_sum_to_x_a():
    a, _, _, rank = make_adapters((6, 3), 45, 8, torch.float32, seed=3)
    x = torch.randn(4, 45, generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    h = triton_batched_lora.shrink(x, a, idx, rank, config=SMALL_TILES)
    assert h.shape == (3, 4, 6) and h.dtype == torch.float32
    want = torch.stack([a[s] @ x[t] for t, s in enumerate(idx.tolist())])
    torch.testing.assert_close(h.sum(0), want, rtol=1e-6, atol=1e-6)


def test_strided_rows_of_x_and_y():
    """Rows of x and y taken out of wider buffers: the kernels honour the row strides, y's padding untouched."""
    a, b, scale, rank = make_adapters((4, 2), 30, 12, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    xbuf, ybuf = torch.randn(3, 64, generator=g), torch.randn(3, 20, generator=g)
    x, y = xbuf[:, :30], ybuf[:, :12]
    idx = torch.tensor([0, 1, -1], dtype=torch.int32)
    before = ybuf.clone()
    triton_batched_lora.add_(y, x, a, b, idx, scale, rank, config=SMALL_TILES)
    want = batched_lora_reference_(before[:, :12].clone(), x, a, b, idx, scale, rank)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(ybuf[:, 12:], before[:, 12:])


def test_no_rows():
    a, b, scale, rank = make_adapters((4,), 8, 6, torch.float32)
    y = torch.empty(0, 6)
    triton_batched_lora.add_(y, torch.empty(0, 8), a, b, torch.empty(0, dtype=torch.int32), scale, rank)


def test_gpu_bench_batched_lora_checks_run_in_the_interpreter():
    """bench/gpu.py's batched-LoRA correctness checks (run before its timings) on tiny shapes."""
    path = Path(__file__).resolve().parents[3] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.check_batched_lora([(40, 96)], torch.device("cpu"))
    assert report and all(line.endswith("ok") for line in report), report
