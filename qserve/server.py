"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Routes, with OpenAI's (and vLLM's) request and response shapes:
- `GET /v1/models`: the base model and every loaded adapter (an adapter's `parent` is the base);
- `POST /v1/completions`, `POST /v1/chat/completions` (messages through the model's chat template):
  `max_tokens` (chat: also `max_completion_tokens`), `temperature` [0, 2], `top_p` (0, 1], `stop`,
  `seed`, `n` = 1, vLLM's `top_k` and `ignore_eos`, `stream` (server-sent events of `*.chunk` objects, then `data: [DONE]`;
  `stream_options.include_usage` adds a last chunk with the token counts), `usage` in every answer;
  the request's `model` picks the base (its served name) or an adapter (its name);
- `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter`
  `{"lora_name"}`, as vLLM names them (path: a folder or a Hub id), only with `--enable-lora-loading`
  (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING), only from folders under `--adapter-root` when one is given,
  within the rank, size and count limits; replies never say whether a path outside the root exists;
- `GET /health`, `GET /metrics` (Prometheus text format).

Before any work: the API key, the content type and the body size (qserve.request_guard). Errors are
OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`: no or a wrong API key 401, unknown
model 404, a body over the limit 413, a POST that is not JSON 415, bad fields or a prompt that does
not fit the context 400, a full queue 429, a failure inside the request 500 - and the server goes on
serving. Prompts are tokenized (and chat templates rendered) off the event loop, after a length check
that costs nothing. A client that disconnects cancels its request at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qformats.errors import QError
from qserve.engine import ContextTooLong, Engine, Event, QueueFull, UnknownAdapter
from qserve.generate import SEED_MAX, SEED_MIN, SamplingParams
from qserve.request_guard import APIError, ServerPolicy, bad_field, read_json, show
from qserve.tokenizer import CHAT_ROLES, TextTooLong, Tokenizer

log = logging.getLogger("qserve.server")


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Tokenizer
    model_name: str  # the base model's served name
    policy: ServerPolicy = field(default_factory=ServerPolicy)
    created: int = field(default_factory=lambda: int(time.time()))
    http_errors: dict[int, int] = field(default_factory=dict)
    adapter_loading: asyncio.Lock = field(default_factory=asyncio.Lock)  # one runtime load at a time


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, policy: ServerPolicy | None = None) -> FastAPI:
    """The FastAPI app; the engine must be started (and is stopped by whoever started it)."""
    state = ServerState(engine, tokenizer, model_name, policy or ServerPolicy())

    async def guard(request: Request) -> None:
        state.policy.check_headers(request)

    app = FastAPI(title="qserve", description="OpenAI-compatible API over NF4 models and LoRA adapters",
                  dependencies=[Depends(guard)])  # fmt: skip
    app.state.qserve = state
    max_tokens = engine.max_model_len  # a prompt's token budget, for the length check before tokenizing

    def error(e: APIError) -> JSONResponse:
        state.http_errors[e.status] = state.http_errors.get(e.status, 0) + 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error(APIError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error"))  # fmt: skip

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        # `root` is the served name, never a path: the server's folders are none of the client's business.
        base = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qserve",
                "root": state.model_name, "parent": None, "max_model_len": engine.max_model_len}  # fmt: skip
        data = [base] + [{"id": name, "object": "model", "created": state.created, "owned_by": "qserve",
                          "root": name, "parent": state.model_name} for name in engine.adapters()]  # fmt: skip
        return {"object": "list", "data": data}

    async def encode(what: str, fn, *args):
        """Tokenize on a worker thread (a long prompt must not stall every other stream); too long: 400."""
        try:
            return await asyncio.to_thread(fn, *args, max_tokens=max_tokens)
        except TextTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded", param=what) from None
        except QError as e:
            raise bad_field(what, str(e)) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, state.policy)
        adapter = pick_model(state, body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = await encode("prompt", tokenizer.encode, prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = prompt
        else:
            raise bad_field("prompt", "prompt must be a non-empty string or list of token ids (one prompt: n = 1)")
        for key in ("echo", "best_of", "suffix", "logprobs"):
            if body.get(key) not in (None, False, 1 if key == "best_of" else None):
                raise bad_field(key, f"{key} is not supported by this server")
        return await generate(request, state, body, ids, adapter, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, state.policy)
        adapter = pick_model(state, body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_field("messages", "messages must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise bad_field(f"messages[{i}]", f"messages[{i}] must be an object with a role, one of "
                                                  f"{', '.join(CHAT_ROLES)}")  # fmt: skip
            clean.append({**m, "content": message_text(m.get("content"), i)})
        for key in ("tools", "logprobs", "top_logprobs", "response_format"):
            if body.get(key) not in (None, False):
                raise bad_field(key, f"{key} is not supported by this server")
        if sum(len(m["content"]) for m in clean) > max_tokens * tokenizer.longest_token_chars:
            raise APIError(400, f"the messages are longer than the {max_tokens} tokens of the context can hold",
                           code="context_length_exceeded", param="messages")  # fmt: skip
        ids = await encode("messages", tokenizer.encode_chat, clean)
        return await generate(request, state, body, ids, adapter, chat=True)

    def check_lora_loading() -> None:
        if not state.policy.enable_lora_loading:
            raise APIError(404, "loading and unloading adapters at run time is off: start the server with "
                                "--enable-lora-loading", "not_found_error", "lora_loading_disabled")  # fmt: skip

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        check_lora_loading()
        body = await read_json(request, state.policy)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise bad_field("lora_name", "give both lora_name and lora_path (a folder or Hub id) as strings")
        async with state.adapter_loading:
            if name == state.model_name or name in engine.adapter_ids:
                raise bad_field("lora_name", f"the name {show(name)} is already in use")
            if len(engine.adapter_ids) >= state.policy.max_loras:
                raise bad_field("lora_name", f"{len(engine.adapter_ids)} adapters are loaded, the server's limit "
                                             "(--max-loras): unload one first")  # fmt: skip
            await asyncio.to_thread(load_runtime_adapter, engine, state.policy, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        check_lora_loading()
        body = await read_json(request, state.policy)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise bad_field("lora_name", "lora_name must be a string")
        try:
            engine.unload_adapter(name)
        except UnknownAdapter as e:
            raise APIError(404, str(e), "not_found_error", "model_not_found", "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


def load_adapter(engine: Engine, name: str, source: str, max_rank: int | None = None,
                 max_bytes: int | None = None) -> None:  # fmt: skip
    """Load a PEFT adapter folder or Hub id under `name` (Hub ids go through qformats.hub_pull)."""
    from qformats.hub_pull import resolve_source

    folder = resolve_source(source, allow_patterns=["*.json", "*.safetensors", "*.md"])
    engine.load_adapter(name, str(folder), max_rank=max_rank, max_bytes=max_bytes)


def load_runtime_adapter(engine: Engine, policy: ServerPolicy, name: str, source: str) -> None:
    """/v1/load_lora_adapter: under the adapter root (when set) and the limits; a 400 whose message says why
    only for paths under the root: elsewhere the reply is the same whether the path exists or not."""
    root = policy.adapter_root
    if "\0" in source:
        raise bad_field("lora_path", "lora_path holds a NUL character")
    if root is not None:
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, source))
        if os.path.commonpath([real, real_root]) != real_root:
            raise bad_field("lora_path", f"lora_path {show(source)} is not a folder under the server's adapter root")
        source = real
    try:
        load_adapter(engine, name, source, policy.max_lora_rank, policy.max_lora_bytes)
    except (QError, OSError) as e:
        log.warning("loading adapter %r from %r failed: %s", name, source, e)
        if root is None:
            raise bad_field("lora_path", f"could not load an adapter from lora_path {show(source)} (the server log "
                                         "says why; with --adapter-root the reply does)") from None  # fmt: skip
        raise bad_field("lora_path", str(e).replace(real_root + os.sep, "")) from None


def pick_model(state: ServerState, body: dict) -> str | None:
    """The adapter name the request's `model` names, or None for the base."""
    name = body.get("model", state.model_name)
    if name == state.model_name:
        return None
    if isinstance(name, str) and name in state.engine.adapter_ids:
        return name
    if not isinstance(name, str):
        raise bad_field("model", f"model must be a string, got {show(name)}")
    raise APIError(404, f"The model `{show(name)}` does not exist. Available: {state.model_name}"
                   + "".join(f", {a}" for a in state.engine.adapter_ids), "not_found_error", "model_not_found",
                   "model")  # fmt: skip


def message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text", ""), str) for p in content):  # fmt: skip
        return "".join(p.get("text", "") for p in content)
    raise bad_field(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


def sampling_params(body: dict, prompt_len: int, max_model_len: int, chat: bool) -> SamplingParams:
    """OpenAI request fields -> SamplingParams; 400 for values out of range or unsupported."""

    def number(key: str, default, lo: float, hi: float, lo_open: bool = False):
        v = body.get(key)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
            raise bad_field(key, f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {show(v)}")
        return float(v)

    for key in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad_field(key, f"{key} must be a positive integer, got {show(v)}")
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else body.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, max_model_len - prompt_len)  # as vLLM: up to the end of the context
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_field("n", f"n must be 1 (one completion per request), got {show(n)}")
    stop = body.get("stop")
    stop = [] if stop is None or stop == "" else stop
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise bad_field("stop", "stop must be a string or a list of up to 4 strings")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX):
        raise bad_field("seed", f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {show(seed)}")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None else top_k
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1:
        raise bad_field("top_k", f"top_k must be an integer >= -1, got {show(top_k)}")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad_field(key, f"{key} is not supported by this server (leave it 0)")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: always generate max_tokens (benchmarks)
    if not isinstance(ignore_eos, bool):
        raise bad_field("ignore_eos", "ignore_eos must be true or false")
    return SamplingParams(max_new_tokens=max_tokens, temperature=number("temperature", 1.0, 0, 2),
                          top_p=number("top_p", 1.0, 0, 1, lo_open=True), top_k=max(top_k, 0), seed=seed,
                          stop=stop, stop_token_ids=() if ignore_eos else None)  # fmt: skip


async def generate(request: Request, state: ServerState, body: dict, ids: list[int], adapter: str | None,
                   chat: bool) -> Response:  # fmt: skip
    engine = state.engine
    params = sampling_params(body, len(ids), engine.max_model_len, chat)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_field("stream", "stream must be true or false")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_field("stream_options", "stream_options must be an object like {\"include_usage\": true}")
    include_usage = stream and options.get("include_usage", False)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        req = engine.submit(ids, params, adapter, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except ContextTooLong as e:
        raise APIError(400, str(e), code="context_length_exceeded", param="messages" if chat else "prompt") from None
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", "queue_full") from None
    except UnknownAdapter as e:
        raise APIError(404, str(e), "not_found_error", "model_not_found", "model") from None
    except QError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": adapter or state.model_name}  # fmt: skip

    if not stream:
        watcher = asyncio.create_task(cancel_on_disconnect(request, engine, req))
        try:
            text, ev = [], None
            while ev is None or not ev.final:
                ev = await events.get()
                text.append(ev.text)
        finally:
            watcher.cancel()
        if ev.error:
            raise APIError(500, f"the request failed: {ev.error}", "server_error")
        choice = {"index": 0, "logprobs": None, "finish_reason": ev.finish_reason}
        choice.update({"message": {"role": "assistant", "content": "".join(text)}} if chat else {"text": "".join(text)})
        return JSONResponse({**head, "choices": [choice], "usage": usage(ev)})

    head["object"] += ".chunk"

    def chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    async def body_iter():
        try:
            if chat:
                yield chunk(role=True)
            while True:
                ev = await events.get()
                if ev.error:
                    yield sse({"error": {"message": f"the request failed: {ev.error}", "type": "server_error",
                                         "param": None, "code": None}})  # fmt: skip
                    break
                if ev.text:
                    yield chunk(ev.text)
                if ev.final:
                    yield chunk(finish=ev.finish_reason)
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(ev)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(req)  # a no-op once finished; frees the slot if the client went away

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def cancel_on_disconnect(request: Request, engine: Engine, req) -> None:
    while not req.done:
        if await request.is_disconnected():
            engine.cancel(req)
            return
        await asyncio.sleep(0.1)


def usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}  # fmt: skip


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def render_metrics(state: ServerState) -> str:
    """Prometheus text exposition of the engine's counters, gauges and latency histograms."""
    e = state.engine
    m = e.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP qserve_{name} {help_}", f"# TYPE qserve_{name} {kind}"])
        lines.extend(f"qserve_{name}{labels} {value:g}" for labels, value in samples)

    metric("requests_total", "counter", "Requests accepted by the engine.", [("", m.received)])
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full (HTTP 429).",
           [("", m.rejected)])  # fmt: skip
    metric("requests_finished_total", "counter", "Requests finished, by reason (stop, length, cancelled, error).",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(m.finished_by_reason.items())])  # fmt: skip
    metric("http_errors_total", "counter", "Error responses, by HTTP status.",
           [(f'{{status="{s}"}}', n) for s, n in sorted(state.http_errors.items())])  # fmt: skip
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", m.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generated_tokens)])
    metric("queue_depth", "gauge", "Requests waiting for a batch slot.", [("", len(e.waiting))])
    metric("batch_size", "gauge", "Requests in the running batch.", [("", len(e.running))])
    metric("max_batch", "gauge", "Batch slots (--max-batch).", [("", e.max_batch)])
    metric("loaded_adapters", "gauge", "LoRA adapters loaded.", [("", len(e.adapter_ids))])
    for name, hist, help_ in ((("time_to_first_token_seconds", m.ttft, "Arrival to first token.")),
                              ("inter_token_latency_seconds", m.inter_token, "Time between a request's tokens."),
                              ("request_latency_seconds", m.latency, "Arrival to last token.")):  # fmt: skip
        samples = [(f'_bucket{{le="{edge:g}"}}', c) for edge, c in zip(hist.buckets, hist.counts)]
        samples += [('_bucket{le="+Inf"}', hist.count), ("_sum", hist.sum), ("_count", hist.count)]
        metric(name, "histogram", help_, samples)
    return "\n".join(lines) + "\n"


def build_server(model: str, adapters: dict[str, str] | None = None, *, served_model_name: str | None = None,
                 max_batch: int = 8, max_queue: int = 64, max_model_len: int | None = None, dtype=None,
                 device: str = "cpu", revision: str | None = None, progress: bool = False,
                 policy: ServerPolicy | None = None) -> tuple[FastAPI, Engine]:  # fmt: skip
    """Load the base (folder or Hub id) and adapters ({name: folder or Hub id}); the engine is started.

    policy: API key, body limit, runtime adapter loading and its limits (default: no key, loading off).
    """
    from qserve.loader import load_model, resolve_model_dir

    model_dir = resolve_model_dir(model, revision)
    tokenizer = Tokenizer.from_dir(model_dir)
    lm = load_model(model_dir, dtype=dtype, device=device, progress=progress)
    engine = Engine(lm, tokenizer, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len)
    name = served_model_name or model
    for adapter_name, source in (adapters or {}).items():
        if adapter_name == name:
            raise QError(f"adapter name {adapter_name!r} is the base model's name: pick another (NAME=PATH)")
        load_adapter(engine, adapter_name, source)
    return create_app(engine, tokenizer, name, policy), engine.start()


def run_server(app: FastAPI, engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (ctrl-C), then stop the engine."""
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.stop()
