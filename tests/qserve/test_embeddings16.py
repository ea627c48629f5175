"""16-bit embeddings and output layer: the C++ GEMV against its torch reference, exactness of the
conversion, and SmolLM2's logits and greedy text unchanged (qserve/embeddings16.py, qkernels/cpu_linear16.cpp)."""

import pytest
import torch

from qkernels import cpu, ops
from qserve.embeddings16 import Linear16, exact_16bit, hold_embeddings_16bit
from qserve.generate import Generator, SamplingParams
from qserve.loader import load_model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 17])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 7), (37, 101), (130, 576), (3, 8)])
def test_linear16_matches_fp64_reference(dtype, m, n, k, monkeypatch):
    """Every row tile and column tail, both thread splits (PARALLEL_MIN_WEIGHTS tiny) and the chunked path (M=17)."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WEIGHTS", 64)
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ w.double().T
    y = cpu.linear16(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # fp32 products of exact fp32 widenings, fp32 sums: only the summation order differs.
    tol = 1e-6 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - ref).abs() <= tol + 1e-30).all()


def test_linear16_keeps_leading_dims_and_strided_weight():
    w = torch.randn(64, 96).half()
    x = torch.randn(2, 3, 96)
    y = ops.linear16(x, w.T.contiguous().T)  # a non-contiguous weight is made contiguous
    torch.testing.assert_close(y, x @ w.float().T, rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 3, 64)


def test_linear16_with_autograd_takes_the_torch_path():
    w = torch.randn(9, 16).bfloat16()
    x = torch.randn(2, 16, requires_grad=True)
    ops.linear16(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.float().sum(0).expand(2, 16))


def test_exact_16bit_never_rounds():
    half_exact = torch.randn(50, 8).half().float()
    assert exact_16bit(half_exact).dtype == torch.float16
    bf16_only = torch.tensor([1e-8, 3e5, 1.0]).bfloat16().float()  # out of fp16's range, exact in bf16
    assert exact_16bit(bf16_only).dtype == torch.bfloat16
    assert exact_16bit(torch.tensor([1.0 + 2**-20])) is None


def test_smollm2_logits_and_greedy_unchanged(smollm2_fp16_dir):
    """Tied 49152 x 576 weight held in fp16: logits within 1e-3 relative of the fp32 model, same greedy tokens."""
    ref_model, model = load_model(smollm2_fp16_dir), load_model(smollm2_fp16_dir)
    assert hold_embeddings_16bit(model)
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert isinstance(model.lm_head, Linear16) and model.lm_head.weight is model.model.embed_tokens.weight
    assert not hold_embeddings_16bit(model)  # already 16-bit: nothing to do
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 17, 900]])
    with torch.inference_mode():
        want, got = ref_model(tokens), model(tokens)
        assert got.dtype == torch.float32
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=())
    prompt = tokens[0].tolist()
    # Generator holds the weights in 16 bits itself; the fp32 reference model's own decode loop is the baseline.
    assert Generator(model).generate([prompt], params)[0].token_ids == _greedy_fp32(ref_model, prompt, 24)
    assert model.model.layers[0].self_attn.kv_cache.k.dtype == torch.float32


def _greedy_fp32(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]
