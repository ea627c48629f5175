"""`bench/serve.py --hostile`: the server under a mix of normal and hostile clients (issue 13).

Starts `qserve serve` on 127.0.0.1 (SmolLM2 NF4 and three rank-16 adapters, as bench/serve.py, with
runtime adapter loading on under an adapter root), then:
1. solo: every normal request once, alone, one after the other: the reference answers;
2. clean: the normal clients of the hostile mix alone (20 of 32) for `--seconds`, each sending normal
   requests (greedy, `ignore_eos`, `--tokens` tokens, a prompt and model from the solo set) back to back;
3. hostile: `--clients` clients for as long, a fixed share each of: normal requests; streams dropped after
   two chunks; bodies over the 4 MB limit; malformed bodies (not JSON, wrong types, extreme values, deep
   nesting, lone surrogates, text/plain); adapter loads, a request on it, unloads (and loads of a NaN one).
Reports requests served and 2xx/4xx/5xx per kind, p99 latency of normal requests (clean vs hostile),
the server's RSS before and after, and whether every normal answer equals its solo answer. Every client
stops at the deadline and every request has a timeout, so the run ends by itself.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import torch
from safetensors.torch import load_file, save_file

PROMPTS = [f"Request {i}. Write a short story about {topic}." for i, topic in
           enumerate(["the sea", "a city at night", "an old library", "mountains", "a train", "snow"])]  # fmt: skip
MALFORMED = [b"{", b"[]", b"null", b'{"model": "base", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             b'{"model": "base", "prompt": "\\ud800"}', b'{"model": "base", "prompt": "x", "seed": 18446744073709551616}',
             b'{"model": "base", "prompt": "x", "top_k": true}', b'{"model": "base", "prompt": "x", "temperature": NaN}',
             b'{"model": "base", "prompt": "x", "max_tokens": 1e999}', b'{"model": "base", "prompt": [99999999]}',
             b'{"model": "base", "messages": [{"role": "robot", "content": "x"}]}', b'{"model": 5, "prompt": "x"}',
             b'{"model": "base", "prompt": "x", "stop": [1, 2]}', b'{"model": "nope", "prompt": "x"}']  # fmt: skip
KINDS = ["normal"] * 20 + ["dropped"] * 4 + ["oversize"] * 2 + ["malformed"] * 4 + ["adapters"] * 2  # for 32 clients


def nan_adapter(src: Path, dst: Path) -> None:
    if (dst / "adapter_model.safetensors").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    first = min(tensors)
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, dst / "adapter_model.safetensors")


class Load:
    """One run's tallies: status codes per kind, normal latencies, answers that differ from solo."""

    def __init__(self, solo: dict):
        self.solo, self.status = solo, Counter()
        self.latencies: list[float] = []
        self.mismatches, self.normal = 0, 0

    def count(self, kind: str, status) -> None:
        self.status[(kind, status if isinstance(status, str) else f"{status // 100}xx")] += 1


async def normal(client: httpx.AsyncClient, url: str, job: tuple[str, str], tokens: int) -> tuple[int, str | None]:
    model, prompt = job
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    r = await client.post(url + "/v1/completions", json=body)
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None


async def client_loop(kind: str, i: int, url: str, deadline: float, load: Load, tokens: int, rng: random.Random):
    jobs = sorted(load.solo)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as client:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            try:
                if kind == "normal":
                    job = jobs[rng.randrange(len(jobs))]
                    t0 = time.perf_counter()
                    status, text = await normal(client, url, job, tokens)
                    if status == 200:
                        load.latencies.append(time.perf_counter() - t0)
                        load.normal += 1
                        load.mismatches += text != load.solo[job]
                elif kind == "dropped":
                    body = {"model": "base", "prompt": rng.choice(PROMPTS), "max_tokens": 200, "stream": True,
                            "ignore_eos": True}  # fmt: skip
                    async with client.stream("POST", url + "/v1/completions", json=body) as r:
                        status = r.status_code
                        lines = r.aiter_lines()
                        for _ in range(2):
                            await anext(lines)
                    # leaving the block closes the connection mid-stream
                elif kind == "oversize":
                    big = b'{"model": "base", "prompt": "' + b"x" * (5 * 2**20) + b'"}'
                    status = (await client.post(url + "/v1/completions", content=big,
                                                headers={"Content-Type": "application/json"})).status_code  # fmt: skip
                elif kind == "malformed":
                    raw = rng.choice(MALFORMED)
                    kind_header = "text/plain" if rng.random() < 0.2 else "application/json"
                    path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"])
                    status = (await client.post(url + path, content=raw, headers={"Content-Type": kind_header})).status_code
                else:  # adapters: load one, use it, unload it; now and then a NaN one (refused)
                    name, path = f"hot{i}-{n}", rng.choice(["adapter1", "adapter2", "adapter-nan"])
                    r = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
                    status = r.status_code
                    if status == 200:
                        load.count(kind, (await client.post(url + "/v1/completions", json={
                            "model": name, "prompt": "Hi", "max_tokens": 4})).status_code)  # fmt: skip
                        status = (await client.post(url + "/v1/unload_lora_adapter", json={"lora_name": name})).status_code
            except (httpx.HTTPError, StopAsyncIteration) as e:
                status = f"client error ({type(e).__name__})"
            load.count(kind, status)


async def run(url: str, clients: int, seconds: float, tokens: int, solo: dict, hostile: bool, seed: int) -> Load:
    load = Load(solo)
    kinds = [KINDS[i % len(KINDS)] for i in range(clients)]
    deadline = time.perf_counter() + seconds
    loops = [client_loop(k, i, url, deadline, load, tokens, random.Random(seed + i)) for i, k in enumerate(kinds)
             if hostile or k == "normal"]  # fmt: skip
    await asyncio.wait_for(asyncio.gather(*loops), timeout=seconds + 300)
    return load


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else float("nan")


def run_hostile(args, prepare, start_server, free_port) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    nf4, adapters = prepare(args.work)
    nan_adapter(adapters["adapter1"], args.work / "adapter-nan")
    port = free_port()
    proc = start_server(nf4, adapters, 8, port, ["--enable-lora-loading", "--adapter-root", str(args.work),
                                                  "--max-loras", "8"])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    server = psutil.Process(proc.pid)
    try:
        jobs = [(m, p) for m in ["base", *adapters] for p in PROMPTS]

        async def solo_answers():
            async with httpx.AsyncClient(timeout=httpx.Timeout(300)) as client:
                return {job: (await normal(client, url, job, args.tokens))[1] for job in jobs}

        solo = asyncio.run(solo_answers())
        rss_before = server.memory_info().rss
        clean = asyncio.run(run(url, args.clients, args.seconds, args.tokens, solo, False, args.seed))
        rss_clean = server.memory_info().rss
        hostile = asyncio.run(run(url, args.clients, args.seconds, args.tokens, solo, True, args.seed))
        rss_after = server.memory_info().rss
        health = httpx.get(url + "/health", timeout=10).json()
        after = asyncio.run(solo_answers())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print("| run | requests answered | normal served | normal p50 / p99 s | answers = solo | by kind: status |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for name, load in (("clean", clean), ("hostile", hostile)):
        tally = ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(load.status.items()))
        same = "all" if load.mismatches == 0 else f"{load.mismatches} differ"
        p50 = sorted(load.latencies)[len(load.latencies) // 2] if load.latencies else float("nan")
        print(f"| {name} | {sum(load.status.values())} | {load.normal} | {p50:.2f} / {p99(load.latencies):.2f} | "
              f"{same} | {tally} |")  # fmt: skip
    fives = sum(n for (_, s), n in hostile.status.items() if s == "5xx")
    print(f"\n{args.clients} clients (hostile run; its {sum(KINDS[i % len(KINDS)] == 'normal' for i in range(args.clients))} normal ones in the clean "
          f"run) x {args.seconds:.0f} s per run, {args.tokens}-token greedy answers on "
          f"{len(jobs)} (model, prompt) pairs; server RSS {rss_before / 2**20:.0f} MB before, {rss_clean / 2**20:.0f} "
          f"after the clean run, {rss_after / 2**20:.0f} after the hostile run; 5xx in the hostile run: {fives}; "
          f"/health after: {health}; solo answers after the runs unchanged: {after == solo}")  # fmt: skip
