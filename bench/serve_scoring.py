"""`bench/serve.py --scoring`: echo-scoring through the server against transformers + bitsandbytes (issue 16).

SmolLM2 NF4 quantized with fp32 compute (the same bytes as bench/serve.py's folder, `bnb_4bit_compute_dtype`
float32), then, in one run on one machine:
1. server: `qserve serve --dtype float32` in a subprocess; `--clients` clients (default 2) post
   `/v1/completions` with lists of `--batch` token-id prompts (default 4), `echo`, `logprobs: 1`,
   `max_tokens: 0`, as lm-evaluation-harness' `local-completions` does for log-likelihoods;
2. peer: the same sequences scored by transformers + bitsandbytes in this process, `--batch` at a
   time (right-padded, attention mask), fp32 log-softmax.
Reports scored tokens/s of each and the largest per-token difference between them (nats).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import torch

SENTENCES = ["The sea was calm that morning.", "A city at night hums with distant traffic.",
             "An old library keeps the smell of paper.", "Mountains rise above the clouds.",
             "The train crossed the valley slowly.", "The first snow covered the garden."]  # fmt: skip


def sequences(tokenizer, n: int, words: int) -> list[list[int]]:
    """n different token-id sequences of a few sentences each (varied lengths)."""
    out = []
    for i in range(n):
        text = f"Passage {i}. " + " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(2 + i % words))
        out.append(tokenizer.encode(text))
    return out


async def score_over_http(port: int, prompts: list[list[int]], batch: int, clients: int) -> list[list[float]]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    chunks = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    results: list[list[float]] = [[] for _ in prompts]
    queue: asyncio.Queue = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def client(http: httpx.AsyncClient):
        while not queue.empty():
            idx = queue.get_nowait()
            body = {"model": "base", "prompt": [prompts[i] for i in idx], "echo": True, "logprobs": 1,
                    "max_tokens": 0, "temperature": 0}  # fmt: skip
            r = await http.post(url, json=body)
            r.raise_for_status()
            for i, choice in zip(idx, r.json()["choices"]):
                results[i] = choice["logprobs"]["token_logprobs"][1:]

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as http:
        await asyncio.gather(*[client(http) for _ in range(clients)])
    return results


def score_with_transformers(folder: Path, prompts: list[list[int]], batch: int) -> tuple[list[list[float]], float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # transformers keeps the layers bitsandbytes does not quantize (embeddings, tied lm_head) in the
    # checkpoint's fp16 whatever `dtype` says; fp16 logits alone move log-probabilities by ~0.07 nats.
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    out: list[list[float]] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            group = prompts[i : i + batch]
            t = max(len(p) for p in group)
            ids = torch.tensor([p + [0] * (t - len(p)) for p in group])
            mask = torch.tensor([[1] * len(p) + [0] * (t - len(p)) for p in group])
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, p in enumerate(group):
                out.append(logp[row, : len(p) - 1].gather(-1, torch.tensor(p[1:])[:, None])[:, 0].tolist())
    return out, time.perf_counter() - t0


def run_scoring(args, prepare, start_server, free_port) -> None:
    from qconvert.quantize import quantize_checkpoint
    from qserve.tokenizer import Tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)  # the fp16 import
    folder = args.work / "smollm2-nf4-fp32-compute"
    if not (folder / "config.json").is_file():
        quantize_checkpoint(args.work / "smollm2-fp16", folder, compute_dtype="float32", force=True, progress=False)
    prompts = sequences(Tokenizer.from_dir(folder), args.prompts, 6)
    n_tokens = sum(len(p) - 1 for p in prompts)
    port = free_port()
    proc = start_server(folder, {}, 8, port, ["--dtype", "float32"])
    try:
        asyncio.run(score_over_http(port, prompts[:4], args.batch, 1))  # warm-up
        t0 = time.perf_counter()
        served = asyncio.run(score_over_http(port, prompts, args.batch, args.clients))
        served_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    peer, peer_s = score_with_transformers(folder, prompts, args.batch)
    diff = max(abs(a - b) for s, p in zip(served, peer) for a, b in zip(s, p))
    print(f"| scoring {len(prompts)} sequences, {n_tokens} tokens, batches of {args.batch} | seconds | scored tok/s |")
    print("| --- | ---: | ---: |")
    print(f"| qserve over HTTP, {args.clients} clients, echo + logprobs, max_tokens 0 | {served_s:.2f} | "
          f"{n_tokens / served_s:.0f} |")  # fmt: skip
    print(f"| transformers + bitsandbytes, in process | {peer_s:.2f} | {n_tokens / peer_s:.0f} |")
    print(f"\nlargest per-token difference: {diff:.2e} nats; torch threads {torch.get_num_threads()}")
