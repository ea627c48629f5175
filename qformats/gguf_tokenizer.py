"""Hugging Face tokenizer files from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, the merges, the token types,
the special token ids and the chat template as metadata. We rebuild the byte-level BPE tokenizer
they describe with `tokenizers`, splitting text the way llama.cpp does for the file's
`tokenizer.ggml.pre` (the split the merges were learned with), and write tokenizer.json,
tokenizer_config.json and special_tokens_map.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from qformats.errors import QError

# llama.cpp's token types (llama_token_type): only these two become added tokens.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# GPT-2's split (what `ByteLevel(use_regex=True)` applies); llama.cpp's "gpt2" pre-tokenizer.
_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str | None, source: Path) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for `tokenizer.ggml.pre` (llama-vocab.cpp), as a `tokenizers` pre-tokenizer."""
    if pre == "gpt2":
        return _GPT2_SPLIT
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # One digit per token first ("\p{N}"), then GPT-2's split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise QError(
        f"{source}: tokenizer.ggml.pre is {pre!r}; supported: 'gpt2', 'smollm'/'starcoder', 'llama-bpe'/'llama3'"
    )


# Each tokenizer field and what it must hold: llama.cpp's types, checked before anything indexes with them.
_LIST_FIELDS = {"tokenizer.ggml.tokens": str, "tokenizer.ggml.merges": str, "tokenizer.ggml.token_type": int}
_ID_FIELDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")


def check_tokenizer_types(meta: dict[str, Any], source: Path) -> None:
    """QError naming the first `tokenizer.*` field whose value has the wrong type (or a required one missing)."""
    for field, item in _LIST_FIELDS.items():
        value = meta.get(field)
        if value is None and field != "tokenizer.ggml.token_type":
            raise QError(f"{source}: metadata field {field} is missing")
        if value is not None and not (isinstance(value, list) and all(type(v) is item for v in value)):
            raise QError(f"{source}: metadata field {field} must be an array of {item.__name__}")
    for field in _ID_FIELDS:
        value = meta.get(f"tokenizer.ggml.{field}")
        if value is not None and (type(value) is not int or not 0 <= value < len(meta["tokenizer.ggml.tokens"])):
            raise QError(f"{source}: metadata field tokenizer.ggml.{field} is {value!r}; expected a token id "
                         f"in the vocabulary of {len(meta['tokenizer.ggml.tokens'])}")  # fmt: skip
    for field, kind in (("tokenizer.ggml.pre", str), ("tokenizer.chat_template", str)):
        if field in meta and type(meta[field]) is not kind:
            raise QError(f"{source}: metadata field {field} must be a string")


def build_tokenizer(meta: dict[str, Any], source: Path) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF describes; `meta` maps metadata keys to their values."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise QError(
            f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') tokenizers are supported"
        )
    check_tokenizer_types(meta, source)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise QError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise QError(f"{source}: tokenizer.ggml.tokens has duplicate tokens")
    merges = []
    for merge in meta["tokenizer.ggml.merges"]:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise QError(f"{source}: tokenizer.ggml.merges has a malformed entry {merge!r}")
        merges.append((pair[0], pair[1]))

    try:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for merges outside the vocabulary)
        raise QError(f"{source}: the tokenizer metadata does not make a BPE tokenizer ({e})") from None
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), source)
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>...) are matched whole and are special; user-defined ones are
    # matched whole too (llama.cpp does) but are ordinary text when decoding.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED]
    )

    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[bos_id]
        add_bos = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        tokenizer.post_processor = processors.Sequence([byte_level, add_bos])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def special_tokens(meta: dict[str, Any], source: Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings named by the metadata's `tokenizer.ggml.*_token_id` fields."""
    tokens = meta["tokenizer.ggml.tokens"]
    named = {}
    for name, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                        ("pad", "padding_token_id")):  # fmt: skip
        token_id = meta.get(f"tokenizer.ggml.{field}")
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise QError(f"{source}: tokenizer.ggml.{field} is {token_id}, outside the vocabulary of {len(tokens)}")
            named[f"{name}_token"] = tokens[token_id]
    return named


def tokenizer_files(meta: dict[str, Any], source: Path, max_length: int) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json, by name."""
    tokenizer = build_tokenizer(meta, source)
    named = special_tokens(meta, source)
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    control = [t for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL]
    extra = [t for t in control if t not in named.values()]

    config: dict[str, Any] = {
        # The generic fast class loads tokenizer.json as written, in transformers 4 and 5 alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": extra,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    special_map = {**named, "additional_special_tokens": extra}
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode(),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special_map),
    }


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
