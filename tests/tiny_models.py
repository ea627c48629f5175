"""Tiny random HF checkpoints of every supported family, built with transformers in the test (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from qformats.nf4 import quantize_nf4

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


def write_nf4_folder(src: Path, out: Path, compute_dtype: str = "float32", skip: tuple[str, ...] = ("lm_head",)):
    """The NF4 + DQ checkpoint of the float folder `src`, in the DESIGN key layout (bitsandbytes')."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    result: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module = name.rsplit(".", 1)[0]
        is_linear = name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name
        if is_linear and not any(module.endswith(s) for s in skip):
            result.update(quantize_nf4(t).to_tensors(name))
        else:
            result[name] = t
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "_load_in_4bit": True, "load_in_8bit": False,
        "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(skip), "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / extra).is_file():
            (out / extra).write_bytes((src / extra).read_bytes())
    return out
