"""Tiny random HF checkpoints of every supported family, built with transformers in the test (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "initializer_range": 0.2,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # fmt: skip

FAMILIES = {
    # Llama 3.1: llama3 rope scaling, untied, GQA.
    "llama": (transformers.LlamaConfig, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, "tie_word_embeddings": False}),
    # SmolLM2 shape: Llama with tied embeddings, plain rope.
    "smollm2": (transformers.LlamaConfig, {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                                               "tie_word_embeddings": True}),
    # Mistral: sliding window shorter than the test sequences, head_dim != hidden / heads.
    "mistral": (transformers.MistralConfig, {"sliding_window": 8, "head_dim": 32, "tie_word_embeddings": False}),
    # Qwen2: q/k/v biases, tied.
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    # Qwen3: q/k norm, explicit head_dim.
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32, "tie_word_embeddings": False}),
}  # fmt: skip


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    config_cls, extra = FAMILIES[family]
    config = config_cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":  # transformers initialises biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
    return model.eval()


def save_tiny(family: str, out: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """Save a tiny random model to `out` (safetensors) and return the transformers model (fp32)."""
    model = tiny_hf_model(family, seed, **overrides)
    model.to(dtype).save_pretrained(out)
    return model.float()


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Größe, café, naïve, 日本語のテキスト, emoji 🙂🚀 and the end.",
    "def main():\n    return 42  # numbers 1234567890",
] * 20


def save_tiny_tokenizer(out: Path, kind: str = "bytelevel", vocab_size: int = 320) -> None:
    """A small trained tokenizer in `out`: GPT-2 style byte-level BPE with a ChatML template (SmolLM2's kind),
    or a SentencePiece-style BPE with byte fallback and a leading-space marker (Llama 2's kind)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        tok.train_from_iterator(CORPUS, trainer)
        bos, eos, template = "<|im_start|>", "<|im_end|>", CHATML
    else:
        specials = ["<unk>", "<s>", "</s>"]
        normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, limit_alphabet=40)
        base = Tokenizer(models.BPE(unk_token="<unk>"))
        base.normalizer = normalizer
        base.train_from_iterator(CORPUS, trainer)
        state = json.loads(base.to_str())
        vocab = dict(state["model"]["vocab"])
        for b in range(256):  # byte-fallback pieces, as in Llama's vocabulary
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
        tok.add_special_tokens(specials)
        tok.normalizer = normalizer
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # fmt: skip
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])  # fmt: skip
        bos, eos = "<s>", "</s>"
        template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                    "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "unk_token": specials[0] if kind != "bytelevel" else None, "pad_token": specials[0],
           "chat_template": template, "clean_up_tokenization_spaces": False, "model_max_length": 128}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def copy_into_peft(ours, ref):
    """Our LoRA factors into a PEFT model of the same adapter layout (to compare the two on equal weights)."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                p.copy_(ours.get_submodule(key.rsplit(".", 1)[0]).weight)
