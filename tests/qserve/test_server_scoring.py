"""Scoring through the server (issue 16): echo, logprobs, list prompts, max_tokens 0, n > 1, chat logprobs,
their bad input, and /metrics by status; with the official `openai` client over HTTP.

The log-probabilities are checked against the peers on the same NF4 folder with fp32 compute:
transformers + bitsandbytes for the base, PEFT over it for the adapter.
"""

from __future__ import annotations

import threading

import httpx
import openai
import peft
import pytest
import torch
import transformers
from test_engine import make_peft_adapter
from test_server import LiveServer
from tiny_models import save_tiny, save_tiny_tokenizer

from qconvert.quantize import quantize_checkpoint
from qserve.engine import QueueFull
from qserve.request_guard import ServerPolicy
from qserve.server import build_server

BASE = "tiny"
TOL = 1e-4  # nats per token, the bound


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    hf = save_tiny("smollm2", root / "fp32", seed=5, vocab_size=320, max_position_embeddings=256)
    save_tiny_tokenizer(root / "fp32")
    quantize_checkpoint(root / "fp32", root / "nf4", compute_dtype="float32", progress=False)
    make_peft_adapter(hf, root / "lora", seed=7, r=4, alpha=8)
    return root / "nf4", root / "lora"


@pytest.fixture(scope="module")
def live(folders):
    nf4, lora = folders
    app, engine = build_server(str(nf4), {"lora": str(lora)}, served_model_name=BASE, max_batch=4, max_model_len=192,
                               dtype=torch.float32, policy=ServerPolicy(max_prompts=8))  # fmt: skip
    server = LiveServer(app, engine)
    yield server
    server.close()


@pytest.fixture(scope="module")
def peers(folders):
    """model name -> the peer that defines its log-probabilities."""
    nf4, lora = folders
    base = transformers.AutoModelForCausalLM.from_pretrained(nf4).eval()
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(nf4), lora).eval()
    assert base.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    return {BASE: base, "lora": adapted}


def peer_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row j is the log-distribution of the token after ids[:j + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def token_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_against_peer(choice, ids: list[int], ref: torch.Tensor, k: int) -> None:
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - ref[j - 1, ids[j]].item()) < TOL, j
        want = ref[j - 1].topk(k).values.tolist()
        got = sorted(lp.top_logprobs[j].values(), reverse=True)
        # (two ids that decode to the same string share one key: compare the ones present)
        assert len(got) <= k and all(any(abs(g - w) < TOL for w in want) for g in got), j
        assert abs(got[0] - want[0]) < TOL


@pytest.mark.parametrize("model", [BASE, "lora"])
def test_echo_scoring_equals_transformers_bnb_and_peft(live, peers, model):
    prompts = [token_ids(n, seed=n) for n in (7, 19, 12)]
    got = live.client.completions.create(model=model, prompt=prompts, echo=True, logprobs=5, max_tokens=0,
                                         temperature=0)  # fmt: skip
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert got.usage.prompt_tokens == 38 and got.usage.completion_tokens == 0
    for choice, ids in zip(got.choices, prompts):
        assert choice.finish_reason == "length"
        check_against_peer(choice, ids, peer_logprobs(peers[model], ids), 5)
    if model == "lora":  # the adapter matters: a base-only answer would fail the check above
        assert (peer_logprobs(peers["lora"], ids) - peer_logprobs(peers[BASE], ids)).abs().max() > 0.05


def test_long_prompts_are_scored_in_chunks_with_the_same_values(live, monkeypatch):
    ids = token_ids(40, seed=9)
    whole = live.client.completions.create(model=BASE, prompt=ids, echo=True, logprobs=2, max_tokens=0)
    monkeypatch.setattr(live.engine, "prompt_logprob_chunk", 7)
    chunked = live.client.completions.create(model=BASE, prompt=ids, echo=True, logprobs=2, max_tokens=0)
    a, b = whole.choices[0].logprobs, chunked.choices[0].logprobs
    assert max(abs(x - y) for x, y in zip(a.token_logprobs[1:], b.token_logprobs[1:])) < 1e-5  # fp32 rounding
    assert a.tokens == b.tokens and len(b.token_logprobs) == 40


@pytest.mark.parametrize("model", [BASE, "lora"])
def test_greedy_generation_logprobs_equal_the_peer(live, peers, model):
    ids = token_ids(9, seed=1)
    got = live.client.completions.create(model=model, prompt=ids, echo=True, logprobs=3, max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    with torch.no_grad():
        full = peers[model].generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)[0]
    full = full.tolist()
    assert got.usage.completion_tokens == 6 and len(full) == 15
    tok = live.engine.tokenizer
    assert got.choices[0].logprobs.tokens == [tok.decode([i], skip_special_tokens=False) for i in full]
    check_against_peer(got.choices[0], full, peer_logprobs(peers[model], full), 3)
    # Without echo: only the generated tokens, the same values.
    plain = live.client.completions.create(model=model, prompt=ids, logprobs=3, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    assert plain.choices[0].logprobs.token_logprobs == got.choices[0].logprobs.token_logprobs[9:]
    assert plain.choices[0].text == got.choices[0].text[len(tok.decode(ids, False)) :]


def test_text_prompts_echo_lists_and_n(live):
    c = live.client
    prompt = "The capital of France is"
    got = c.completions.create(model=BASE, prompt=prompt, echo=True, logprobs=5, max_tokens=3, temperature=0)
    choice = got.choices[0]
    assert choice.text.startswith(prompt)
    n_tokens = got.usage.prompt_tokens + got.usage.completion_tokens
    assert len(choice.logprobs.tokens) == n_tokens and choice.logprobs.token_logprobs[0] is None
    alone = c.completions.create(model=BASE, prompt=prompt, max_tokens=3, temperature=0).choices[0].text
    assert choice.text == prompt + alone
    # A list of prompts: each its own choice, each as if alone.
    prompts = ["Hello", "def main():", "Größe und café", "The quick brown fox"]
    many = c.completions.create(model="lora", prompt=prompts, max_tokens=5, temperature=0)
    for i, (p, ch) in enumerate(zip(prompts, many.choices)):
        assert ch.index == i
        assert ch.text == c.completions.create(model="lora", prompt=p, max_tokens=5, temperature=0).choices[0].text
    # n samples per prompt: index = prompt * n + sample; sample j of seed s samples like seed s + j alone.
    sampled = c.completions.create(model=BASE, prompt=["Hi", "Yo"], n=3, max_tokens=6, temperature=1, seed=11)
    assert [ch.index for ch in sampled.choices] == list(range(6))
    for i, ch in enumerate(sampled.choices):
        one = c.completions.create(model=BASE, prompt=["Hi", "Yo"][i // 3], max_tokens=6, temperature=1, seed=11 + i % 3)
        assert ch.text == one.choices[0].text
    # Streamed: the same texts and logprobs, chunk by chunk, each chunk naming its choice.
    stream = c.completions.create(model=BASE, prompt=prompts[:2], echo=True, logprobs=2, max_tokens=4, temperature=0,
                                  stream=True)  # fmt: skip
    texts, logprobs = ["", ""], [[], []]
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            logprobs[ch.index] += ch.logprobs.token_logprobs if ch.logprobs else []
    whole = c.completions.create(model=BASE, prompt=prompts[:2], echo=True, logprobs=2, max_tokens=4, temperature=0)
    assert texts == [ch.text for ch in whole.choices]
    assert logprobs == [ch.logprobs.token_logprobs for ch in whole.choices]


def test_chat_logprobs(live):
    messages = [{"role": "user", "content": "Name a colour."}]
    got = live.client.chat.completions.create(model="lora", messages=messages, logprobs=True, top_logprobs=3,
                                              max_tokens=8, temperature=0)  # fmt: skip
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.bytes == list(item.token.encode())
        assert item.logprob == item.top_logprobs[0].logprob  # greedy: the chosen token is the most likely
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
    # The same numbers as the completions route on the same prompt ids.
    ids = live.engine.tokenizer.encode_chat(messages)
    same = live.client.completions.create(model="lora", prompt=ids, logprobs=3, max_tokens=8, temperature=0)
    assert [i.logprob for i in content] == same.choices[0].logprobs.token_logprobs
    plain = live.client.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == got.choices[0].message.content


def test_scoring_mixes_with_generation_and_each_answers_as_alone(live):
    c = live.client
    ids = [token_ids(n, seed=100 + n) for n in (5, 30, 11, 17)]
    want_scores = [c.completions.create(model=BASE, prompt=p, echo=True, logprobs=1, max_tokens=0).choices[0]
                   for p in ids]  # fmt: skip
    want_text = c.completions.create(model="lora", prompt="Once upon", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    results = {}

    def generate():
        results["text"] = c.completions.create(model="lora", prompt="Once upon", max_tokens=40, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip

    def score(i):
        results[i] = c.completions.create(model=BASE, prompt=ids[i], echo=True, logprobs=1, max_tokens=0).choices[0]

    threads = [threading.Thread(target=generate)] + [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["text"] == want_text
    for i, want in enumerate(want_scores):
        got = results[i].logprobs.token_logprobs
        assert got[0] is None and max(abs(a - b) for a, b in zip(got[1:], want.logprobs.token_logprobs[1:])) < 1e-5


def test_bad_scoring_input_is_400_naming_the_field_and_others_go_on(live):
    c = live.client
    stream = c.completions.create(model=BASE, prompt="Keep going", max_tokens=60, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    first = next(iter(stream))
    bad = [
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": ["x"] * 10_000}, "prompt"),
        ({"prompt": ["x"] * 9}, "prompt"),  # the server's --max-prompts is 8
        ({"prompt": ["x", 5]}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 17}, "n"),
    ]
    for kwargs, field in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=BASE, **{k: v for k, v in kwargs.items() if k in ("prompt", "max_tokens", "n")},
                                 extra_body={k: v for k, v in kwargs.items() if k not in ("prompt", "max_tokens", "n")})  # fmt: skip
        assert e.value.status_code == 400 and e.value.body["param"] == field, (kwargs, e.value.body)
    msgs = [{"role": "user", "content": "x"}]
    for kwargs, field in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
                          ({"logprobs": "yes"}, "logprobs")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=BASE, messages=msgs, extra_body=kwargs)
        assert e.value.body["param"] == field
    rest = "".join(ch.choices[0].text for ch in stream)
    whole = c.completions.create(model=BASE, prompt="Keep going", max_tokens=60, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    assert first.choices[0].text + rest == whole


def metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_metrics_count_every_response_by_status(folders, monkeypatch):
    nf4, _ = folders
    policy = ServerPolicy(api_key="k", max_body_bytes=4096)
    app, engine = build_server(str(nf4), served_model_name=BASE, max_batch=2, max_queue=1, max_model_len=64,
                               policy=policy)  # fmt: skip
    server = LiveServer(app, engine)
    try:
        url, key = server.url, {"Authorization": "Bearer k"}

        def post(body, headers=key, **kw):
            return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30, **kw).status_code

        sent = [httpx.get(url + "/health").status_code, httpx.get(url + "/v1/models", headers=key).status_code,
                post({"model": BASE, "prompt": [5, 6], "max_tokens": 0, "echo": True, "logprobs": 1}),
                post({"model": BASE, "prompt": "x", "logprobs": 21}), post({"model": BASE, "prompt": "x", "echo": 1}),
                post({"model": BASE, "prompt": "x"}, headers={}), post({"model": "nope", "prompt": "x"}),
                httpx.get(url + "/v1/nothing", headers=key).status_code,
                post({"model": BASE, "prompt": "x" * 5000}),
                httpx.post(url + "/v1/completions", content=b"{}", headers={**key, "Content-Type": "text/plain"}).status_code]  # fmt: skip

        def full(*a, **k):
            raise QueueFull("the server is busy")

        monkeypatch.setattr(engine, "submit", full)
        sent.append(post({"model": BASE, "prompt": "x"}))
        monkeypatch.setattr(engine, "submit", lambda *a, **k: 1 / 0)  # a bug: the outermost handler answers
        sent.append(post({"model": BASE, "prompt": "x"}))
        monkeypatch.undo()
        assert sent == [200, 200, 200, 400, 400, 401, 404, 404, 413, 415, 429, 500]
        text = httpx.get(url + "/metrics").text
        counts = {s: sent.count(s) for s in set(sent)}
        for status, n in counts.items():
            assert metric(text, f'qserve_http_responses_total{{status="{status}"}}') == n, status
        assert metric(text, "qserve_requests_rejected_total") == 8  # every 4xx, validation refusals included
    finally:
        server.close()
