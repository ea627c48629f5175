"""qserve export: merged checkpoints load in transformers with the logits of base + adapter in our runtime."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file
from test_engine import make_peft_adapter
from test_loader import upcast_bnb_model
from tiny_models import save_tiny, save_tiny_tokenizer

from qconvert.quantize import quantize_checkpoint
from qformats.errors import QError
from qformats.manifest import verify_manifest
from qformats.nf4 import quantize_nf4
from qserve.cli import main as qserve_cli
from qserve.export import export_merged
from qserve.loader import load_model
from qserve.lora import load_lora
from qserve.nf4_linear import NF4Linear


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An NF4 base quantized from fp16 (as users do) and a PEFT adapter on every linear."""
    root = tmp_path_factory.mktemp("export")
    hf = save_tiny("smollm2", root / "fp16", dtype=torch.float16, vocab_size=320, seed=5)
    save_tiny_tokenizer(root / "fp16")
    quantize_checkpoint(root / "fp16", root / "nf4", progress=False)
    make_peft_adapter(hf, root / "adapter", seed=6, r=8, alpha=16)
    return root


def runtime_logits(root, tokens):
    lm = load_model(root / "nf4", dtype=torch.float32)
    load_lora(lm, root / "adapter")
    with torch.no_grad():
        return lm(tokens)


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def merged_fp32(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    summary = export_merged(base / "nf4", out, base / "adapter", dtype="fp32", progress=False)
    assert summary.merged_modules == 14  # 7 linears x 2 layers
    return out


def test_merged_export_loads_in_transformers_with_runtime_logits(base, merged_fp32):
    cfg = json.loads((merged_fp32 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert (merged_fp32 / "tokenizer.json").is_file() and not list(merged_fp32.parent.glob("*.tmp-*"))
    tokens = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged_fp32).eval()
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, runtime_logits(base, tokens)) < 1e-5


# Half precision: the merged weights are those of the fp32 export rounded once; the logits then move by
# that rounding (this tiny random model has large weights, so more than a real model does).
@pytest.mark.parametrize("dtype,torch_dtype,tolerance", [("fp16", torch.float16, 2e-2), ("bf16", torch.bfloat16, 1e-1)])
def test_half_precision_export_is_the_fp32_merge_rounded_once(base, merged_fp32, tmp_path, dtype, torch_dtype,
                                                             tolerance):  # fmt: skip
    out = tmp_path / dtype
    export_merged(base / "nf4", out, base / "adapter", dtype=dtype, progress=False)
    full, half = load_file(merged_fp32 / "model.safetensors"), load_file(out / "model.safetensors")
    assert full.keys() == half.keys()
    for name, t in half.items():
        assert t.dtype == torch_dtype and torch.equal(t, full[name].to(torch_dtype)), name
    tokens = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, runtime_logits(base, tokens)) < tolerance


def test_requantized_export_is_nf4_and_reports_perplexity(base, tmp_path):
    out = tmp_path / "merged-nf4"
    summary = export_merged(base / "nf4", out, base / "adapter", requantize=True, progress=False)
    assert summary.requantized and summary.perplexity_runtime > 1 and summary.perplexity_export > 1
    assert summary.perplexity_export != summary.perplexity_runtime  # the rounding is measured, not hidden
    assert "perplexity: base + adapter" in summary.describe()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and cfg["dtype"] == "float16"
    # Exactly the fp16 merge quantized with the codec (same block size, double quantization).
    export_merged(base / "nf4", tmp_path / "fp16", base / "adapter", dtype="fp16", progress=False)
    dense, nf4 = load_file(tmp_path / "fp16" / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    for key, t in quantize_nf4(dense[name]).to_tensors(name).items():
        assert torch.equal(nf4[key], t), key
    assert torch.equal(nf4["model.norm.weight"], dense["model.norm.weight"])
    # The file is the standard bnb layout: transformers + bitsandbytes computes what our runtime does.
    ours = load_model(out, dtype=torch.float32)
    assert isinstance(ours.model.layers[1].mlp.down_proj, NF4Linear)
    tokens = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(2))
    hf = upcast_bnb_model(transformers.AutoModelForCausalLM.from_pretrained(out).eval())
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-3


def test_export_without_adapter_dequantizes(base, tmp_path):
    out = tmp_path / "plain"
    assert export_merged(base / "nf4", out, dtype="fp32", progress=False).merged_modules == 0
    tokens = torch.randint(3, 320, (1, 12))
    with torch.no_grad():
        assert rel_err(load_model(out)(tokens), load_model(base / "nf4", dtype=torch.float32)(tokens)) < 1e-5
    verify_manifest(out)  # qconvert.json: every output file's sha256, and where the export came from
    manifest = json.loads((out / "qconvert.json").read_text())
    assert manifest["parameters"]["operation"] == "export" and manifest["source"]["base_model"] == "nf4"
    assert manifest["source"]["path"] == "nf4"  # no Hub lineage: the folder's name, never its local path
    assert str(base) not in (out / "qconvert.json").read_text()
    assert manifest["source"]["adapter"] is None and "model.safetensors" in manifest["source"]["files"]


def test_cli_and_bad_input(base, tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(qserve_cli, ["export", "--model", str(base / "nf4"), "--adapter", str(base / "adapter"),
                                        "--out", str(out), "--dtype", "bf16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (bfloat16, 14 linears merged)")
    again = runner.invoke(qserve_cli, ["export", "--model", str(base / "nf4"), "--out", str(out)])
    assert again.exit_code == 1 and again.stderr.startswith("error: ") and "not empty" in again.stderr
    missing = runner.invoke(qserve_cli, ["export", "--model", str(base / "nf4"), "--adapter", str(tmp_path / "no"),
                                         "--out", str(tmp_path / "x")])  # fmt: skip
    assert missing.exit_code == 1 and "no such folder" in missing.stderr and not (tmp_path / "x").exists()
    with pytest.raises(QError, match="needs an NF4 base"):
        export_merged(base / "fp16", tmp_path / "y", requantize=True, progress=False)
