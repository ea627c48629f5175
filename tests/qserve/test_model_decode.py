"""The fused decode step (qkernels/cpu_decode.cpp, `Decoder.decode_fused`) against the unfused one."""

import pytest
import torch
from tiny_models import FAMILIES, save_tiny

from qkernels import cpu
from qserve.loader import load_model


@pytest.fixture(autouse=True)
def cpu_kernels_built():
    """The fused step needs the C++ CPU kernels: fail loudly, as tests/qkernels does, when they did not build."""
    assert cpu.extension_available(), cpu._ext_state.get("error")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_decode_equals_unfused(family, tmp_path):
    """Rows at different positions, in given slots and in slots 0..B-1, a sliding window (Mistral's 8)
    shorter than the sequences, q/k norms (Qwen3), biases (Qwen2): logits and the cache it writes agree."""
    save_tiny(family, tmp_path)
    fused, plain = load_model(tmp_path), load_model(tmp_path)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (11, 5, 8)]
    with torch.no_grad():
        for m in (fused, plain):
            m.setup_cache(max_batch=4, max_seq=32)
            m.prefill(prompts, [2, 0, 3])
        assert fused.model.rope_table is not None
        plain.model.rope_table = None  # the unfused path
        pos, slots = torch.tensor([11, 5, 8]), torch.tensor([2, 0, 3])
        tokens = torch.tensor([p[-1] for p in prompts])
        for step in range(12):
            kv_len = int(pos.max()) + 1 if step % 2 else None
            want, got = plain.decode(tokens, pos, slots, kv_len), fused.decode(tokens, pos, slots, kv_len)
            assert rel_err(got, want) < 1e-5
            tokens, pos = want.argmax(-1), pos + 1
        a, b = fused.model.layers[1].self_attn.kv_cache, plain.model.layers[1].self_attn.kv_cache
        assert rel_err(a.k, b.k) < 1e-5 and rel_err(a.v, b.v) < 1e-5
        # Slots 0..B-1 (slots None), as the engine's contiguous batches and Generator decode.
        for m in (fused, plain):
            m.prefill(prompts[:2], [0, 1])
        pos, tokens = torch.tensor([11, 5]), torch.tensor([prompts[0][-1], prompts[1][-1]])
        assert rel_err(fused.decode(tokens, pos), plain.decode(tokens, pos)) < 1e-5


def test_fused_decode_off_when_it_cannot_run(tmp_path):
    """bf16 compute, or a cache in any dtype but fp32, keeps the unfused step."""
    save_tiny("smollm2", tmp_path)
    m = load_model(tmp_path, dtype=torch.bfloat16)
    m.setup_cache(max_batch=1, max_seq=16)
    assert m.model.rope_table is None
    m = load_model(tmp_path)
    m.setup_cache(max_batch=1, max_seq=16, dtype=torch.bfloat16)
    assert m.model.rope_table is None


def test_fused_decode_refuses_a_position_outside_the_cache(tmp_path):
    save_tiny("smollm2", tmp_path)
    m = load_model(tmp_path)
    with torch.no_grad():
        m.setup_cache(max_batch=2, max_seq=16)
        with pytest.raises(RuntimeError, match="outside the cache"):
            m.decode(torch.tensor([5, 6]), torch.tensor([3, 16]))
        with pytest.raises(RuntimeError, match="outside the cache"):
            m.decode(torch.tensor([5]), torch.tensor([3]), torch.tensor([2]))


def test_fused_decode_on_nf4_follows_modules_and_weights_replaced_between_steps(tmp_path):
    """On an NF4 model the fused step prepares each layer's kernel arguments once (`LinearsOfOneInput`);
    a module wrapped after a step (as an adapter's wrapper is) or a weight reloaded after a step is
    what the next step uses, and batches past the fused kernel's rows take the modules' own forward."""
    from qconvert.quantize import quantize_checkpoint
    from qserve.nf4_linear import NF4Linear

    save_tiny("smollm2", tmp_path / "fp32")
    quantize_checkpoint(tmp_path / "fp32", tmp_path / "nf4", progress=False)
    fused, plain = load_model(tmp_path / "nf4"), load_model(tmp_path / "nf4")
    assert type(fused.model.layers[0].mlp.down_proj) is NF4Linear

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    rows = cpu.CPU_FUSED_MAX_M + 1
    prompts = [torch.randint(3, 256, (4 + i % 5,)).tolist() for i in range(rows)]
    with torch.no_grad():
        for m in (fused, plain):
            m.setup_cache(max_batch=rows, max_seq=32)
            m.prefill(prompts, range(rows))
        plain.model.rope_table = None
        pos = torch.tensor([len(p) for p in prompts])
        tokens = torch.tensor([p[-1] for p in prompts])

        def step(n: int) -> None:
            nonlocal pos, tokens
            want, got = plain.decode(tokens[:n], pos[:n]), fused.decode(tokens[:n], pos[:n])
            assert rel_err(got, want) < 1e-5
            tokens[:n], pos[:n] = want.argmax(-1), pos[:n] + 1

        step(3)
        assert fused.model._fused[0][0].qkv.args is not None  # the prepared NF4 path ran
        for m in (fused, plain):
            m.model.layers[1].mlp.down_proj = Doubled(m.model.layers[1].mlp.down_proj)
        step(3)
        assert fused.model._fused[0][1].down.args is None
        for m in (fused, plain):  # layer 1's q_proj now holds layer 0's weight
            q0 = m.model.layers[0].self_attn.q_proj.state_dict()
            m.model.layers[1].self_attn.q_proj.load_state_dict(q0)
        step(3)
        step(rows)
