"""The server under hostile input (issue 13): nothing one request or adapter does reaches another.

- the poisoning scenario of defect 1: a NaN adapter, and a NaN row of the model's embedding, used by
  4 concurrent requests; afterwards 4 concurrent greedy requests on the base equal their solo answers
  (both are injected past the load-time refusal, which has its own tests: the root fix must hold
  whatever a KV-cache slot holds);
- a seeded fuzz of every request field with wrong types and extreme values: each answer is a 4xx with
  an OpenAI error object, the server stays healthy, and a greedy request afterwards equals itself before.

A tiny random SmolLM2-shaped model served in-process by uvicorn on 127.0.0.1 (test_server.LiveServer).
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import make_peft_adapter, tiny_served_model
from test_server import LiveServer

from qformats.peft_adapter import read_adapter
from qserve.engine import Engine
from qserve.generate import SamplingParams
from qserve.loader import load_model
from qserve.request_guard import ServerPolicy
from qserve.server import build_server
from qserve.tokenizer import Tokenizer

BASE = "tiny"
GOOD_PROMPTS = ["Hello", "The capital of France is", "Count: 1 2 3", "Once upon a time there was a small fox"]
LONG_PROMPT = "Tell me a very long story about the lazy dog and the quick brown fox, in many words, please. " * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_adapters(tmp_path_factory.mktemp("hostile"))


def tiny_with_adapters(root):
    """The served model and, under `root / "adapters"`: good (r 4), big (r 16), nan (good with one NaN tensor)."""
    hf, folder = tiny_served_model(root / "base", seed=3)
    adapters = root / "adapters"
    make_peft_adapter(hf, adapters / "good", seed=11, r=4)
    make_peft_adapter(hf, adapters / "big", seed=12, r=16)
    nan_copy(adapters / "good", adapters / "nan")
    return folder, adapters


def nan_copy(src, dst):
    """A copy of adapter `src` whose first tensor is all NaN."""
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    first = min(tensors)
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, dst / "adapter_model.safetensors")
    return first


def solo_answers(folder, prompts, max_tokens=16):
    """Each prompt served alone by a fresh one-slot engine (greedy, ignore_eos)."""
    tok = Tokenizer.from_dir(folder)
    engine = Engine(load_model(folder), tok, max_batch=1, max_model_len=192).start()
    try:
        params = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=())
        return [engine.generate(p if isinstance(p, list) else tok.encode(p), params).text for p in prompts]
    finally:
        engine.stop()


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def complete_all(server, prompts, model=BASE, max_tokens=16):
    """The prompts sent at once (one batch), greedy with ignore_eos; their texts in order."""

    def one(prompt):
        r = post(server, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, "ignore_eos": True})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_a_nan_adapter_does_not_poison_later_batches(tiny):
    folder, adapters = tiny
    want = solo_answers(folder, GOOD_PROMPTS)
    app, engine = build_server(str(folder), served_model_name=BASE, max_batch=4, max_model_len=192)
    server = LiveServer(app, engine)
    try:
        bad = read_adapter(adapters / "good")  # NaN set past the reader, which refuses NaN
        bad.weights = {m: (torch.full_like(a, float("nan")), torch.full_like(b, float("nan")))
                       for m, (a, b) in bad.weights.items()}  # fmt: skip
        engine._run_on_engine(lambda: engine.adapter_ids.__setitem__("bad", engine.lora.add(bad)))
        complete_all(server, [LONG_PROMPT + str(i) for i in range(4)], model="bad")
        engine.unload_adapter("bad")
        for _ in range(2):
            assert complete_all(server, GOOD_PROMPTS) == want
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    finally:
        server.close()


def test_a_nan_model_row_does_not_poison_other_requests(tiny):
    folder, _ = tiny
    tok = Tokenizer.from_dir(folder)
    poison = 300  # a token none of GOOD_PROMPTS uses; requests with it are broken, the others must not be
    assert all(poison not in tok.encode(p) for p in GOOD_PROMPTS)
    want = solo_answers(folder, GOOD_PROMPTS)
    app, engine = build_server(str(folder), served_model_name=BASE, max_batch=4, max_model_len=192)
    server = LiveServer(app, engine)
    try:
        lm = engine.model
        with torch.no_grad():  # untie lm_head first: only the embedding row of `poison` goes NaN
            lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone(), requires_grad=False)
            lm.model.embed_tokens.weight[poison] = float("nan")
        bad_prompts = [tok.encode(LONG_PROMPT + str(i)) + [poison] * 3 for i in range(4)]
        complete_all(server, bad_prompts)
        for mix in (GOOD_PROMPTS, GOOD_PROMPTS[:2] + [bad_prompts[0], GOOD_PROMPTS[3]]):
            got = complete_all(server, mix)
            assert [g for g, p in zip(got, mix) if isinstance(p, str)] == [w for w, p in zip(want, GOOD_PROMPTS)
                                                                          if p in mix]  # fmt: skip
        assert complete_all(server, GOOD_PROMPTS) == want
    finally:
        server.close()


# ---------------------------------------------------------------- fuzz

WRONG = {  # every value here is wrong for its field (a wrong type, or out of range)
    "model": [5, True, [], {}, "", "nope", "x" * 5000, None],
    "max_tokens": [0, -1, 1.5, "5", True, 10**30, 2**64, [], {}, float("nan"), float("inf")],
    "temperature": [-0.1, 2.01, "1", True, 1e308, float("nan"), float("inf"), [], {"a": 1}],
    "top_p": [0, 1.5, -1, "x", True, float("nan"), []],
    "top_k": [True, -2, 1.5, "3", [], {}, float("nan")],
    "seed": [2**64, 18446744073709551616, -(2**63) - 1, 10**40, 1.5, "1", True, [], {}],
    "stop": [5, [1], ["a"] * 5, {}, True, [None], [["a"]]],
    "n": [17, 0, -1, True, "1", 1.5, [], 10**20],  # (n in [1, 16] since issue 16)
    "stream": ["yes", 1, [], {}, None],
    "stream_options": [5, "x", [], {"include_usage": "yes"}],
    "ignore_eos": ["true", 1, [], None],
    "frequency_penalty": [1, "x", -2.5, []],
    "presence_penalty": [0.5, True, {}],
}
COMPLETION_ONLY = {
    "prompt": [5, True, {}, [], [[]], [-1], [2**70], [1.5], "", [True, 3], None, ["a", 5], [[5, 6], []], ["a"] * 257],
    "echo": ["x", 1, 0, [True]], "best_of": [2, "x"], "logprobs": [21, True, -1, "5", 1.5], "suffix": ["x"],
}  # fmt: skip
CHAT_ONLY = {
    "messages": ["x", [], [1], [{"role": 5}], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "image_url"}]}], None, {"role": "user"},
                 [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"content": "x"}],
                 [{"role": "user", "content": "x" * 200_000}]],
    "tools": [[{}]], "response_format": [{"type": "json_object"}], "top_logprobs": [3, 21, True],
    "logprobs": ["yes", 1, [True]], "max_completion_tokens": [0, "1"],
}  # fmt: skip
RAW_BODIES = [b"", b"{", b"[]", b"5", b'"x"', b"null", b"NaN", b"[" * 200_000 + b"]" * 200_000,
              b'{"model": "tiny", "prompt": "\\ud800"}', b'{"model": "tiny", "prompt": "x", "stop": "\\udfff"}',
              b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud83d"}]}', b"\xff\xfe{}",
              b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"model": "tiny", "prompt": 1e999999}',
              b'{"seed": ' + b"9" * 5000 + b"}", b"{}" * 10]  # fmt: skip


def check_openai_error(r: httpx.Response, what) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], (what, r.text[:300])


def fuzz_cases(seed: int, n: int):
    """(path, body) pairs: a valid request with one to three fields set to a wrong value."""
    rng = random.Random(seed)
    valid = {"/v1/completions": {"model": BASE, "prompt": "Hello", "max_tokens": 4},
             "/v1/chat/completions": {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}}  # fmt: skip
    for path, only in (("/v1/completions", COMPLETION_ONLY), ("/v1/chat/completions", CHAT_ONLY)):
        fields = {**WRONG, **only}
        for field, values in fields.items():  # every wrong value once
            for value in values:
                yield path, {**valid[path], field: value}
        for _ in range(n):  # and random mixes of them
            body = dict(valid[path])
            for field in rng.sample(sorted(fields), rng.randint(1, 3)):
                body[field] = rng.choice(fields[field])
            yield path, body


def test_fuzzed_requests_get_4xx_and_leave_the_server_as_it_was(tiny):
    folder, adapters = tiny
    policy = ServerPolicy(enable_lora_loading=True, adapter_root=adapters, max_body_bytes=2**20, max_loras=2,
                          max_lora_rank=8)  # fmt: skip
    app, engine = build_server(str(folder), served_model_name=BASE, max_batch=4, max_model_len=192, policy=policy)
    server = LiveServer(app, engine)
    greedy = {"model": BASE, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    try:
        before = post(server, "/v1/completions", greedy).json()["choices"][0]["text"]
        count = 0
        with httpx.Client(timeout=30) as client:
            for path, body in fuzz_cases(seed=13, n=60):
                text = json.dumps(body)  # NaN and Infinity as Python's json writes them (and parses them)
                r = client.post(server.url + path, content=text, headers={"Content-Type": "application/json"})
                check_openai_error(r, body)
                count += 1
            for raw in RAW_BODIES:
                for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"):
                    r = client.post(server.url + path, content=raw, headers={"Content-Type": "application/json"})
                    check_openai_error(r, raw[:80])
            too_big = json.dumps({"model": BASE, "prompt": "x" * 2**20}).encode()
            check_openai_error(client.post(server.url + "/v1/completions", content=too_big,
                                           headers={"Content-Type": "application/json"}), "too big")  # fmt: skip
            for name, path in [(5, "good"), ("", "good"), ("a", 5), ("a", ""), ("a", "\0"), ("a", "../base"),
                               ("a", "/etc"), ("a", "nan"), ("a", "big"), ("a", "missing"), (BASE, "good"),
                               ("a", "good/../../base"), (["x"], ["y"])]:  # fmt: skip
                r = client.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
                check_openai_error(r, (name, path))
            for name in [5, None, "never-loaded", [], {}]:
                r = client.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name})
                check_openai_error(r, name)
        assert count > 250
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        assert not engine.running and not engine.waiting and not engine.adapter_ids
        assert engine.metrics.finished_by_reason.get("error", 0) == 0
        assert post(server, "/v1/completions", greedy).json()["choices"][0]["text"] == before
    finally:
        server.close()
