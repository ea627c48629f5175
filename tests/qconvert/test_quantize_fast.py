"""The fused C++ quantizer (qkernels/cpu_quantize) against the torch reference (qformats.nf4): the whole
NF4Weight byte for byte, on fresh random and adversarial inputs; and `qconvert quantize` output
identical with and without it."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
from test_quantize import tiny_llama

from qconvert.quantize import quantize_checkpoint
from qformats.errors import QError
from qformats.nf4 import _NF4_MIDPOINTS, NF4Weight
from qformats.nf4 import quantize_nf4 as reference
from qkernels import cpu, cpu_quantize
from qkernels.cpu_quantize import quantize_nf4_cpu as fast

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads-split"])
def threads(request, monkeypatch):
    """Run on one thread, and on two with the blocks split into small tasks (so a task boundary
    falls inside every tensor that has more than a few blocks)."""
    assert cpu.extension_available(), cpu._ext_state.get("error")
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    request.addfinalizer(lambda: torch.set_num_threads(saved))
    if request.param > 1:
        monkeypatch.setattr(cpu_quantize, "PARALLEL_MIN_ELEMENTS", 4096)
    return request.param


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so NaNs compare by payload and -0.0 differs from 0.0)."""
    return t.contiguous().view(torch.uint8)


def assert_identical(got: NF4Weight, want: NF4Weight) -> None:
    for field in ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        g, w = getattr(got, field), getattr(want, field)
        if w is None:
            assert g is None, field
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, field
        assert torch.equal(_bits(g), _bits(w)), f"{field} differs"
    assert (got.shape, got.dtype, got.blocksize, got.nested_blocksize) == (
        want.shape, want.dtype, want.blocksize, want.nested_blocksize)  # fmt: skip
    pack = struct.Struct("<d").pack
    assert (got.offset is None) == (want.offset is None)
    if want.offset is not None:
        assert pack(got.offset) == pack(want.offset) or (math.isnan(got.offset) and math.isnan(want.offset))
    if want.offset is None or not math.isnan(want.offset):
        assert got.quant_state_json() == want.quant_state_json()


def check(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    got = fast(w, blocksize=blocksize, double_quant=double_quant)
    assert_identical(got, reference(w, blocksize=blocksize, double_quant=double_quant))
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_random_weights_all_dtypes_and_blocksizes(threads, dtype, blocksize, double_quant):
    # Fresh inputs each run (seeded by the case, so a failure reproduces); numels: less than a block,
    # odd with a partial last block, whole blocks, several nested blocks plus a partial one.
    seed = zlib.crc32(repr((dtype, blocksize, double_quant, threads)).encode())
    g = torch.Generator().manual_seed(seed)
    for numel in (1, 7, blocksize - 1, blocksize, 3 * blocksize + 5, 257 * blocksize + 33, 300_001):
        scale = 10 ** torch.empty(1).uniform_(-4, 2, generator=g).item()
        check((torch.randn(numel, generator=g) * scale).to(dtype), blocksize, double_quant)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_and_strided_input(threads, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(130, 77, generator=g).to(dtype)
    for weight in (w, w.t(), w[:, 5:60], w.view(2, 65, 77), w[::3]):
        got = check(weight)
        assert got.shape == tuple(weight.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_special_blocks(threads, dtype, double_quant):
    """All-zero and -0.0 blocks, the largest finite values, +-inf, tiny (subnormal-absmax) blocks,
    a block of one nonzero value, and a partial last block of zeros."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 64, generator=g) * 0.02
    finfo = torch.finfo(dtype)
    w[1] = 0.0
    w[2] = -0.0
    w[3, ::2] = finfo.max
    w[3, 1::2] = -finfo.max
    w[4, 7] = float("inf")
    w[5, 9] = -float("inf")
    w[6] = torch.randn(64, generator=g) * finfo.tiny * 0.01  # subnormal in fp32/bf16: 1/absmax overflows
    w[6, :5] = 0.0
    w[7] = 0.0
    w[7, 30] = -3.0
    w[8] = torch.linspace(-1, 1, 64)
    w = w.to(dtype)
    for weight in (w, w[:11], torch.cat([w.reshape(-1), torch.zeros(37, dtype=dtype)])):
        got = check(weight, double_quant=double_quant)
    assert got.packed[32:64].eq(0x77).all(), "an all-zero block stores code 7 (byte 0x77)"


def test_values_on_the_midpoints_take_the_lower_code(threads):
    """Ties: x/absmax exactly on a midpoint counts it as not below (bucketize), its fp32 neighbours either side."""
    mids = _NF4_MIDPOINTS
    vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    vals = torch.cat([vals, -vals])
    w = torch.cat([torch.cat([torch.ones(1), chunk]) for chunk in vals.split(63)])  # absmax 1: x/absmax is x
    got = check(w, double_quant=False)
    assert got.absmax.eq(1.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_scales_make_degenerate_nested_blocks(threads, dtype):
    """Every scale equal to the mean (nested absmax 0: 0 * inf = NaN, coded as 0), in all, then some,
    nested blocks; and scales whose mean overflows fp32 (qformats' own double quantization runs)."""
    w = torch.ones(600, 64)
    check(w.to(dtype))
    w[256:300] *= -2.0
    w[599, 3] = 7.0
    check(w.to(dtype))
    if dtype != torch.float16:
        check((torch.ones(4, 64) * torch.finfo(dtype).max).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_weights_equal_the_reference(threads, dtype):
    """A NaN in the weight: the reference's result exactly (the fast path hands the weight to it)."""
    w = torch.randn(5, 64).to(dtype)
    w[2, 3] = float("nan")
    for double_quant in (True, False):
        got = check(w, double_quant=double_quant)
        assert got.packed[64:96].eq(0x77).all()


def test_more_than_32768_blocks_at_two_threads(threads):
    """torch's mean over >32768 scales splits by thread count; the fast path takes the same offset."""
    w = torch.randn(64 * 40_000 + 3, generator=torch.Generator().manual_seed(3)).half()
    check(w)


def test_given_offset_is_the_computed_one(threads):
    """The quantizer's scan hands the kernel the offset it computed from `block_absmax`: the same
    weight as computing it there."""
    w = torch.randn(64 * 40_000 + 3, generator=torch.Generator().manual_seed(4)).half()
    absmax = torch.empty(40_001)
    assert cpu_quantize.block_absmax(w, 64, absmax) == 0
    assert_identical(fast(w, offset=cpu_quantize.double_quant_offset(absmax)), reference(w))


def test_a_thread_cap_leaves_torchs_thread_count_alone(monkeypatch):
    """`threads` between one and torch's count splits the weight that many ways without touching
    torch's process-wide setting (the quantizer's scan thread computes offsets meanwhile)."""
    assert cpu.extension_available(), cpu._ext_state.get("error")
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        monkeypatch.setattr(cpu_quantize, "PARALLEL_MIN_ELEMENTS", 4096)
        calls = []
        monkeypatch.setattr(torch, "set_num_threads", calls.append)
        w = torch.randn(300, 640, generator=torch.Generator().manual_seed(5)).half()
        got = fast(w, threads=2)
        assert calls == []
        monkeypatch.undo()
        assert_identical(got, reference(w))
    finally:
        torch.set_num_threads(saved)


def test_falls_back_to_the_reference(monkeypatch):
    w = torch.randn(100, 33)
    monkeypatch.setattr(cpu, "extension_available", lambda: False)
    assert not cpu_quantize.fast_path_available(w)
    check(w)
    monkeypatch.undo()
    assert cpu_quantize.fast_path_available(w)
    assert not cpu_quantize.fast_path_available(w.to(torch.int8))


def test_bad_input_gives_the_reference_errors():
    for args, message in [((torch.randn(64), 48), "blocksize 48"), ((torch.randn(64), 8192), "blocksize 8192"),
                          ((torch.ones(64, dtype=torch.int32), 64), "int32"), ((torch.empty(0), 64), "empty")]:  # fmt: skip
        with pytest.raises(QError, match=message):
            fast(*args)


def _checkpoint_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_checkpoint_identical_with_and_without_fast_path(tmp_path, monkeypatch, dtype):
    """The whole output folder byte for byte; and on CPU the reference is never called for finite weights."""
    src = tiny_llama(tmp_path / "src", hidden=72, intermediate=100, vocab=333, dtype=dtype)

    def no_reference(*args, **kwargs):
        raise AssertionError("qconvert quantize did not take the C++ path")

    monkeypatch.setattr(cpu_quantize, "quantize_nf4_reference", no_reference)
    quantize_checkpoint(src, tmp_path / "fast", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "extension_available", lambda: False)  # the scan and the kernel: the reference
    quantize_checkpoint(src, tmp_path / "ref", progress=False)
    fast_files, ref_files = _checkpoint_bytes(tmp_path / "fast"), _checkpoint_bytes(tmp_path / "ref")
    assert fast_files.keys() == ref_files.keys()
    for name in fast_files:
        assert fast_files[name] == ref_files[name], f"{name} differs"
