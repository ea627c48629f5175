"""The NF4+DQ codec against bitsandbytes, byte for byte."""

import hashlib
import zlib

import bitsandbytes.functional as bnbf
import pytest
import torch

from qformats.errors import QError
from qformats.nf4 import (
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    NF4Weight,
    dequantize_absmax,
    dequantize_nf4,
    quantize_nf4,
)

SHAPES = [(64, 64), (4096, 64), (77, 33), (1, 1), (3,), (1000,), (257, 129), (576, 1536), (130, 64 * 256 + 3)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def bnb_quantize(w, blocksize=64, double_quant=True):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def assert_scale_codes_close(ours, bnb_codes, min_agreement=0.0):
    """8-bit scale codes: ours is the exact nearest; bitsandbytes' CPU lookup table is off by one
    now and then, and by a few codes right next to zero, where the map is dense (steps below 1e-5)."""
    diff = (ours.absmax.int() - bnb_codes.int()).abs()
    # A nested block whose scales all equal the mean has nested_absmax 0: any code decodes the same.
    degenerate = ours.nested_absmax[torch.arange(diff.numel()) // 256] == 0
    diff[degenerate] = 0
    decoded_gap = (DYNAMIC_MAP_SIGNED[ours.absmax.long()] - DYNAMIC_MAP_SIGNED[bnb_codes.long()]).abs()
    assert ((diff <= 1) | (decoded_gap < 1e-4)).all(), "8-bit scale code off by more than one"
    assert (diff == 0).float().mean().item() >= min_agreement
    return (diff == 0).sum().item(), diff.numel()


def assert_matches_bnb(w, blocksize=64, double_quant=True):
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    packed, state = bnb_quantize(w, blocksize, double_quant)
    assert torch.equal(ours.packed, packed), "4-bit codes differ from bitsandbytes"
    assert torch.equal(ours.quant_map, state.code)
    if double_quant:
        assert ours.offset == state.offset.item()
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_quant_map, state.state2.code)
        assert_scale_codes_close(ours, state.absmax)
    else:
        assert torch.equal(ours.absmax, state.absmax)
    theirs = bnbf.dequantize_4bit(packed, state)
    mine = dequantize_nf4(ours)
    assert mine.dtype == theirs.dtype == w.dtype and mine.shape == w.shape
    theirs = theirs.reshape(w.shape)  # bitsandbytes returns 1-D input as [1, n]
    same_scale = (ours.absmax == state.absmax) if double_quant else torch.ones(ours.absmax.numel(), dtype=torch.bool)
    same = same_scale.repeat_interleave(blocksize)[: w.numel()].view(w.shape)
    assert torch.equal(mine[same], theirs[same]), "weights differ where the scale codes agree"
    # Elsewhere: within one step of the 8-bit map times the nested scale (plus output rounding).
    step = (DYNAMIC_MAP_SIGNED.diff().abs().max() * ours.nested_absmax.max()).item() if double_quant else 0
    ulp = torch.finfo(w.dtype).eps * w.float().abs().max().item()
    assert (mine.float() - theirs.float()).abs().max().item() <= step + 2 * ulp
    return ours, packed, state


def test_dynamic_map_is_the_documented_one():
    digest = hashlib.sha256(DYNAMIC_MAP_SIGNED.numpy().astype("<f4").tobytes()).hexdigest()
    assert digest == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
    assert torch.equal(DYNAMIC_MAP_SIGNED, bnbf.create_dynamic_map(signed=True).cpu())
    assert NF4_CODE[7].item() == 0.0 and torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_equal_bitsandbytes(shape, dtype):
    torch.manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    assert_matches_bnb(torch.randn(shape, dtype=dtype) * 0.02)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_blocksizes_and_no_double_quant(blocksize, double_quant):
    torch.manual_seed(blocksize)
    assert_matches_bnb(torch.randn(300, 257, dtype=torch.float16), blocksize, double_quant)


def test_special_values():
    w = torch.zeros(5, 64, dtype=torch.float16)
    w[1] = 1.0
    w[2, 3] = -7.0
    w[3] = torch.linspace(-1, 1, 64)
    w[4, ::2] = 1e-4
    ours, _, _ = assert_matches_bnb(w)
    assert ours.packed[:32].eq(0x77).all(), "an all-zero block stores code 7 (byte 0x77)"


def test_scale_codes_agree_with_bitsandbytes_on_995_permille():
    agree = total = 0
    for seed, dtype in enumerate(DTYPES):
        torch.manual_seed(seed)
        w = torch.randn(2048, 2048, dtype=dtype) * 0.02
        _, state = bnb_quantize(w)
        a, t = assert_scale_codes_close(quantize_nf4(w), state.absmax)
        agree, total = agree + a, total + t
    assert agree / total >= 0.995


def test_roundtrip_error_equals_bitsandbytes():
    torch.manual_seed(1)
    w = torch.randn(1024, 1024, dtype=torch.float16)
    ours = dequantize_nf4(quantize_nf4(w)).float()
    packed, state = bnb_quantize(w)
    theirs = bnbf.dequantize_4bit(packed, state).float()
    err_ours = (ours - w.float()).pow(2).mean().sqrt().item()
    err_theirs = (theirs - w.float()).pow(2).mean().sqrt().item()
    assert err_ours == pytest.approx(err_theirs, rel=1e-3)


def test_dequantized_absmax_formula():
    torch.manual_seed(2)
    w = quantize_nf4(torch.randn(512, 512))
    idx = torch.arange(w.absmax.numel()) // 256
    expected = (w.nested_quant_map[w.absmax.long()] * w.nested_absmax[idx]) + torch.tensor(w.offset)
    assert torch.equal(dequantize_absmax(w), expected)


@pytest.mark.parametrize("double_quant", [True, False])
def test_tensor_roundtrip_through_disk_layout(double_quant):
    torch.manual_seed(3)
    w = quantize_nf4(torch.randn(96, 80, dtype=torch.bfloat16), double_quant=double_quant)
    tensors = w.to_tensors("model.layers.0.mlp.up_proj.weight")
    names = set(tensors)
    expected = {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight.absmax",
                "model.layers.0.mlp.up_proj.weight.quant_map",
                "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"}  # fmt: skip
    if double_quant:
        expected |= {"model.layers.0.mlp.up_proj.weight.nested_absmax",
                     "model.layers.0.mlp.up_proj.weight.nested_quant_map"}  # fmt: skip
    assert names == expected
    back = NF4Weight.from_tensors("model.layers.0.mlp.up_proj.weight", tensors)
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(w))
    assert back.dtype == torch.bfloat16 and back.shape == (96, 80)


def test_quant_state_json_matches_bitsandbytes():
    torch.manual_seed(4)
    w = torch.randn(64, 128, dtype=torch.float16)
    ours = quantize_nf4(w)
    _, state = bnb_quantize(w)
    theirs = state.as_dict(packed=True)
    blob = ours.to_tensors("p")["p.quant_state.bitsandbytes__nf4"]
    import json

    mine = json.loads(bytes(blob.numpy()))
    bnb_json = json.loads(bytes(theirs["quant_state.bitsandbytes__nf4"].numpy()))
    assert mine == bnb_json


def test_bad_input():
    with pytest.raises(QError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(QError, match="int32"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    w = quantize_nf4(torch.randn(64, 64))
    tensors = w.to_tensors("x")
    tensors["x.absmax"] = tensors["x.absmax"][:10]
    with pytest.raises(QError, match="x: absmax"):
        NF4Weight.from_tensors("x", tensors)
    del tensors["x.quant_map"]
    with pytest.raises(QError, match="x.quant_map"):
        NF4Weight.from_tensors("x", tensors)
