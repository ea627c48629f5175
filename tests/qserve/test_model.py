"""qserve.model against transformers: logits, the KV cache, config reading, autograd."""

import json

import pytest
import torch
from tiny_models import FAMILIES, save_tiny
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from qformats.errors import QError
from qserve.loader import load_model
from qserve.model_config import ModelArgs, rope_inv_freq


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(request.param, out)
    return hf, load_model(out), out


def test_logits_equal_transformers(tiny):
    hf, ours, _ = tiny
    tokens = torch.randint(3, 256, (3, 24))  # longer than the Mistral sliding window (8)
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4


def test_left_padding_mask_equals_transformers(tiny):
    hf, ours, _ = tiny
    tokens = torch.randint(3, 256, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits
        got = ours(tokens, attention_mask=mask)
    assert rel_err(got[0], ref[0]) < 1e-4
    assert rel_err(got[1, 5:], ref[1, 5:]) < 1e-4  # padding positions are don't-care


def test_cache_prefill_decode_equals_full_forward(tiny):
    _, ours, _ = tiny
    tokens = torch.randint(3, 256, (2, 20))
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_cache(max_batch=4, max_seq=32)
        slots = torch.tensor([3, 1])
        steps = [ours(tokens[:, :12], torch.arange(12).expand(2, 12), slots)]
        for i in range(12, 20):
            steps.append(ours(tokens[:, i : i + 1], torch.full((2, 1), i), slots, kv_len=i + 1 if i % 2 else None))
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


def test_slots_at_different_lengths(tiny):
    """Rows at different positions in one decode batch, a slot refilled while another keeps going."""
    _, ours, _ = tiny
    a, b, c = torch.randint(3, 256, (10,)), torch.randint(3, 256, (6,)), torch.randint(3, 256, (4,))
    with torch.no_grad():
        ours.setup_cache(max_batch=2, max_seq=16)
        ours.prefill([a[:9].tolist()], [0])
        ours.prefill([b[:5].tolist()], [1])
        step = ours.decode(torch.stack([a[9], b[5]]), torch.tensor([9, 5]), torch.tensor([0, 1]))
        assert rel_err(step[0], ours(a[None])[0, -1]) < 1e-5
        assert rel_err(step[1], ours(b[None])[0, -1]) < 1e-5
        # Slot 1 gets a new, shorter sequence; the stale entries of b beyond its length are masked.
        last = ours.logits(ours.prefill([c.tolist()], [1]), torch.tensor([3]))[0]
        assert rel_err(last, ours(c[None])[0, -1]) < 1e-5
        step = ours.decode(torch.stack([a[9], c[3]]), torch.tensor([10, 4]), torch.tensor([0, 1]))
        assert rel_err(step[1], ours(torch.cat([c, c[3:]])[None])[0, -1]) < 1e-5


def test_gradients_and_checkpointing(tiny):
    """Gradients of every parameter equal transformers', with and without gradient checkpointing."""
    hf, ours, _ = tiny
    tokens = torch.randint(3, 256, (2, 12))
    hf.zero_grad()
    hf(tokens).logits.square().mean().backward()
    ref = {n: p.grad for n, p in hf.named_parameters()}
    ours.train()
    try:
        for checkpointing in (False, True):
            ours.gradient_checkpointing = checkpointing
            for p in ours.parameters():
                p.requires_grad_(True)
                p.grad = None
            ours(tokens).square().mean().backward()
            for n, p in ours.named_parameters():
                assert rel_err(p.grad, ref[n]) < 1e-4, n
    finally:
        ours.gradient_checkpointing = False
        ours.eval().requires_grad_(False)


def test_config_4x_and_5x_agree(tmp_path):
    save_tiny("llama", tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in v5
    v4 = dict(v5)
    rope = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    v4["torch_dtype"] = v4.pop("dtype")
    assert ModelArgs.from_config(v4) == ModelArgs.from_config(v5)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
])  # fmt: skip
def test_rope_frequencies_equal_transformers(rope):
    cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                      rope_parameters=dict(rope))  # fmt: skip
    if rope["rope_type"] == "default":
        ref, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    got, scale = rope_inv_freq(ModelArgs.from_config(cfg.to_dict()))
    assert torch.equal(got, ref.float()) and scale == pytest.approx(ref_scale, rel=1e-7)


def test_unsupported_architecture_named():
    with pytest.raises(QError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        ModelArgs.from_config({"model_type": "gpt2", "hidden_size": 8})
    with pytest.raises(QError, match="rope type 'longrope'"):
        ModelArgs.from_config({**LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict(),
                               "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})  # fmt: skip


def test_state_dict_keys_are_hf_keys(tiny):
    hf, ours, _ = tiny
    assert set(ours.state_dict()) == set(hf.state_dict())


def test_smollm2_logits_equal_transformers(smollm2_fp16_dir):
    hf = AutoModelForCausalLM.from_pretrained(smollm2_fp16_dir, dtype=torch.float32).eval()
    ours = load_model(smollm2_fp16_dir, dtype=torch.float32)
    tokens = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4
