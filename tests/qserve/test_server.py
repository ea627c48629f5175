"""qserve.server with the official `openai` client over HTTP on 127.0.0.1 (uvicorn in a thread).

A tiny random model with three PEFT adapters for most tests; SmolLM2 NF4 for the end-to-end check.
Every expected answer comes from the request served alone (a fresh engine with one slot) or from
`qserve generate`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from click.testing import CliRunner
from test_engine import make_peft_adapter, tiny_served_model, wait_for

from qconvert.quantize import quantize_checkpoint
from qserve.cli import main as qserve_cli
from qserve.cli_serve import parse_adapter_spec
from qserve.engine import Engine
from qserve.generate import Generator, SamplingParams
from qserve.loader import load_model
from qserve.request_guard import ServerPolicy
from qserve.server import build_server
from qserve.tokenizer import Tokenizer

BASE = "tiny"


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app, engine):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.engine.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    hf, folder = tiny_served_model(root / "base", seed=3)
    for i, name in enumerate(("a1", "a2", "a3", "late")):
        make_peft_adapter(hf, root / name, seed=10 + i, r=4 + 4 * i, alpha=8)
    return folder, root


@pytest.fixture(scope="module")
def live(tiny):
    folder, root = tiny
    app, engine = build_server(str(folder), {n: str(root / n) for n in ("a1", "a2", "a3")}, served_model_name=BASE,
                               max_batch=8, max_queue=32, max_model_len=192,
                               policy=ServerPolicy(enable_lora_loading=True))  # fmt: skip
    server = LiveServer(app, engine)
    yield server
    server.close()


class Alone:
    """The reference: each request served by its own one-slot engine, one at a time."""

    def __init__(self, folder, root):
        self.folder, self.root, self.engines = folder, root, {}
        self.tokenizer = Tokenizer.from_dir(folder)

    def __call__(self, ids, max_tokens, adapter=None, stop=()):
        if adapter not in self.engines:
            eng = Engine(load_model(self.folder), self.tokenizer, max_batch=1, max_model_len=192)
            if adapter:
                eng.load_adapter(adapter, str(self.root / adapter))
            self.engines[adapter] = eng.start()
        return self.engines[adapter].generate(ids, SamplingParams(max_new_tokens=max_tokens, stop=stop), adapter)

    def close(self):
        for e in self.engines.values():
            e.stop()


@pytest.fixture(scope="module")
def alone(tiny):
    ref = Alone(*tiny)
    yield ref
    ref.close()


def test_models_health_metrics(live):
    ids = [m.id for m in live.client.models.list().data]
    assert ids == [BASE, "a1", "a2", "a3"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    live.client.completions.create(model="a1", prompt="hi", max_tokens=3, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    for line in ("# TYPE qserve_requests_total counter", "qserve_queue_depth 0", "# TYPE qserve_batch_size gauge",
                 'qserve_time_to_first_token_seconds_bucket{le="+Inf"}', "qserve_generation_tokens_total"):  # fmt: skip
        assert line in text


@pytest.mark.parametrize("model", [BASE, "a1", "a2"])
def test_chat_and_completion_streamed_and_not(live, alone, model):
    tok = alone.tokenizer
    prompt = "The capital of France is"
    want = alone(tok.encode(prompt), 24, None if model == BASE else model)
    got = live.client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.model == model and got.object == "text_completion"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    chunks = list(live.client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                                 stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want = alone(tok.encode_chat(messages), 20, None if model == BASE else model)
    got = live.client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
    stream = live.client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-2].choices[0].finish_reason == want.finish_reason


def test_stop_and_seed(live, alone):
    want = alone(alone.tokenizer.encode("abc"), 40, "a2", stop=["e"])
    got = live.client.completions.create(model="a2", prompt="abc", max_tokens=40, temperature=0, stop=["e"])
    assert got.choices[0].text == want.text
    kw = {"model": "a3", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.8, "top_p": 0.9, "seed": 42}
    texts = {live.client.completions.create(**kw).choices[0].text for _ in range(2)}
    assert len(texts) == 1


def test_http_greedy_equals_qserve_generate(live, tiny):
    folder, _ = tiny
    for chat in (False, True):
        args = ["generate", "--model", str(folder), "--prompt", "Tell me a story", "--max-tokens", "30"]
        result = CliRunner().invoke(qserve_cli, args + (["--chat"] if chat else []))
        assert result.exit_code == 0, result.output
        if chat:
            got = live.client.chat.completions.create(model=BASE, max_tokens=30, temperature=0,
                                                      messages=[{"role": "user", "content": "Tell me a story"}])  # fmt: skip
            text = got.choices[0].message.content
        else:
            text = live.client.completions.create(model=BASE, prompt="Tell me a story", max_tokens=30,
                                                  temperature=0).choices[0].text  # fmt: skip
        assert result.stdout == text + "\n"


def test_32_concurrent_streams_over_3_adapters(live, alone):
    tok = alone.tokenizer
    jobs = [(f"Request {i}: tell me about {['cats', 'rain', 'code', 'tea'][i % 4]}", ["a1", "a2", "a3"][i % 3],
             8 + (i * 5) % 17) for i in range(32)]  # fmt: skip
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    peak = []

    async def one(prompt, model, n):
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True)
        parts = []
        async for c in stream:
            parts.append(c.choices[0].text)
            peak.append(len(live.engine.running))
        return "".join(parts)

    async def all_of_them():
        return await asyncio.gather(*(one(*job) for job in jobs))

    texts = asyncio.run(all_of_them())
    assert max(peak) == 8  # the batch was full
    for (prompt, model, n), text in zip(jobs, texts):
        assert text == alone(tok.encode(prompt), n, model).text, (prompt, model)


def test_cancelling_a_stream_frees_its_slot(live, alone):
    prompt = next(p for p in (f"Count {i}" for i in range(50))
                  if alone(alone.tokenizer.encode(p), 150).finish_reason == "length")  # never stops by itself
    cancelled = live.engine.metrics.finished_by_reason.get("cancelled", 0)
    stream = live.client.completions.create(model="a1", prompt=prompt, max_tokens=150, temperature=0, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    assert len(live.engine.running) == 1
    stream.close()
    t0 = time.perf_counter()
    wait_for(lambda: not live.engine.running, seconds=5)
    assert time.perf_counter() - t0 < 2
    assert live.engine.metrics.finished_by_reason["cancelled"] == cancelled + 1
    assert live.client.completions.create(model="a1", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live):
    c = live.client

    def ok():
        assert c.completions.create(model=BASE, prompt="still here", max_tokens=2).usage.completion_tokens >= 1

    bad = [
        (openai.NotFoundError, {"model": "nope", "prompt": "x"}, "model_not_found"),
        (openai.BadRequestError, {"model": BASE, "prompt": "x", "max_tokens": -5}, "invalid_value"),
        (openai.BadRequestError, {"model": BASE, "prompt": "x", "temperature": 2.5}, "invalid_value"),
        (openai.BadRequestError, {"model": BASE, "prompt": "x", "top_p": 0}, "invalid_value"),
        (openai.BadRequestError, {"model": BASE, "prompt": "x", "n": 17}, "invalid_value"),  # n > 1 samples since issue 16
        (openai.BadRequestError, {"model": BASE, "prompt": "word " * 300}, "context_length_exceeded"),
        (openai.BadRequestError, {"model": BASE, "prompt": "x", "max_tokens": 500}, "context_length_exceeded"),
        (openai.BadRequestError, {"model": BASE, "prompt": [5, 100000]}, "invalid_value"),
    ]
    for error, kwargs, code in bad:
        with pytest.raises(error) as e:
            c.completions.create(**kwargs)
        assert e.value.body["code"] == code and e.value.body["message"]
        ok()
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="a9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=BASE, messages=[])
    r = httpx.post(live.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=10,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(live.url + "/v1/completions", json=["not", "an", "object"], timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(live.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    ok()


def test_full_queue_is_429(tiny):
    folder, _ = tiny
    app, engine = build_server(str(folder), served_model_name=BASE, max_batch=1, max_queue=1, max_model_len=192)
    server = LiveServer(app, engine)
    try:
        params = SamplingParams(max_new_tokens=150, stop_token_ids=())
        running = [engine.submit([5, 6], params)]
        wait_for(lambda: len(engine.running) == 1)
        running.append(engine.submit([5, 6], params))  # the queue is full now
        with pytest.raises(openai.RateLimitError) as e:
            server.client.completions.create(model=BASE, prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        for r in running:
            engine.cancel(r)
        assert server.client.completions.create(model=BASE, prompt="x", max_tokens=2).choices
    finally:
        server.close()


def test_load_and_unload_adapters_at_run_time(live, alone, tiny):
    _, root = tiny
    r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(root / "late")})
    assert r.status_code == 200, r.text
    assert "late" in [m.id for m in live.client.models.list().data]
    want = alone(alone.tokenizer.encode("Hello"), 12, "late")
    assert live.client.completions.create(model="late", prompt="Hello", max_tokens=12, temperature=0
                                          ).choices[0].text == want.text  # fmt: skip
    again = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(root / "a1")})
    assert again.status_code == 400
    missing = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "no")})
    assert missing.status_code == 400 and "no" in missing.json()["error"]["message"]
    assert httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="late", prompt="Hello", max_tokens=2)
    assert httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404


@pytest.fixture(scope="module")
def smollm2_nf4(smollm2_fp16_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "nf4"
    quantize_checkpoint(smollm2_fp16_dir, out, progress=False)
    return out


def test_smollm2_nf4_end_to_end(smollm2_nf4):
    """The real model: chat over HTTP (streamed and not) equals `qserve generate`, and knows Paris."""
    app, engine = build_server(str(smollm2_nf4), served_model_name="smollm2", max_batch=4, max_model_len=256)
    server = LiveServer(app, engine)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        got = server.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
        text = got.choices[0].message.content
        tok = Tokenizer.from_dir(smollm2_nf4)
        want = Generator(engine.model, tok).generate([tok.encode_chat(messages)], SamplingParams(max_new_tokens=24))
        assert text == want[0].text and "Paris" in text
        stream = server.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                                       temperature=0, stream=True)  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    finally:
        server.close()


def test_adapter_from_the_hub(live, alone, tiny, tmp_path, monkeypatch):
    """`lora_path` / `--adapter` may be a Hub id: fetched through qformats.hub_pull (a fake Hub on 127.0.0.1)."""
    from hub_server import FakeHub
    from huggingface_hub import HfApi

    _, root = tiny
    hub = FakeHub(tokens={"hf_good": "tester"})
    hub.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        api = HfApi(endpoint=hub.endpoint, token="hf_good")
        api.create_repo("tester/a2-lora")
        api.upload_folder(repo_id="tester/a2-lora", folder_path=str(root / "a2"))
        name, source = parse_adapter_spec("tester/a2-lora")
        r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": source}, timeout=60)
        assert r.status_code == 200, r.text
        got = live.client.completions.create(model="a2-lora", prompt="Hello", max_tokens=12, temperature=0)
        assert got.choices[0].text == alone(alone.tokenizer.encode("Hello"), 12, "a2").text
        r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "tester/missing"})
        assert r.status_code == 400 and "tester/missing" in r.json()["error"]["message"]
    finally:
        hub.stop()
