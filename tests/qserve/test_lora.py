"""LoRA on the NF4 base (qserve.lora) and PEFT adapter folders (qformats.peft_adapter), against PEFT."""

import json

import peft
import pytest
import torch
import transformers
from tiny_models import copy_into_peft, save_tiny

from qconvert.quantize import quantize_checkpoint
from qformats.errors import QError
from qformats.nf4 import dequantize_nf4, quantize_nf4
from qformats.peft_adapter import AdapterConfig, PeftAdapter, read_adapter, write_adapter
from qkernels.ops import dequantize
from qserve.loader import load_model
from qserve.lora import (
    ALL_LINEAR,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_adapter,
    lora_config,
    lora_parameters,
    merged_tensors,
)
from qserve.model import CausalLM
from qserve.nf4_linear import NF4Linear


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def randomize_b(model, seed=1):
    """B starts at zero (PEFT's init); random B makes the adapter matter and A's gradient non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model)[1::2]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    save_tiny("llama", d / "fp", dtype=torch.float32)
    quantize_checkpoint(d / "fp", d / "nf4", compute_dtype="float32", progress=False)
    return d / "nf4"


def peft_over_bnb(nf4_dir, **lora_kw):
    ref = transformers.AutoModelForCausalLM.from_pretrained(nf4_dir)
    cfg = peft.LoraConfig(target_modules=ALL_LINEAR, task_type="CAUSAL_LM", **lora_kw)
    return peft.get_peft_model(ref, cfg)


def test_nf4_lora_linear_matches_dense_and_keeps_no_fp_weight():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q = quantize_nf4(w)
    dense = torch.nn.Linear(64, 96, bias=True)
    with torch.no_grad():
        dense.weight.copy_(dequantize_nf4(q, torch.float32))
    bias = torch.randn(96)
    dense.bias.data.copy_(bias)
    ours = LoRALinear(NF4Linear(q, bias.clone()), r=4, alpha=8)
    ref = LoRALinear(dense, r=4, alpha=8)
    with torch.no_grad():
        for m in (ours, ref):
            m.lora_B.weight.copy_(torch.randn(96, 4, generator=torch.Generator().manual_seed(2)))
        ref.lora_A.weight.copy_(ours.lora_A.weight)
    x = torch.randn(3, 5, 64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ours(xs[0])
    y_ref = ref(xs[1])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    for a, b in ((ours.lora_A, ref.lora_A), (ours.lora_B, ref.lora_B)):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-5)
    assert ours.base.bias.grad is None and not ours.base.weight.requires_grad
    # Nothing weight-sized in full precision was kept for the backward pass.
    assert all(t.numel() < 96 * 64 or not t.is_floating_point() for t in saved), [t.shape for t in saved]


def test_logits_and_grads_equal_peft_over_bitsandbytes(nf4_dir):
    ours = load_model(nf4_dir, dtype=torch.float32)
    names = apply_lora(ours, lora_config(r=8, alpha=16), seed=0)
    assert len(names) == 2 * 7 and all(isinstance(ours.get_submodule(n).base, NF4Linear) for n in names)
    randomize_b(ours)
    ref = peft_over_bnb(nf4_dir, r=8, lora_alpha=16, lora_dropout=0.0)
    copy_into_peft(ours, ref)
    tokens = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    ours.train()
    ref.train()
    logits, ref_logits = ours(tokens), ref(input_ids=tokens).logits
    assert rel_err(logits, ref_logits) < 1e-4
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    ref_loss = ref(input_ids=tokens, labels=tokens).loss
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    loss.backward()
    ref_loss.backward()
    ref_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                 for n, p in ref.named_parameters() if p.requires_grad}  # fmt: skip
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == ref_grads.keys()
    for n, grad in ours_grads.items():
        assert (grad - ref_grads[n]).abs().max() < 1e-4 * max(1.0, ref_grads[n].abs().max().item()), n


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_loads_in_peft_and_back(nf4_dir, tmp_path, rslora):
    ours = load_model(nf4_dir, dtype=torch.float32)
    config = lora_config(r=4, alpha=32, use_rslora=rslora, rank_pattern={"down_proj": 2}, base_model="tiny-llama")
    apply_lora(ours, config, seed=3)
    randomize_b(ours)
    write_adapter(tmp_path / "adapter", lora_adapter(ours, config))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None and cfg["use_dora"] is False
    assert sorted(cfg["target_modules"]) == sorted(ALL_LINEAR)
    base = transformers.AutoModelForCausalLM.from_pretrained(nf4_dir)
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.eval()
        logits = ours(tokens)
        assert rel_err(logits, ref(input_ids=tokens).logits) < 1e-3
        # ...and PEFT's own save loads back into ours with the same logits.
        ref.save_pretrained(tmp_path / "peft_saved")
        fresh = load_model(nf4_dir, dtype=torch.float32)
        load_lora(fresh, tmp_path / "peft_saved")
        assert rel_err(fresh.eval()(tokens), logits) < 1e-6


def test_merge_gives_the_same_logits(nf4_dir):
    ours = load_model(nf4_dir, dtype=torch.float32)
    apply_lora(ours, lora_config(target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8), seed=0)
    randomize_b(ours)
    tokens = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = ours(tokens)
        merged = dict(merged_tensors(ours, torch.float32))  # what export writes
        dense = CausalLM(ours.args)
        missing, unexpected = dense.load_state_dict(merged, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied lm_head is the embeddings
        base = load_model(nf4_dir, dtype=torch.float32)
        changed = [n for n, m in base.named_modules() if isinstance(m, NF4Linear)
                   and not torch.equal(merged[f"{n}.weight"], dequantize(m.nf4_weight, torch.float32))]  # fmt: skip
        assert len(changed) == 6 and all(n.endswith(("q_proj", "v_proj", "down_proj")) for n in changed)
        assert rel_err(dense(tokens), before) < 1e-5


def test_target_modules_rules(nf4_dir):
    ours = load_model(nf4_dir, dtype=torch.float32)
    assert apply_lora(ours, lora_config(target_modules=r".*\.0\.mlp\.(up|down)_proj", r=2)) == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]  # fmt: skip
    with pytest.raises(QError, match="already has a LoRA adapter"):
        apply_lora(ours, lora_config(target_modules=["up_proj"], r=2))
    with pytest.raises(QError, match="match no linear layer"):
        apply_lora(load_model(nf4_dir), lora_config(target_modules=["qkv"], r=2))
    assert [p.requires_grad for p in ours.parameters()].count(True) == 4


def good_config(**kw):
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"} | kw


@pytest.mark.parametrize("field,value", [("peft_type", "IA3"), ("r", 0), ("lora_alpha", "x"), ("bias", "all"),
                                         ("use_dora", True), ("modules_to_save", ["lm_head"]),
                                         ("target_modules", []), ("lora_dropout", 2.0)])  # fmt: skip
def test_bad_adapter_config_names_the_field(tmp_path, field, value):
    (tmp_path / "adapter_config.json").write_text(json.dumps(good_config(**{field: value})))
    with pytest.raises(QError, match=f"field '{field}'"):
        read_adapter(tmp_path)


def test_bad_adapter_folders(tmp_path):
    with pytest.raises(QError, match="no adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(good_config()))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(QError, match="pickle"):
        read_adapter(tmp_path)
    a = torch.zeros(2, 8)
    from safetensors.torch import save_file

    save_file({"base_model.model.m.q_proj.lora_A.weight": a}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(QError, match="lora_B.weight is missing"):
        read_adapter(tmp_path)
    save_file({"base_model.model.m.q_proj.lora_A.weight": torch.zeros(3, 8),
               "base_model.model.m.q_proj.lora_B.weight": torch.zeros(8, 3)}, tmp_path / "adapter_model.safetensors")  # fmt: skip
    with pytest.raises(QError, match="rank 2"):
        read_adapter(tmp_path)
    adapter = PeftAdapter(AdapterConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
                          {"m.q_proj": (torch.zeros(2, 8), torch.zeros(8, 2))})  # fmt: skip
    with pytest.raises(QError, match="already exists.*--force"):
        write_adapter(tmp_path, adapter)
    write_adapter(tmp_path / "new", adapter)
    write_adapter(tmp_path / "new", adapter, force=True)
    assert read_adapter(tmp_path / "new").weights.keys() == {"m.q_proj"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp leftovers


def test_scaling_equals_peft():
    cfg = AdapterConfig(r=8, lora_alpha=16, target_modules=["q_proj"], use_rslora=True,
                        rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 2})  # fmt: skip
    assert cfg.scale_of("model.layers.0.self_attn.q_proj") == 16 / 8**0.5
    assert cfg.scale_of("model.layers.0.mlp.down_proj") == 16 / 2
    assert cfg.scale_of("model.layers.1.mlp.down_proj") == 2 / 2


@pytest.mark.parametrize("r", [4, 8])  # 8: the fused C++ LoRA-dropout products; 4: masked x + torch matmuls
def test_dropout_branch_equals_explicit_autograd_and_saves_no_copy(r):
    """The LoRA layer with dropout (a zero base, so the LoRA term alone) against plain autograd with the
    same mask: outputs and every gradient; it saves x once and no mask (the mask is a hash of a seed)."""
    from qkernels.lora_dropout import keep_mask

    base = torch.nn.Linear(32, 16, bias=False)
    base.weight.data.zero_()
    layer = LoRALinear(base, r=r, alpha=2 * r, dropout=0.3)
    assert not base.weight.requires_grad  # frozen by LoRALinear; unfreezing it later is refused
    base.requires_grad_(True)
    with pytest.raises(QError, match="freeze its base"):
        layer(torch.randn(2, 32))
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(3, 5, 32, generator=g), torch.randn(r, 32, generator=g), torch.randn(16, r, generator=g)
    layer.lora_A.weight.data.copy_(a)
    layer.lora_B.weight.data.copy_(b)
    xo = x.clone().requires_grad_()
    ref = [t.clone().requires_grad_() for t in (x, a, b)]
    saved = []
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(xo)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # the seed the layer drew (draw_seed)
    keep = keep_mask(x.numel(), seed, 0.3).view(x.shape)
    assert 0.2 < 1 - keep.float().mean() < 0.4
    y_ref = ((ref[0] * keep / 0.7) @ ref[1].t() @ ref[2].t()) * 2.0
    torch.testing.assert_close(y, y_ref)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for o, want in zip((xo, layer.lora_A.weight, layer.lora_B.weight), ref):
        torch.testing.assert_close(o.grad, want.grad, rtol=1e-5, atol=1e-4)
    assert [t.dtype for t in saved if t.numel() >= x.numel()] == [torch.float32]  # x, and no mask
    layer = LoRALinear(torch.nn.Linear(32, 16), r=4, alpha=8, dropout=0.5)
    layer.lora_B.weight.data.normal_()
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))  # eval mode: no dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_seeded_dropout_fast_path_equals_the_torch_hash(dtype):
    """qkernels_cpu's fused dropout kernels drop exactly the elements of the torch reference hash,
    at rate p, and different seeds drop (nearly) independent sets."""
    from qkernels import lora_dropout as ld
    from qkernels import ops

    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(513, 77, generator=g).to(dtype), torch.randn(513, 77, generator=g).to(dtype)
    for seed in (0, 1, 2**40 + 5, 2**63 - 2):
        keep = ld.keep_mask(x.numel(), seed, 0.1).view(x.shape)
        assert torch.equal(ops.dropout_apply(x, seed, 0.1), torch.where(keep, x, 0.0))
        y = torch.randn_like(x)
        expected = y + torch.where(keep, t, 0.0)
        assert torch.equal(ops.dropout_add_(y, t, seed, 0.1), expected)
        assert abs((1 - keep.float().mean()) - 0.1) < 0.01
    both = ~ld.keep_mask(200_000, 11, 0.1) & ~ld.keep_mask(200_000, 12, 0.1)
    assert abs(both.float().mean() - 0.01) < 0.002


@pytest.mark.parametrize("m,k,r", [(1, 8, 8), (7, 5, 16), (65, 77, 8), (130, 576, 16), (33, 40, 24), (20, 100, 64),
                                   (9, 64, 12)])  # fmt: skip
def test_fused_lora_dropout_products_equal_the_masked_reference(m, k, r):
    """`lora_down`, `lora_grad_a`, `lora_up_add_` (C++ on AVX2 for r = 8..64 in steps of 8; r=12 takes the
    torch path) equal the products of the explicitly masked tensors, for every tail of rows and columns;
    a NaN or inf in a dropped element reaches no result; p=0 keeps everything."""
    from qkernels import cpu, ops
    from qkernels import lora_dropout as ld

    assert cpu.extension_available(), cpu._ext_state.get("error")
    assert hasattr(torch.ops.qkernels_cpu, "lora_down") == cpu._SIMD  # built wherever AVX2 is
    g = torch.Generator().manual_seed(m * 1000 + k)
    x, a, gu = torch.randn(m, k, generator=g), torch.randn(r, k, generator=g), torch.randn(m, r, generator=g)
    y = torch.randn(m, k, generator=g)
    for seed, p in ((5, 0.3), (2**62 + 9, 0.05), (1, 0.0)):
        keep = ld.keep_mask(x.numel(), seed, p).view(m, k)
        xd = torch.where(keep, x, 0.0).double()
        xbad = x.clone()
        dropped = (~keep).flatten().nonzero().flatten()
        if len(dropped):
            xbad.view(-1)[dropped[0]], xbad.view(-1)[dropped[-1]] = float("nan"), float("inf")
        v = ops.lora_down(xbad, a, seed, p, 0.75)
        within_fp32(v, 0.75 * xd @ a.double().t(), 0.75 * xd.abs() @ a.double().abs().t(), k)
        ga = ops.lora_grad_a(gu, xbad, seed, p, 0.75)
        within_fp32(ga, 0.75 * gu.double().t() @ xd, 0.75 * gu.double().abs().t() @ xd.abs(), m)
        prod = gu.double() @ a.double()
        out = ops.lora_up_add_(y.clone(), gu, a, seed, p)
        within_fp32(out, y.double() + torch.where(keep, prod, 0.0), y.double().abs() + (gu.double().abs() @ a.double().abs()), r + 1)


def within_fp32(got: torch.Tensor, exact: torch.Tensor, abs_sum: torch.Tensor, terms: int) -> None:
    """fp32 summation of `terms` products in any order: |error| <= terms * 2^-24 * sum |products| (+ rounding)."""
    err = (got.double() - exact).abs()
    assert (err <= (terms + 2) * 2**-24 * abs_sum + 1e-30).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("r,dropout", [(8, 0.1), (4, 0.1), (8, 0.0)])
def test_checkpointed_layers_reuse_the_lora_bottleneck_and_match(nf4_dir, r, dropout, monkeypatch):
    """With gradient checkpointing, each LoRA layer's [tokens, r] bottleneck is computed once, kept for
    the layer's recompute (qserve/recompute_stash.py), and losses and gradients equal the run without
    checkpointing, also for two forwards before one backward."""
    import qserve.lora.training as lora_mod

    model = load_model(nf4_dir, dtype=torch.float32)
    apply_lora(model, lora_config(r=r, alpha=2 * r, dropout=dropout), seed=0)
    randomize_b(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    t1, t2 = (torch.randint(0, model.args.vocab_size, (2, 12), generator=g) for _ in range(2))
    calls = []
    real = lora_mod._LoRAInput.forward
    monkeypatch.setattr(lora_mod._LoRAInput, "forward",
                        staticmethod(lambda ctx, *a: calls.append(a[4] is None) or real(ctx, *a)))  # fmt: skip

    def run(checkpointing):
        model.gradient_checkpointing = checkpointing
        calls.clear()
        torch.manual_seed(5)
        loss = model(t1).logsumexp(-1).mean() + model(t2).logsumexp(-1).mean()
        loss.backward()
        grads = [p.grad.clone() for p in lora_parameters(model)]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, calls.count(True), calls.count(False)

    loss0, grads0, computed0, reused0 = run(False)
    loss1, grads1, computed1, reused1 = run(True)
    n = len(lora_mod.lora_modules(model))
    assert (computed0, reused0) == (2 * n, 0)
    assert computed1 == 2 * n and reused1 >= 2 * (n - len(model.model.layers))  # all but down_proj's
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
