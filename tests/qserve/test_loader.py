"""qserve.loader: fp and NF4 checkpoints (ours and transformers+bitsandbytes'), shards, the Hub, bad input."""

import json
import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner
from hub_server import Commit, FakeHub, _commit_oid
from safetensors.torch import load_file
from tiny_models import save_tiny, save_tiny_tokenizer

from qconvert.quantize import quantize_checkpoint
from qformats.errors import QError
from qserve.cli import main as qserve_main
from qserve.loader import load_model
from qserve.nf4_linear import NF4Linear


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def nf4_folder(tmp_path, family: str, dtype: torch.dtype, **overrides):
    save_tiny(family, tmp_path / "fp", dtype=dtype, **overrides)
    name = str(dtype).removeprefix("torch.")
    quantize_checkpoint(tmp_path / "fp", tmp_path / "nf4", compute_dtype=name, progress=False)
    return tmp_path / "nf4"


def upcast_bnb_model(model):
    """transformers keeps a pre-quantized model's float tensors in the checkpoint dtype; compare in fp32."""
    for module in model.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
        for name, p in module.named_parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                setattr(module, name, torch.nn.Parameter(p.data.float(), requires_grad=False))
    return model


# Half precision: both sides round each op to 8 or 11 mantissa bits, in different orders (our kernel
# accumulates in fp32 and rounds once; bitsandbytes rounds the dequantized weight first).
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("family,dtype", [("llama", torch.float16), ("smollm2", torch.float32),
                                          ("mistral", torch.float16), ("qwen2", torch.bfloat16),
                                          ("qwen3", torch.float32)])  # fmt: skip
def test_nf4_logits_equal_transformers_bitsandbytes(tmp_path, family, dtype):
    folder = nf4_folder(tmp_path, family, dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert ref.model.embed_tokens.weight.dtype == dtype  # transformers computes in the checkpoint's dtype
    ours = load_model(folder, dtype=dtype)
    assert isinstance(ours.model.layers[0].mlp.up_proj, NF4Linear)
    assert not isinstance(ours.lm_head, NF4Linear)  # the quantizer skips lm_head, as bitsandbytes does
    tokens = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if dtype != torch.float32:
            assert rel_err(ours(tokens), ref(tokens).logits) < HALF_TOLERANCE[dtype]
            ref, ours = upcast_bnb_model(ref), load_model(folder, dtype=torch.float32)
        assert rel_err(ours(tokens), ref(tokens).logits) < 1e-3


def test_transformers_bnb_saved_checkpoint_loads(tmp_path):
    """A bnb-4bit checkpoint as transformers + bitsandbytes write it (what the Hub hosts) loads as-is."""
    save_tiny("qwen2", tmp_path / "fp", dtype=torch.float16)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)  # fmt: skip
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    ref.save_pretrained(tmp_path / "bnb")  # before any inference (see DESIGN: bnb may repack on CPU)
    ours = load_model(tmp_path / "bnb", dtype=torch.float32)
    tokens = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(tokens), upcast_bnb_model(ref)(tokens).logits) < 1e-3


def test_nf4_model_holds_only_the_stored_tensors(tmp_path):
    folder = nf4_folder(tmp_path, "llama", torch.float16)
    ours = load_model(folder)
    stored = load_file(folder / "model.safetensors")
    state = ours.state_dict()
    assert set(state) == set(stored)
    for name, t in stored.items():
        if t.dtype == torch.uint8 or name.endswith(("quant_map", "nested_absmax")):
            assert torch.equal(state[name], t), name  # the NF4 tensors exactly as stored
        else:
            assert torch.equal(state[name], t.float()), name  # float tensors in the compute dtype
    for module in ours.modules():
        if isinstance(module, NF4Linear):
            assert all(b.dtype == torch.uint8 or b.numel() <= 256 for b in [module.weight, module.weight_absmax])
    nf4 = [m for m in ours.modules() if isinstance(m, NF4Linear)]
    # 4-bit codes, 8-bit block scales, fp32 nested scales: ~4.13 bits per weight (the 16/256-entry maps aside).
    stored_bytes = sum(b.nbytes for m in nf4 for b in [m.weight, m.weight_absmax, m.weight_nested_absmax])
    n_weights = sum(m.out_features * m.in_features for m in nf4)
    assert stored_bytes <= n_weights * (0.5 + 1 / 64 + 4 / 64 / 256) + 4 * len(nf4)  # + a partial nested block


def test_sharded_checkpoint_and_dtypes(tmp_path):
    ref = save_tiny("qwen3", tmp_path / "one")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    tokens = torch.randint(3, 256, (1, 12))
    with torch.no_grad():
        assert rel_err(load_model(tmp_path / "sharded")(tokens), ref(tokens).logits) < 1e-4
        bf16 = load_model(tmp_path / "sharded", dtype="bf16")
        assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
        assert rel_err(bf16(tokens), ref(tokens).logits) < 5e-2


def _corrupt(tmp_path, what: str):
    """A tiny model folder (with tokenizer) broken in one way; returns (folder, expected message)."""
    folder = tmp_path / what
    save_tiny("smollm2", folder, vocab_size=320)
    save_tiny_tokenizer(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if what == "no-weights":
        (folder / "model.safetensors").unlink()
        message = "no model.safetensors or model.safetensors.index.json"
    elif what == "architecture":
        cfg["model_type"] = "gpt_neox"
        message = "model_type 'gpt_neox' is not supported; supported: llama, mistral, qwen2, qwen3"
    elif what == "shape":
        cfg["intermediate_size"] = 80
        message = "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64], but config.json implies [80, 64]"
    elif what == "missing":
        cfg["num_hidden_layers"] = 3
        message = "checkpoint lacks 'model.layers.2.self_attn.q_proj.weight'"
    elif what == "nf4-shape":
        shutil.rmtree(folder)
        save_tiny("smollm2", tmp_path / "fp", vocab_size=320, dtype=torch.float16)
        quantize_checkpoint(tmp_path / "fp", folder, progress=False)
        save_tiny_tokenizer(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"] = 4, 4, 16
        message = "4-bit tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 64], but config.json implies [64, 64]"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, message


@pytest.mark.parametrize("what", ["no-weights", "architecture", "shape", "missing", "nf4-shape"])
def test_bad_checkpoints_one_line(tmp_path, what):
    folder, message = _corrupt(tmp_path, what)
    with pytest.raises(QError) as e:
        load_model(folder)
    assert message in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(qserve_main, ["generate", "--model", str(folder), "--prompt", "Hello"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_hub_id_revision_and_offline(tmp_path, monkeypatch):
    folder = nf4_folder(tmp_path, "smollm2", torch.float16)
    save_tiny_tokenizer(folder)
    hub = FakeHub()
    hub.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        repo = hub.create_repo("tester/tiny-nf4")
        head = repo.commits[repo.branches["main"]]
        files = {**head.files, **{p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}}
        commit = Commit(_commit_oid(head.oid, files, "seed"), files, "seed", head.oid)
        repo.commits[commit.oid] = commit
        repo.branches["main"] = commit.oid
        tokens = torch.randint(3, 256, (1, 10))
        local = load_model(folder)(tokens)
        assert torch.equal(load_model("tester/tiny-nf4", revision=commit.oid)(tokens), local)
        r = CliRunner().invoke(qserve_main, ["generate", "--model", "tester/tiny-nf4", "--prompt", "Hi",
                                             "--max-tokens", "3"])  # fmt: skip
        assert r.exit_code == 0, r.stderr
    finally:
        hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(load_model("tester/tiny-nf4")(tokens), local)  # from the cache, no Hub
    with pytest.raises(QError, match="tester/other"):
        load_model("tester/other")


def test_nf4_model_backward_equals_transformers_bitsandbytes(tmp_path):
    """LoRA training needs gradients through the frozen 4-bit base: to the norms and to the input embeddings."""
    folder = nf4_folder(tmp_path, "llama", torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ours = load_model(folder)
    tokens = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (ours, ref):
        model.train()
        model.model.norm.weight.requires_grad_(True)
        model.model.layers[0].input_layernorm.weight.requires_grad_(True)
        out = model(tokens)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        logits.square().mean().backward()
        grads.append([model.model.norm.weight.grad, model.model.layers[0].input_layernorm.weight.grad])
    for g_ours, g_ref in zip(*grads):
        assert rel_err(g_ours, g_ref) < 1e-3
