"""The whole decode step in one parallel region (qkernels/cpu_decode_stack.cpp, `qkernels.cpu.decode_stack`)
against the per-layer fused calls of `Decoder.decode_fused` it replaces: the same bits, any thread count."""

import pytest
import torch
from tiny_models import save_tiny

from qconvert.quantize import quantize_checkpoint
from qkernels import cpu
from qserve.loader import load_model

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.fixture(autouse=True)
def cpu_kernels_built():
    assert cpu.extension_available(), cpu._ext_state.get("error")


def nf4_tiny(family: str, tmp_path, **overrides):
    # intermediate 128: every weight's rows hold whole 64-blocks, which the stack's kernel needs.
    save_tiny(family, tmp_path / "fp32", intermediate_size=128, num_hidden_layers=3, **overrides)
    quantize_checkpoint(tmp_path / "fp32", tmp_path / "nf4", progress=False)
    return tmp_path / "nf4"


def per_layer(model) -> None:
    """Make `model` run `decode_fused`'s per-layer calls (the reference) instead of the stack."""
    model.model._decode_stack = lambda fused: None
    model.model._fused = None


@pytest.mark.parametrize("family", ["smollm2", "qwen2", "mistral"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_stack_equals_per_layer_calls(family, threads, tmp_path):
    """Rows at different positions in given slots, biases (Qwen2), a sliding window shorter than the
    sequences (Mistral); one, two and more threads than cores (2 here): logits and caches bit for bit."""
    path = nf4_tiny(family, tmp_path)
    stack, ref = load_model(path), load_model(path)
    per_layer(ref)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (11, 5, 8)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for m in (stack, ref):
                m.setup_cache(max_batch=4, max_seq=32)
                m.prefill(prompts, [2, 0, 3])
            pos, slots = torch.tensor([11, 5, 8]), torch.tensor([2, 0, 3])
            tokens = torch.tensor([p[-1] for p in prompts])
            for step in range(10):
                kv_len = int(pos.max()) + 1 if step % 2 else None
                got, want = stack.decode(tokens, pos, slots, kv_len), ref.decode(tokens, pos, slots, kv_len)
                assert torch.equal(got, want)
                tokens, pos = want.argmax(-1), pos + 1
            assert (stack.model._fused[2] is not None) == AVX512 and ref.model._fused[2] is None
            for a, b in zip(stack.model.layers, ref.model.layers):
                assert torch.equal(a.self_attn.kv_cache.k, b.self_attn.kv_cache.k)
                assert torch.equal(a.self_attn.kv_cache.v, b.self_attn.kv_cache.v)
    finally:
        torch.set_num_threads(before)


def test_stack_follows_a_replaced_cache_and_stands_aside_for_wrappers_and_qk_norms(tmp_path):
    """The stack holds the caches' tensors: a cache buffer replaced between steps is the one the next
    step writes. A wrapped module (an adapter's wrapper) or q/k norms (Qwen3) leave the per-layer calls."""
    path = nf4_tiny("smollm2", tmp_path)
    stack, ref = load_model(path), load_model(path)
    per_layer(ref)
    with torch.no_grad():
        for m in (stack, ref):
            m.setup_cache(max_batch=2, max_seq=32)
            m.prefill([[5, 6, 7]], [0])
        tokens, pos = torch.tensor([9]), torch.tensor([3])
        assert torch.equal(stack.decode(tokens, pos), ref.decode(tokens, pos))
        for m in (stack, ref):
            cache = m.model.layers[1].self_attn.kv_cache
            cache.k = cache.k.clone()
        assert torch.equal(stack.decode(tokens, pos + 1), ref.decode(tokens, pos + 1))
        a, b = stack.model.layers[1].self_attn.kv_cache.k, ref.model.layers[1].self_attn.kv_cache.k
        assert torch.equal(a, b) and a[0, :, 4].abs().sum() > 0
        assert (stack.model._fused[2] is not None) == AVX512
        mlp = stack.model.layers[0].mlp
        mlp.up_proj = torch.nn.Sequential(mlp.up_proj)
        stack.decode(tokens, pos + 2)
        assert stack.model._fused[2] is None

    qwen3 = load_model(nf4_tiny("qwen3", tmp_path / "q3"))
    with torch.no_grad():
        qwen3.setup_cache(max_batch=1, max_seq=16)
        qwen3.decode(torch.tensor([5]), torch.tensor([0]))
    assert qwen3.model._fused[2] is None


def test_stack_refuses_bad_input_with_a_message(tmp_path):
    """Out-of-cache positions fail with one line on either path; the stack's own checks name the field at
    fault. Without AVX-512 the stack is never built (the per-layer calls run, tested above)."""
    path = nf4_tiny("smollm2", tmp_path)
    m = load_model(path)
    with torch.no_grad():
        m.setup_cache(max_batch=2, max_seq=16)
        m.decode(torch.tensor([5]), torch.tensor([0]))
        stack = m.model._fused[2]
        assert (stack is not None) == AVX512
        with pytest.raises(RuntimeError, match="outside the cache"):
            m.decode(torch.tensor([5, 6]), torch.tensor([3, 16]))
        with pytest.raises(RuntimeError, match="outside the cache"):
            m.decode(torch.tensor([5]), torch.tensor([3]), torch.tensor([2]))
        layers = m.model._fused[0]
        args = {"biases": [[None] * 7] * 3, "norms": [layers[0].input_norm] * 7,
                "k_caches": [f.kv_cache.k for f in layers], "v_caches": [f.kv_cache.v for f in layers],
                "windows": [0] * 3, "rope_table": m.model.rope_table, "heads": 4, "eps": 1e-5}  # fmt: skip
        weights = [[mod.nf4_weight for mod in (*f.qkv.modules, *f.o.modules, *f.gate_up.modules, *f.down.modules)]
                   for f in layers]  # fmt: skip
        if not AVX512:
            assert cpu.decode_stack(weights, **args) is None
            return
        with pytest.raises(RuntimeError, match="x must be contiguous float32"):
            stack.run(torch.zeros(1, 32), torch.tensor([0]), torch.tensor([1]), 16)
        with pytest.raises(RuntimeError, match="int64"):
            stack.run(torch.zeros(1, 64), torch.tensor([0], dtype=torch.int32), torch.tensor([1]), 16)
        assert cpu.decode_stack(weights, **args) is not None
        swapped = [[ws[1], ws[0], *ws[2:]] for ws in weights]  # k where q belongs: wrong shapes
        with pytest.raises(RuntimeError, match="layer 0 weight 0 is 32 x 64, expected 64 x 64"):
            cpu.decode_stack(swapped, **args)
        with pytest.raises(RuntimeError, match="norms"):
            cpu.decode_stack(weights, **{**args, "norms": args["norms"][:-1]})
        with pytest.raises(RuntimeError, match="heads"):
            cpu.decode_stack(weights, **{**args, "heads": 3})
