"""The CPU path of qkernels (fused C++ kernel and the pure-torch fallback) against the reference and bitsandbytes."""

from __future__ import annotations

import os
import subprocess
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F

from qformats.errors import QError
from qformats.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from qkernels import cpu, ops
from qkernels.nf4_args import kernel_args

# (out, in, blocksize, double quant): odd K, blocks straddling rows, partial last blocks, no DQ;
# rows of whole blocks (the AVX-512 decode path) with row counts that leave tails of its row tiles.
WEIGHTS = [(77, 33, 64, True), (65, 130, 128, True), (96, 576, 128, True), (33, 576, 256, False),
           (40, 200, 256, True), (129, 1536, 64, False), (7, 9, 64, False), (70, 576, 64, True),
           (37, 1024, 32, True)]  # fmt: skip
XDTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 2, 3, 5, 9, 16, 17, 70]  # groups of 8, 4, 2, 1 in the fused kernel; 17+ dequantize + oneDNN/MKL


@pytest.fixture(params=["extension", "extension-threaded", "torch"])
def path(request, monkeypatch):
    """Run a test through the C++ kernels (one task, and row ranges split over two threads) and
    again through the pure-torch fallback."""
    if request.param.startswith("extension"):
        assert cpu.extension_available(), cpu._ext_state.get("error")
    else:
        monkeypatch.setattr(cpu, "supports", lambda w: False)
    if request.param == "extension-threaded":
        monkeypatch.setattr(cpu, "PARALLEL_MIN_WEIGHTS", 64)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    return request.param


def make_weight(n, k, blocksize, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(n, k, generator=g), blocksize=blocksize, double_quant=double_quant)


def reference(x, w, bias=None):
    """The spec: the reference dequantization in fp32, then an fp64 matmul (so only our rounding shows)."""
    y = x.double() @ dequantize_nf4(w, torch.float32).double().t()
    return y + bias.double() if bias is not None else y


def assert_close_to(y, ref, x, w, dtype):
    """fp32 accumulation: error within a few ulps of sum |x||w|; bf16/fp16 output: one rounding of y."""
    bound = (x.double().abs() @ dequantize_nf4(w, torch.float32).double().abs().t()) * 2**-21 + 1e-30
    if dtype != torch.float32:
        bound = bound + ref.abs() * torch.finfo(dtype).eps
    assert y.dtype == dtype
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound there {bound[err == err.max()][0]:.3g}"


@pytest.mark.parametrize("n,k,blocksize,dq", WEIGHTS)
def test_dequantize_is_bit_identical(path, n, k, blocksize, dq):
    w = make_weight(n, k, blocksize, dq)
    for dtype in XDTYPES:
        assert torch.equal(ops.dequantize(w, dtype), dequantize_nf4(w, dtype))
    out = torch.full((n * k,), float("nan"))
    rows = cpu.dequantize_rows(w, 3, n - 4, out)  # a chunk that starts and ends mid-block
    assert torch.equal(rows, dequantize_nf4(w, torch.float32)[3 : n - 1])


@pytest.mark.parametrize("n,k,blocksize,dq", WEIGHTS)
def test_linear_matches_reference(path, n, k, blocksize, dq):
    w = make_weight(n, k, blocksize, dq, seed=n)
    g = torch.Generator().manual_seed(k)
    for dtype in XDTYPES:
        for m in ROWS:
            x = torch.randn(m, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
            y = ops.nf4_linear(x, w, bias)
            assert_close_to(y, reference(x, w, bias), x, w, dtype)


def test_linear_keeps_leading_dims_and_handles_strided_x(path):
    w = make_weight(48, 64, 64, True)
    x = torch.randn(2, 3, 128)[..., ::2]  # non-contiguous
    y = ops.nf4_linear(x, w)
    assert y.shape == (2, 3, 48)
    assert_close_to(y.reshape(6, 48), reference(x.reshape(6, 64), w), x.reshape(6, 64), w, torch.float32)
    assert ops.nf4_linear(torch.randn(0, 64), w).shape == (0, 48)


def test_linear_fp32_is_x_at_w_transposed():
    """oneDNN where torch has it (the training forward and the output layer), F.linear otherwise."""
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((1, 8, 4), (17, 33, 65), (300, 576, 1536)):
        x, w = torch.randn(m, 2 * k, generator=g)[:, ::2], torch.randn(n, k, generator=g)  # strided x
        torch.testing.assert_close(cpu.linear_fp32(x, w), (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-4)
    x16 = torch.randn(20, 8, generator=g).bfloat16()
    assert torch.equal(cpu.linear_fp32(x16, x16[:3]), F.linear(x16, x16[:3]))


def test_large_weight_goes_through_scratch_chunks(path, monkeypatch):
    monkeypatch.setattr(cpu, "_CHUNK_ELEMS", 64 * 100)  # force several chunks of 100 rows
    w = make_weight(250, 64, 64, True)
    x = torch.randn(20, 64)
    assert_close_to(ops.nf4_linear(x, w), reference(x, w), x, w, torch.float32)


def test_matches_bitsandbytes_on_its_own_quantization(path):
    """bitsandbytes quantizes; we read its packed bytes and states like a checkpoint loader would."""
    src = torch.randn(192, 320, dtype=torch.bfloat16)
    packed, st = bnbf.quantize_4bit(src, blocksize=64, quant_type="nf4", compress_statistics=True)
    w = NF4Weight(packed=packed, absmax=st.absmax, quant_map=st.code, shape=tuple(st.shape), dtype=st.dtype,
                  blocksize=st.blocksize, nested_absmax=st.state2.absmax, nested_quant_map=st.state2.code,
                  offset=st.offset.item())  # fmt: skip
    assert torch.equal(ops.dequantize(w), bnbf.dequantize_4bit(packed, st))
    for m in (1, 8, 40):
        x = torch.randn(m, 320, dtype=torch.bfloat16)
        theirs = bnb.matmul_4bit(x, packed.t(), quant_state=st)
        ours = ops.nf4_linear(x, w)
        # Both round to bf16 at the end; bitsandbytes also rounds W to bf16 first.
        tol = 4 * torch.finfo(torch.bfloat16).eps * (x.float().abs() @ ops.dequantize(w, torch.float32).abs().t())
        assert ((ours.float() - theirs.float()).abs() <= tol + 1e-3).all()


def test_autograd_through_the_ops():
    w = make_weight(40, 72, 64, True)
    wf = dequantize_nf4(w, torch.float32)
    x = torch.randn(5, 72, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    gy = torch.randn(5, 40)
    ops.nf4_linear(x, w, bias).backward(gy)
    ours = [t.grad.clone() for t in (x, bias)]
    for t in (x, bias):
        t.grad = None
    F.linear(x, wf, bias).backward(gy)
    for mine, theirs in zip(ours, (x.grad, bias.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    x.grad = None
    ops.nf4_linear(x, w).backward(gy)
    torch.testing.assert_close(x.grad, gy @ wf, rtol=1e-5, atol=1e-5)


def test_torch_compile_through_the_ops():
    w = make_weight(64, 96, 64, True)
    bias = torch.randn(64)

    def f(x):
        return ops.nf4_linear(x, w).relu() + ops.nf4_linear(x, w, bias) + ops.dequantize(w)[:, 0]

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 3, 16):
        x = torch.randn(m, 96)
        torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_clear_error():
    w = make_weight(8, 64, 64, True)
    with pytest.raises(QError, match=r"x has 32 features, the NF4 weight \[8, 64\] expects 64"):
        ops.nf4_linear(torch.randn(2, 32), w)


def test_cpu_path_never_imports_triton():
    """Launching Triton on a CPU-only machine fails ("0 active drivers"): the CPU path must not touch it."""
    code = (
        "import sys, torch\n"
        "from qformats.nf4 import quantize_nf4\n"
        "from qkernels import ops\n"
        "w = quantize_nf4(torch.randn(8, 64))\n"
        "ops.nf4_linear(torch.randn(2, 64), w); ops.dequantize(w)\n"
        "assert 'triton' not in sys.modules and 'qkernels.triton_nf4' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_fused_kernel_portable_loop_for_any_k():
    """The C++ gemm op's element-by-element loop (K % 32 != 0, odd K): ops.py routes such shapes to
    dequantize + BLAS, but the op itself must still be right."""
    assert cpu.extension_available()
    for n, k, blocksize, dq in [(9, 33, 64, True), (20, 70, 128, False), (6, 200, 64, True)]:
        w = make_weight(n, k, blocksize, dq)
        x = torch.randn(3, k)
        y = torch.ops.qkernels_cpu.gemm(x, *kernel_args(w), 64)
        assert_close_to(y, reference(x, w), x, w, torch.float32)


def test_inference_mode_then_no_grad(path):
    """The scratch buffer outlives calls: made under inference_mode, it must still be writable after."""
    cpu._scratch.__dict__.pop("buf", None)
    w = make_weight(48, 64, 64, True)
    x = torch.randn(40, 64)
    with torch.inference_mode():
        first = ops.nf4_linear(x, w)
    with torch.no_grad():
        torch.testing.assert_close(ops.nf4_linear(x, w), first, rtol=0, atol=0)


@pytest.mark.parametrize("k,blocksize,dq", [(576, 64, True), (576, 128, False), (1024, 32, True), (130, 128, True)])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17])
def test_linears_of_one_input_equal_one_call_each(path, k, blocksize, dq, m):
    """`LinearsOfOneInput` (the decode step's NF4 linears of one input in one C++ `gemm_many` call:
    one parallel region over all their rows) equals `nf4_linear` on each weight bit for bit, for
    row counts that leave tile tails, on every path (K = 130 and 17 rows take each module's forward)."""
    from qserve.nf4_linear import LinearsOfOneInput, NF4Linear

    def linears(weights):
        parent = torch.nn.Module()
        for i, w in enumerate(weights):
            parent.add_module(f"l{i}", NF4Linear(w))
        return LinearsOfOneInput(parent, [f"l{i}" for i in range(len(weights))])

    ws = [make_weight(n, k, blocksize, dq, seed=s) for s, n in enumerate([192, 64, 64, 37])]
    x = torch.randn(m, k)
    with torch.no_grad():
        ys = linears(ws).run(x)
        assert len(ys) == len(ws)
        for y, w in zip(ys, ws, strict=True):
            assert torch.equal(y, ops.nf4_linear(x, w))
        mixed = [ws[0], make_weight(64, k, blocksize * 2 if blocksize < 4096 else 32, dq)]  # blocksizes differ
        assert linears(mixed).args is None
        for y, w in zip(linears(mixed).run(x), mixed, strict=True):
            assert torch.equal(y, ops.nf4_linear(x, w))
        with pytest.raises((QError, RuntimeError), match="features|must be"):
            linears(ws).run(torch.randn(m, k + 1))
