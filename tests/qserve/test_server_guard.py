"""Issue 13's server defects, one test (or a few) each: non-finite weights refused at load (1), seeds out of
int64 range and failures inside one request's admission (2), the body size cap and length checks before
tokenizing (6), API key, content type and runtime adapter loading (7), 500s that are 400s (9), adapter
limits, chat roles and chat template limits (10). The poisoning scenario and the fuzz: test_hostile_server.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_engine import wait_for
from test_hostile_server import BASE, nan_copy, post, solo_answers, tiny_with_adapters
from test_server import LiveServer

import qserve.tokenizer as tokenizer_module
from qconvert.cli import main as qconvert_cli
from qconvert.sft_data import ROLES
from qformats.errors import QError
from qformats.peft_adapter import read_adapter
from qserve.cli import main as qserve_cli
from qserve.engine import Engine, Event
from qserve.generate import SamplingParams
from qserve.loader import load_model
from qserve.request_guard import ServerPolicy
from qserve.server import build_server
from qserve.tokenizer import CHAT_ROLES, Tokenizer

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_adapters(tmp_path_factory.mktemp("guard"))


@contextlib.contextmanager
def serving(folder, adapters=None, **policy):
    app, engine = build_server(str(folder), adapters, served_model_name=BASE, max_batch=4, max_model_len=192,
                               policy=ServerPolicy(**policy))  # fmt: skip
    server = LiveServer(app, engine)
    try:
        yield server
    finally:
        server.close()


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ---------------------------------------------------------------- 1: non-finite weights refused at load


def test_a_nan_adapter_is_refused_by_the_reader_the_server_and_push(tiny, tmp_path):
    folder, adapters = tiny
    with pytest.raises(QError, match=r"tensor .*\.lora_[AB]\.weight has non-finite values"):
        read_adapter(adapters / "nan")
    with serving(folder, enable_lora_loading=True, adapter_root=adapters) as server:
        err = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "n", "lora_path": "nan"}), 400)
        assert "non-finite" in err["message"] and ".lora_" in err["message"]
        assert str(adapters) not in err["message"]
    result = CliRunner().invoke(qconvert_cli, ["push", str(adapters / "nan"), "me/nan", "--dry-run"])
    assert result.exit_code == 1 and "non-finite values" in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    alpha = tmp_path / "alpha"
    nan_copy(adapters / "good", alpha)
    save_file(load_file(adapters / "good" / "adapter_model.safetensors"), alpha / "adapter_model.safetensors")
    cfg = json.loads((alpha / "adapter_config.json").read_text())
    (alpha / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": float("nan")}))
    with pytest.raises(QError, match="lora_alpha"):
        read_adapter(alpha)


def test_a_model_with_a_nan_row_is_refused_naming_the_tensor(tiny, tmp_path):
    folder, _ = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.embed_tokens.weight"][7] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QError, match=r"tensor 'model.embed_tokens.weight' has non-finite values"):
        load_model(bad)
    result = CliRunner().invoke(qserve_cli, ["generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "2"])
    assert result.exit_code == 1 and "model.embed_tokens.weight" in result.output


# ---------------------------------------------------------------- 2: seeds, admission failures


def test_a_seed_out_of_int64_is_400_and_running_requests_finish(tiny):
    folder, _ = tiny
    with serving(folder) as server:
        results = []

        def running(i):
            # Long enough to be seen running together on a busy machine (the context is 192).
            r = post(server, "/v1/completions", {"model": BASE, "prompt": f"Story {i}", "max_tokens": 170,
                                                 "temperature": 0, "ignore_eos": True})  # fmt: skip
            results.append((r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.text))

        threads = [threading.Thread(target=running, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(server.engine.running) == 3, seconds=120)
        for seed in (18446744073709551616, 2**63, -(2**63) - 1):
            body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "seed": seed, "max_tokens": 4}
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=20)
            assert error_of(r, 400)["param"] == "seed"
        for t in threads:
            t.join(60)
        assert results == [(200, 170)] * 3


def test_a_failure_in_one_requests_admission_fails_that_request_only(tiny):
    folder, _ = tiny
    tok = Tokenizer.from_dir(folder)
    prompts = ["Hello", "The capital of France is", "Count: 1 2 3", "Once upon"]
    want = solo_answers(folder, prompts, max_tokens=8)
    engine = Engine(load_model(folder), tok, max_batch=4, max_model_len=192)
    events: dict[int, list[Event]] = {i: [] for i in range(4)}
    params = [SamplingParams(max_new_tokens=8, stop_token_ids=()) for _ in prompts]
    reqs = [engine.submit(tok.encode(p), params[i], emit=events[i].append) for i, p in enumerate(prompts)]
    reqs[1].params.seed = 2**64  # past submit's check: what any admission failure looks like
    engine.start()
    try:
        wait_for(lambda: all(r.done for r in reqs), seconds=30)
    finally:
        engine.stop()
    assert events[1][-1].error and "Overflow" in events[1][-1].error
    for i in (0, 2, 3):
        assert not events[i][-1].error and "".join(e.text for e in events[i]) == want[i]


def test_generate_with_a_seed_out_of_range_is_one_line(tiny):
    folder, _ = tiny
    result = CliRunner().invoke(qserve_cli, ["generate", "--model", str(folder), "--prompt", "hi",
                                             "--seed", "18446744073709551616"])  # fmt: skip
    assert result.exit_code == 1 and result.output.startswith("error: seed must be an integer in")
    assert result.output.count("\n") == 1


# ---------------------------------------------------------------- 6: body size, length before work


def test_a_body_over_the_limit_is_413(tiny):
    folder, _ = tiny
    with serving(folder, max_body_bytes=4096) as server:
        body = {"model": BASE, "prompt": "x" * 5000}
        assert error_of(post(server, "/v1/completions", body), 413)["code"] == "body_too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 1000
            yield json.dumps(body).encode()

        r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=JSON, timeout=30)
        assert error_of(r, 413)["code"] == "body_too_large"
        assert post(server, "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 2}).status_code == 200
    with serving(folder) as server:  # the default: a few MB
        r = post(server, "/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x" * 5_000_000}]})
        error_of(r, 413)


def test_a_long_prompt_is_refused_before_tokenizing_and_prompts_are_tokenized_off_the_event_loop(tiny):
    folder, _ = tiny
    with serving(folder) as server:
        tok = server.engine.tokenizer
        calls = []
        encode = tok.tokenizer.encode

        class Recording:
            def __getattr__(self, name):
                return getattr(tok_backend, name)

            def encode(self, text, **kw):
                calls.append((len(text), threading.current_thread()))
                return encode(text, **kw)

        tok_backend, tok.tokenizer = tok.tokenizer, Recording()
        for path, body in (("/v1/completions", {"prompt": "word " * 400_000}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400_000}]})):  # fmt: skip
            t0 = time.perf_counter()
            err = error_of(post(server, path, {"model": BASE, **body}), 400)
            assert err["code"] == "context_length_exceeded" and time.perf_counter() - t0 < 5
        assert calls == []
        assert post(server, "/v1/completions", {"model": BASE, "prompt": "Hello", "max_tokens": 2}).status_code == 200
        assert len(calls) == 1 and calls[0][1] is not server.thread


# ---------------------------------------------------------------- 7: API key, content type, runtime loading


def test_the_api_key_is_checked_on_every_v1_route(tiny, monkeypatch):
    folder, _ = tiny
    with serving(folder, api_key="sk-test") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            assert error_of(httpx.get(server.url + "/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
            r = httpx.post(server.url + "/v1/completions", json={"model": BASE, "prompt": "x"}, headers=headers)
            error_of(r, 401)
        ok = {"Authorization": "Bearer sk-test"}
        assert httpx.get(server.url + "/v1/models", headers=ok).status_code == 200
        r = httpx.post(server.url + "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2}, headers=ok)
        assert r.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
    seen = {}

    def fake_build_server(*args, policy=None, **kw):
        seen["policy"] = policy
        raise QError("stop here")

    monkeypatch.setattr("qserve.server.build_server", fake_build_server)
    result = CliRunner().invoke(qserve_cli, ["serve", "--model", str(folder)], env={"QSERVE_API_KEY": "sk-env"})
    assert result.exit_code == 1 and seen["policy"].api_key == "sk-env" and not seen["policy"].enable_lora_loading


def test_posts_must_be_json_and_runtime_loading_is_off_by_default(tiny):
    folder, adapters = tiny
    with serving(folder, {"good": str(adapters / "good")}) as server:
        for path in ("/v1/unload_lora_adapter", "/v1/load_lora_adapter", "/v1/completions"):
            body = json.dumps({"lora_name": "good", "lora_path": str(adapters / "big"), "model": BASE, "prompt": "x"})
            r = httpx.post(server.url + path, content=body, headers={"Content-Type": "text/plain"})
            assert error_of(r, 415)["code"] == "unsupported_media_type"
        for path in ("/v1/unload_lora_adapter", "/v1/load_lora_adapter"):
            r = post(server, path, {"lora_name": "good", "lora_path": str(adapters / "big")})
            assert error_of(r, 404)["code"] == "lora_loading_disabled"
        assert list(server.engine.adapter_ids) == ["good"]


def test_runtime_loading_stays_under_the_adapter_root_and_says_nothing_of_other_paths(tiny):
    folder, adapters = tiny
    with serving(folder, enable_lora_loading=True, adapter_root=adapters) as server:
        assert post(server, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "good"}).status_code == 200
        assert post(server, "/v1/load_lora_adapter", {"lora_name": "g2", "lora_path": str(adapters / "big")}
                    ).status_code == 200  # fmt: skip
        messages = set()
        for path in (str(folder), str(folder / "nothing-here"), "../base", "good/../../base", "/etc"):
            err = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}), 400)
            messages.add(err["message"].replace(repr(path), "PATH"))
        assert len(messages) == 1, messages
        models = httpx.get(server.url + "/v1/models").text
        assert str(folder.parent) not in models and str(adapters) not in models
        assert [m["root"] for m in json.loads(models)["data"]] == [BASE, "g", "g2"]
    with serving(folder, enable_lora_loading=True) as server:  # no root: any folder, but replies say nothing of it
        messages = set()
        for path in (str(folder), str(folder / "nothing-here"), str(folder / "config.json")):
            err = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}), 400)
            messages.add(err["message"].replace(repr(path), "PATH"))
        assert len(messages) == 1, messages


# ---------------------------------------------------------------- 9: 400, not 500


def test_bad_json_values_are_400_not_500(tiny):
    folder, _ = tiny
    with serving(folder) as server:
        assert error_of(post(server, "/v1/completions", {"model": BASE, "prompt": "x", "top_k": True}), 400)["param"] == "top_k"
        surrogate = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
        error_of(httpx.post(server.url + "/v1/chat/completions", content=surrogate, headers=JSON), 400)
        deep = b'{"model": "tiny", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        assert error_of(httpx.post(server.url + "/v1/completions", content=deep, headers=JSON), 400)["code"] == "invalid_json"
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------- 10: adapter limits, roles, templates


def test_runtime_adapters_are_capped_in_rank_size_and_count(tiny):
    folder, adapters = tiny
    with serving(folder, enable_lora_loading=True, adapter_root=adapters, max_lora_rank=8, max_loras=2,
                 max_lora_bytes=20_000) as server:  # fmt: skip
        err = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "big"}), 400)
        assert "rank 16 exceeds the limit of 8" in err["message"]
        size = (adapters / "good" / "adapter_model.safetensors").stat().st_size
        assert size > 20_000
        err = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "good"}), 400)
        assert "exceeds the limit of" in err["message"] and "MiB" in err["message"]
    with serving(folder, {"a": str(adapters / "good")}, enable_lora_loading=True, adapter_root=adapters,
                 max_loras=2) as server:  # fmt: skip
        assert post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "good"}).status_code == 200
        err = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "good"}), 400)
        assert "--max-loras" in err["message"]


def test_the_server_accepts_exactly_the_roles_finetune_accepts(tiny):
    folder, _ = tiny
    assert ROLES is CHAT_ROLES
    with serving(folder) as server:
        for role in CHAT_ROLES:
            body = {"model": BASE, "messages": [{"role": role, "content": "hi"}], "max_tokens": 2}
            assert post(server, "/v1/chat/completions", body).status_code == 200
        for role in ("robot", "developer ", "USER", ""):
            body = {"model": BASE, "messages": [{"role": role, "content": "hi"}], "max_tokens": 2}
            assert error_of(post(server, "/v1/chat/completions", body), 400)["param"] == "messages[0]"


def test_a_chat_template_renders_under_a_time_and_size_limit(tiny, monkeypatch):
    folder, _ = tiny
    monkeypatch.setattr(tokenizer_module, "TEMPLATE_SECONDS", 0.5, raising=False)
    tok = Tokenizer.from_dir(folder)
    messages = [{"role": "user", "content": "hi"}]
    for template, why in (("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                           "took longer than 0.5 s"),
                          ("{{ 'x' * 10**9 }}", "repeated 1000000000 times"),
                          ("{% for i in range(100000) %}{{ messages|tojson * 1000 }}{% endfor %}", "exceeds")):  # fmt: skip
        tok.chat_template = template
        t0 = time.perf_counter()
        with pytest.raises(QError, match=why):
            tok.apply_chat_template(messages)
        assert time.perf_counter() - t0 < 3
    tok.chat_template = "{% for m in messages %}{{ m.role }}:{{ m.content }}{{ range(3)|list }}{% endfor %}"
    assert tok.apply_chat_template(messages) == "user:hi[0, 1, 2]"
