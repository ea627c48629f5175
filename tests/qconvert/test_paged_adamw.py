"""PagedAdamW against torch.optim.AdamW (32-bit) and bitsandbytes' AdamW8bit (8-bit), paged and not."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from qconvert.paged_adamw import PagedAdamW, dequantize_blockwise, quantize_blockwise
from qformats.errors import QError
from qformats.nf4 import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED

# Odd sizes, one under bnb's 8-bit threshold (4096), one spanning several small pages.
SHAPES = [(64, 96), (3, 7), (300,), (128, 257), (16, 1000)]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def run(make_opt, steps=40, seed=0, drop_every=7):
    """Train params on random grads; every `drop_every` steps one param has no grad (skipped, as torch does)."""
    params = make_params(seed)
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g) * (1 + i)
            if t % drop_every == 3 and i == t % len(params):
                p.grad = None
        opt.step()
    return params, opt


def groups(params, **kw):
    return [{"params": params[:2], "weight_decay": 0.1, "lr": 3e-3}, {"params": params[2:], **kw}]


def test_dynamic_maps_equal_bitsandbytes():
    assert torch.equal(DYNAMIC_MAP_UNSIGNED, bnbf.create_dynamic_map(signed=False))
    assert torch.equal(DYNAMIC_MAP_SIGNED, bnbf.create_dynamic_map(signed=True).cpu())


def test_blockwise_quantization_is_nearest_and_matches_bnb():
    x = torch.randn(256 * 40) * torch.rand(256 * 40) ** 4
    for code in (DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED):
        v = x if code is DYNAMIC_MAP_SIGNED else x.abs()
        codes, absmax = quantize_blockwise(v, code)
        scaled = v.view(-1, 256) / absmax.unsqueeze(1)
        # Nearest by brute force; a value halfway between two codes (up to the rounding of v / absmax)
        # may take either.
        nearest = (scaled.reshape(-1, 1) - code).abs().min(dim=1).values
        assert ((scaled.reshape(-1) - code[codes.long()]).abs() - nearest).max() <= 1e-7
        bnb_codes, bnb_absmax = bnbf.quantize_blockwise(v, code=code, blocksize=256)
        assert torch.equal(absmax, bnb_absmax.absmax)
        # bnb's CPU build approximates the search (mostly next to zero, where the map is dense):
        # same code on most values, never a closer one than ours, decoded values within 2% of the block's absmax.
        assert (codes == bnb_codes).float().mean() > 0.8
        ours = dequantize_blockwise(codes, absmax, code)
        theirs = bnbf.dequantize_blockwise(bnb_codes, bnb_absmax)
        slack = 1e-6 * absmax.repeat_interleave(256)  # a tie up to rounding may go either way
        assert ((ours - v).abs() <= (theirs - v).abs() + slack).all()
        assert ((ours - theirs).abs().view(-1, 256) <= 0.02 * absmax.unsqueeze(1)).all()


@pytest.mark.parametrize("paged", [False, True])
def test_32bit_equals_torch_adamw(paged):
    budget = {"page_bytes": 4096, "budget_bytes": 3 * 4096} if paged else {}
    ours, opt = run(lambda ps: PagedAdamW(groups(ps), lr=1e-3, betas=(0.8, 0.99), **budget), steps=60)
    ref, _ = run(lambda ps: torch.optim.AdamW(groups(ps), lr=1e-3, betas=(0.8, 0.99), foreach=False), steps=60)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if paged:
        assert opt.page_transfers > 0


def test_8bit_tracks_bitsandbytes_and_32bit():
    steps = 30
    ours, opt = run(lambda ps: PagedAdamW(ps, lr=1e-2, optim_bits=8), steps=steps)
    theirs, _ = run(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2), steps=steps)
    full, _ = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2), steps=steps)
    start = make_params()
    assert opt.param_bits == [8, 32, 32, 8, 8]  # under 4096 elements: 32-bit state, as in bitsandbytes
    for a, b, c, p0 in zip(ours, theirs, full, start):
        moved = (c - p0).abs().mean()  # how far 32-bit AdamW moved the weights
        # Both 8-bit runs agree far more tightly with each other than with 32-bit AdamW.
        assert (a - b).abs().mean() < 0.01 * moved, (a - b).abs().mean() / moved
        assert (a - c).abs().mean() < 0.05 * moved, (a - c).abs().mean() / moved


@pytest.mark.parametrize("bits", [32, 8])
def test_tiny_budget_bounds_resident_state_and_changes_nothing(bits):
    page, budget = 2048, 2 * 2048
    make = lambda ps, **kw: PagedAdamW(groups(ps), optim_bits=bits, min_8bit_size=256, page_bytes=page, **kw)
    free, opt_free = run(make, steps=15)
    paged, opt = run(lambda ps: make(ps, budget_bytes=budget), steps=15)
    for a, b in zip(paged, free):
        assert torch.equal(a, b)
    assert opt.state_bytes > 4 * budget, "the test must page: state much larger than the budget"
    assert 0 < opt.peak_resident_bytes <= budget
    assert opt.page_transfers > len(opt._pages)
    sd, sd_free = opt.state_dict(), opt_free.state_dict()
    for i in sd["state"]:
        for k in sd["state"][i]:
            assert torch.equal(sd["state"][i][k], sd_free["state"][i][k]), (i, k)
    assert opt.evict() > 0 and opt.resident_bytes == 0


@pytest.mark.parametrize("bits", [32, 8])
def test_save_load_round_trip_continues_identically(tmp_path, bits):
    make = lambda ps: PagedAdamW(groups(ps), optim_bits=bits, min_8bit_size=256, page_bytes=4096, budget_bytes=8192)
    whole, _ = run(make, steps=14)
    params, opt = run(make, steps=7)
    opt.save(tmp_path / "optimizer.safetensors")
    fresh = make(params)
    fresh.load(tmp_path / "optimizer.safetensors")
    assert fresh._steps == opt._steps
    g = torch.Generator().manual_seed(1)
    for t in range(14):  # replay the same grad stream; apply the last 7
        grads = [torch.randn(p.shape, generator=g) * (1 + i) for i, p in enumerate(params)]
        for i, p in enumerate(params):
            p.grad = None if (t % 7 == 3 and i == t % len(params)) else grads[i]
        if t >= 7:
            fresh.step()
    for a, b in zip(params, whole):
        assert torch.equal(a, b)


def test_loads_torch_adamw_state_dict():
    params, ref = run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False), steps=5)
    ours = PagedAdamW(params, lr=1e-3)
    ours.load_state_dict(ref.state_dict())
    for p in params:
        p.grad = torch.ones_like(p)
    clone = [p.detach().clone().requires_grad_() for p in params]
    ref2 = torch.optim.AdamW(clone, lr=1e-3, foreach=False)
    ref2.load_state_dict(ref.state_dict())
    for p in clone:
        p.grad = torch.ones_like(p)
    ours.step()
    ref2.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_input(tmp_path):
    params = make_params()
    with pytest.raises(QError, match="smaller than one page"):
        PagedAdamW(params, page_bytes=4096, budget_bytes=1000)
    small = PagedAdamW(params, budget_bytes=10_000)  # the 1 MiB default page shrinks to fit the budget
    assert max(small.page_bytes.values()) <= 5_000
    with pytest.raises(QError, match="8 or 32"):
        PagedAdamW(params, optim_bits=4)
    opt8 = PagedAdamW(params, optim_bits=8)
    opt8.save(tmp_path / "o.safetensors")
    with pytest.raises(QError, match="8-bit optimizer state"):
        PagedAdamW(params).load(tmp_path / "o.safetensors")
    PagedAdamW(params).save(tmp_path / "o32.safetensors")
    with pytest.raises(QError, match="does not match"):
        PagedAdamW(params[:2]).load(tmp_path / "o32.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(QError, match="junk.safetensors"):
        PagedAdamW(params).load(tmp_path / "junk.safetensors")
