"""`qconvert quantize` / `qconvert inspect` against transformers + bitsandbytes quantizing the same model."""

import errno
import json
import struct
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_nf4 import assert_scale_codes_close
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import qformats.sharded_writer
from qconvert.checkpoint_info import inspect_checkpoint
from qconvert.cli import main
from qconvert.quantize import module_matches, quantize_checkpoint
from qformats.checkpoint import iter_checkpoint_tensors
from qformats.errors import QError
from qformats.manifest import verify_manifest
from qformats.nf4 import NF4Weight

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_llama(folder: Path, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1001,
               dtype=torch.float16, tie=False, max_shard_size=None, seed=0) -> Path:  # fmt: skip
    """A random Llama saved with transformers, plus tokenizer-side files to be copied verbatim."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      tie_word_embeddings=tie, initializer_range=0.1)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def bnb_config(skip=None):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)  # fmt: skip


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_checkpoint_tensors(folder))


def assert_same_bytes_as_bnb(ours: dict, theirs: dict):
    """Every stored tensor equal, except the 8-bit scale codes, which follow the documented tolerance."""
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        if name.endswith(".weight.absmax") and tensor.dtype == torch.uint8:
            prefix = name.removesuffix(".absmax")
            w = NF4Weight.from_tensors(prefix, {k: v for k, v in ours.items() if k.startswith(prefix)})
            assert_scale_codes_close(w, theirs[name])
        else:
            assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name


def load_fp32(folder: Path):
    """A bnb-4bit checkpoint in transformers, computing in fp32 throughout: transformers keeps the
    unquantized tensors of a pre-quantized checkpoint in their stored dtype whatever `dtype` says."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


def logits(model, vocab):
    torch.manual_seed(7)
    ids = torch.randint(0, vocab, (2, 9))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(
    "case",
    [
        {},  # fp16, one shard
        {"max_shard_size": "150KB", "shard_size": "300KB"},  # sharded in and out
        # bf16, tied embeddings, numel of k/v/up/down not a multiple of the blocksize (72*36, 72*100)
        {"hidden": 72, "intermediate": 100, "vocab": 333, "dtype": torch.bfloat16, "tie": True},
        {"skip": ["mlp.down_proj"]},
    ],
    ids=["fp16", "sharded", "bf16-tied-odd-numel", "skip-modules"],
)
def test_transformers_loads_it_like_its_own_bnb_quantization(tmp_path, case):
    case = dict(case)
    shard_size, skip = case.pop("shard_size", "5GB"), case.pop("skip", [])
    src = tiny_llama(tmp_path / "src", **case)
    vocab = case.get("vocab", 1001)
    skip_args = [a for m in skip for a in ("--skip-modules", m)]
    code, _, err = run_cli("quantize", src, tmp_path / "ours", "--compute-dtype", "float32",
                             "--shard-size", shard_size, "--quiet", *skip_args)  # fmt: skip
    assert code == 0, err

    # transformers + bitsandbytes quantize the same source; save before any inference (DESIGN's gotcha).
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(["lm_head", *skip] if skip else None))
    ref.save_pretrained(tmp_path / "bnb")
    assert_same_bytes_as_bnb(load_tensors(tmp_path / "ours"), load_tensors(tmp_path / "bnb"))

    ref, ours = load_fp32(tmp_path / "bnb"), load_fp32(tmp_path / "ours")
    n4bit = sum(type(m).__name__ == "Linear4bit" for m in ours.modules())
    assert n4bit == sum(type(m).__name__ == "Linear4bit" for m in ref.modules()) == 2 * (7 - len(skip))
    a, b = logits(ours, vocab), logits(ref, vocab)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-3
    # The whole difference is the documented 8-bit scale rounding: with bnb's codes, logits are identical.
    swapped = load_fp32(tmp_path / "ours")
    theirs_tensors = load_tensors(tmp_path / "bnb")
    for name, module in swapped.named_modules():
        if type(module).__name__ == "Linear4bit":
            module.weight.quant_state.absmax = theirs_tensors[f"{name}.weight.absmax"]
    assert torch.equal(logits(swapped, vocab), b)

    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    q = cfg["quantization_config"]
    assert q.pop("llm_int8_skip_modules") == ["lm_head", *skip]
    theirs.pop("llm_int8_skip_modules")
    assert q == theirs
    source_dtype = str(case.get("dtype", torch.float16)).removeprefix("torch.")
    assert cfg["dtype"] == cfg["torch_dtype"] == source_dtype
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (src / name).read_bytes()
    if "max_shard_size" in case:
        shards = sorted((tmp_path / "ours").glob("model-*.safetensors"))
        assert len(shards) > 1 and (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    verify_manifest(tmp_path / "ours")


def test_smollm2_every_linear_matches_bitsandbytes(tmp_path, smollm2_fp16_dir):
    summary = quantize_checkpoint(smollm2_fp16_dir, tmp_path / "nf4", progress=False)
    assert len(summary.quantized_tensors) == 30 * 7
    ours = load_tensors(tmp_path / "nf4")
    checked = 0
    for name, w in iter_checkpoint_tensors(smollm2_fp16_dir):
        if name not in summary.quantized_tensors:
            assert torch.equal(ours[name], w), name
            continue
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        mine = NF4Weight.from_tensors(name, {k: v for k, v in ours.items() if k.startswith(name)})
        assert torch.equal(mine.packed, packed), f"{name}: 4-bit codes differ from bitsandbytes"
        assert mine.offset == state.offset.item() and torch.equal(mine.nested_absmax, state.state2.absmax)
        assert_scale_codes_close(mine, state.absmax, min_agreement=0.99)
        checked += 1
    assert checked == 210


def test_smollm2_logits_match_transformers_bnb(tmp_path, smollm2_fp16_dir):
    """Over 30 layers, the ~0.2% of 8-bit scale codes where bitsandbytes' CPU lookup table misses the
    nearest value add up: logits differ by ~1.2e-3 relative (norm; ~3.6e-3 in the max). With bnb's scale
    codes swapped in they are bit-identical, and ours are no further from the unquantized model."""
    quantize_checkpoint(smollm2_fp16_dir, tmp_path / "nf4", compute_dtype="float32", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_fp16_dir, quantization_config=bnb_config())
    ref.save_pretrained(tmp_path / "bnb")
    del ref
    a, b = logits(load_fp32(tmp_path / "nf4"), 49152), logits(load_fp32(tmp_path / "bnb"), 49152)
    full = logits(AutoModelForCausalLM.from_pretrained(smollm2_fp16_dir, dtype=torch.float32), 49152)

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    assert rel(a, b) <= 2e-3
    assert rel(a, full) <= rel(b, full) * 1.001
    swapped = load_fp32(tmp_path / "nf4")
    theirs = load_tensors(tmp_path / "bnb")
    for name, module in swapped.named_modules():
        if type(module).__name__ == "Linear4bit":
            module.weight.quant_state.absmax = theirs[f"{name}.weight.absmax"]
    assert torch.equal(logits(swapped, 49152), b)
    info = inspect_checkpoint(tmp_path / "nf4", verify=True)
    assert info.format == "nf4" and info.layers == 30 and info.manifest == "verified"
    assert len(info.quantized_tensors) == 210


# ---------------------------------------------------------------- bad input: one line, exit 1, OUT untouched


def assert_fails(args, message, out: Path, out_before=None):
    code, stdout, stderr = run_cli("quantize", *args, out, "--quiet")
    assert code == 1, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert "Traceback" not in stderr
    if out_before is None:
        assert not out.exists()
    else:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == out_before
    assert not list(out.parent.glob(f"{out.name}.tmp-*")), "temp folder left behind"


def edit_header(path: Path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


@pytest.fixture
def src(tmp_path):
    return tiny_llama(tmp_path / "src", hidden=64, intermediate=96, vocab=97)


def test_missing_and_empty_src(tmp_path):
    assert_fails([tmp_path / "nope"], "no such folder", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert_fails([tmp_path / "empty"], "the folder is empty", tmp_path / "out")


def test_truncated_shard(tmp_path, src):
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_fails([src], "truncated", tmp_path / "out")


def test_header_lying_about_sizes(tmp_path, src):
    name = "model.layers.0.mlp.up_proj.weight"
    edit_header(src / "model.safetensors", lambda h: {**h, name: {**h[name], "shape": [96, 65]}})
    assert_fails([src], f"{name}' header says", tmp_path / "out")


def test_missing_config(tmp_path, src):
    (src / "config.json").unlink()
    assert_fails([src], "no config.json", tmp_path / "out")


def test_unsupported_dtype(tmp_path, src):
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.randint(-128, 127, (64, 64), dtype=torch.int8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert_fails([src], "'model.layers.1.self_attn.q_proj.weight' is I8", tmp_path / "out")


def test_already_quantized_src(tmp_path, src):
    quantize_checkpoint(src, tmp_path / "nf4", progress=False)
    assert_fails([tmp_path / "nf4"], "already quantized", tmp_path / "out")


def test_out_not_empty_without_force_and_force_replaces(tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert_fails([src], "not empty (use --force", out, {"old.txt": b"keep me"})
    code, _, err = run_cli("quantize", src, out, "--force", "--quiet")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_out_not_writable(tmp_path, src, monkeypatch):
    (tmp_path / "a_file").write_text("")
    assert_fails([src], "cannot write here", tmp_path / "a_file" / "out")
    real_mkdir = Path.mkdir

    def deny(self, *args, **kwargs):
        if ".tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", deny)  # root ignores chmod, so deny the write itself
    assert_fails([src], "cannot write here (Permission denied)", tmp_path / "out")


def test_disk_full_midway(tmp_path, src, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    real_write = qformats.sharded_writer.ShardStream.write  # every tensor byte goes through it (the writer thread)
    calls = []

    def write_then_fail(self, buffers):
        calls.append(len(buffers))
        if len(calls) == 12:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, buffers)

    monkeypatch.setattr(qformats.sharded_writer.ShardStream, "write", write_then_fail)
    assert_fails([src, "--force"], "no space left on device", out, {"old.txt": b"previous result"})


def test_bad_options(tmp_path, src):
    assert_fails([src, "--blocksize", "48"], "blocksize 48 is not supported", tmp_path / "out")
    assert_fails([src, "--shard-size", "lots"], "cannot read size 'lots'", tmp_path / "out")
    assert_fails([src, "--device", "cuda:0"] if not torch.cuda.is_available() else [src, "--device", "tpu"],
                 "--device", tmp_path / "out")  # fmt: skip
    assert_fails([src, "--revision", "main"], "--revision applies to Hub repo ids", tmp_path / "out")


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert_fails(["someone/some-model"], "not in the local Hub cache", tmp_path / "out")


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    """An `owner/name` already in the HF cache quantizes offline (HF_HUB_OFFLINE honoured)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny"
    tiny_llama(repo / "snapshots" / commit, hidden=64, intermediate=96, vocab=97)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    summary = quantize_checkpoint("someone/tiny", tmp_path / "out", progress=False)
    assert len(summary.quantized_tensors) == 14
    manifest = json.loads((tmp_path / "out" / "qconvert.json").read_text())
    assert manifest["source"]["repo_id"] == "someone/tiny" and manifest["source"]["commit"] == commit


# ---------------------------------------------------------------- inspect and the manifest


def test_inspect_and_verify(tmp_path, src):
    out = tmp_path / "out"
    summary = quantize_checkpoint(src, out, progress=False, shard_size="40KB")
    assert len(summary.shards) > 1
    code, text, err = run_cli("inspect", out, "--verify")
    assert code == 0, err
    assert "NF4" in text and "2 layers" in text and "14 quantized" in text and "verified" in text

    code, text, _ = run_cli("inspect", src, "--json")
    before = json.loads(text)
    code, text, _ = run_cli("inspect", out, "--json")
    after = json.loads(text)
    assert before["format"] == "float16" and after["format"] == "nf4"
    assert before["parameters"] == after["parameters"] == summary.parameters
    assert after["quantized_parameters"] == summary.quantized_parameters
    assert after["quantized_tensors"] == summary.quantized_tensors
    assert after["quantization"] == {"blocksize": 64, "double_quant": True, "compute_dtype": "float16",
                                     "skip_modules": ["lm_head"]}  # fmt: skip
    assert after["bits_per_parameter"] == pytest.approx(summary.bits_per_parameter, abs=1e-3)

    (out / "README.md").write_text("a model card added later is fine")
    verify_manifest(out)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(QError, match=f"{shard.name}: sha256 differs"):
        verify_manifest(out)
    code, _, err = run_cli("inspect", out, "--verify")
    assert code == 1 and shard.name in err
    (out / "generation_config.json").unlink()
    code, _, err = run_cli("inspect", out)
    assert code == 1 and "generation_config.json: listed in qconvert.json but missing" in err
    code, _, err = run_cli("inspect", src, "--verify")
    assert code == 1 and err == f"error: {src}: --verify needs a qconvert.json manifest, and there is none\n"


def test_module_matches_follows_transformers():
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.11.mlp.gate_proj", "model.layers.1.mlp.gate"]
    for patterns in (["lm_head"], ["mlp.down_proj"], ["model.layers.1"], ["model.layers.*"], ["mlp.gate"]):
        for name in names:
            assert module_matches(name, patterns) == (not should_convert_module(name, patterns)), (name, patterns)


# ---------------------------------------------------------------- the codec's table lookup, exactly bucketize


@pytest.mark.parametrize("cells_name", ["_NF4_CELLS", "_DYNAMIC_CELLS"])
def test_cell_codebook_is_bucketize_for_every_fp32(cells_name):
    """Every value of every cell holding a midpoint, both ends of every other cell (bucketize is monotonic,
    so equal ends mean the whole cell), and the special values: together, all 2^32 fp32 patterns."""
    from qformats import nf4

    book = getattr(nf4, cells_name)

    def reference(x):
        return torch.bucketize(torch.nan_to_num(x), book.midpoints).to(torch.uint8)

    cells = torch.arange(1 << 16, dtype=torch.int32)
    finite = ((cells >> 7) & 0xFF) != 0xFF
    split = (book.threshold != float("inf")).nonzero().squeeze(1)
    assert finite[split].all() and split.numel() == (15 if cells_name == "_NF4_CELLS" else 241)
    low_bits = torch.arange(1 << 16, dtype=torch.int32)
    for chunk in split.split(16):
        x = ((chunk[:, None] << 16) | low_bits).reshape(-1).view(torch.float32)
        assert torch.equal(book.codes(x), reference(x))
    ends = torch.cat([cells[finite] << 16, (cells[finite] << 16) | 0xFFFF]).view(torch.float32)
    assert torch.equal(book.codes(ends), reference(ends))
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan"), 0.0, -0.0,
                            3.4028234663852886e38, -3.4028234663852886e38, 1e-45, -1e-45])  # fmt: skip
    quiet_nans = torch.tensor([0x7FC00000, 0x7FC00001, 0x7FFFFFFF, -0x400000, -1], dtype=torch.int32)
    special = torch.cat([special, quiet_nans.view(torch.float32)])
    assert torch.equal(book.codes(special), reference(special))


def test_quantize_nf4_special_inputs_match_the_bucketize_definition():
    """Zero blocks, blocks whose fp32 reciprocal overflows, inf and NaN weights, odd tails."""
    from qformats.nf4 import _NF4_MIDPOINTS, quantize_nf4

    torch.manual_seed(5)
    w = torch.randn(9, 64) * 0.02
    w[1] = 0.0
    w[2] = torch.randn(64) * 1e-40  # subnormal absmax: 1/absmax is inf, w * inf is +-inf
    w[2, :5] = 0.0  # 0 * inf is NaN
    w[3, 7] = float("inf")
    w[4, 9] = float("nan")
    w[5] = -0.0
    w[6, ::3] = -3e38
    w = torch.cat([w.reshape(-1), torch.randn(37)])  # partial last block, odd numel
    got = quantize_nf4(w, double_quant=False)
    padded = torch.cat([w, w.new_zeros(64 - 37)]).view(-1, 64)
    absmax = padded.abs().amax(1)
    normed = torch.nan_to_num(padded * (1.0 / absmax).unsqueeze(1), nan=0.0).reshape(-1)
    codes = torch.bucketize(normed, _NF4_MIDPOINTS).to(torch.uint8)[: w.numel() + 1]
    codes[w.numel()] = 7
    expected = (codes[0::2] << 4) | codes[1::2]
    assert torch.equal(got.packed.reshape(-1), expected)
    torch.testing.assert_close(got.absmax, absmax, rtol=0, atol=0, equal_nan=True)
