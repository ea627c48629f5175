"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Routes, with OpenAI's (and vLLM's) request and response shapes:
- `GET /v1/models`: the base model and every loaded adapter (an adapter's `parent` is the base);
- `POST /v1/completions`, `POST /v1/chat/completions` (messages through the model's chat template):
  `max_tokens` (chat: also `max_completion_tokens`), `temperature` [0, 2], `top_p` (0, 1], `stop`,
  `seed`, `n` (samples per prompt), vLLM's `top_k` and `ignore_eos`, `stream` (server-sent events of `*.chunk` objects, then `data: [DONE]`;
  `stream_options.include_usage` adds a last chunk with the token counts), `usage` in every answer;
  the request's `model` picks the base (its served name) or an adapter (its name); completions take a
  list of prompts (strings or token-id lists, up to `--max-prompts`), `echo`, `logprobs` k (legacy shape,
  prompt tokens too when echoed) and `max_tokens` 0 with echo (scoring); chat takes `logprobs` and
  `top_logprobs` (qserve.completion_request, qserve.logprobs);
- `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter`
  `{"lora_name"}`, as vLLM names them (path: a folder or a Hub id), only with `--enable-lora-loading`
  (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING), only from folders under `--adapter-root` when one is given,
  within the rank, size and count limits; replies never say whether a path outside the root exists;
- `GET /health`, `GET /metrics` (Prometheus text format; every response counted by status).

Before any work: the API key, the content type and the body size (qserve.request_guard). Errors are
OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`: no or a wrong API key 401, unknown
model 404, a body over the limit 413, a POST that is not JSON 415, bad fields or a prompt that does
not fit the context 400, a full queue 429, a failure inside the request 500 - and the server goes on
serving. Prompts are tokenized (and chat templates rendered) off the event loop, after a length check
that costs nothing. A client that disconnects cancels its request at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qformats.errors import QError
from qserve.completion_request import Scoring, generate, is_int, top_count
from qserve.engine import Engine, UnknownAdapter
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
    responses: dict[int, int] = field(default_factory=dict)  # HTTP status -> responses sent
    adapter_loading: asyncio.Lock = field(default_factory=asyncio.Lock)  # one runtime load at a time


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, policy: ServerPolicy | None = None) -> FastAPI:
    """The FastAPI app; the engine must be started (and is stopped by whoever started it)."""
    state = ServerState(engine, tokenizer, model_name, policy or ServerPolicy())

    async def guard(request: Request) -> None:
        state.policy.check_headers(request)

    app = FastAPI(title="qserve", description="OpenAI-compatible API over NF4 models and LoRA adapters",
                  dependencies=[Depends(guard)])  # fmt: skip
    app.state.qserve = state
    app.add_middleware(StatusCounter, counts=state.responses)
    max_tokens = engine.max_model_len  # a prompt's token budget, for the length check before tokenizing

    def error(e: APIError) -> JSONResponse:
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
        # This handler answers outside every middleware, StatusCounter included: count the 500 here.
        state.responses[500] = state.responses.get(500, 0) + 1
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

    async def prompt_list(body: dict) -> list[tuple[str | None, list[int]]]:
        """`prompt`: a string, a list of token ids, or a list of either (one choice each) -> (text, ids) each."""
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(i) for i in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise bad_field("prompt", "prompt must be a non-empty string or list of token ids, or a list of them")
        if len(prompt) > state.policy.max_prompts:
            raise bad_field("prompt", f"prompt is a list of {len(prompt)} prompts, more than the server's limit of "
                                      f"{state.policy.max_prompts} (--max-prompts)")  # fmt: skip
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                out.append((p, await encode("prompt", tokenizer.encode, p)))
            elif isinstance(p, list) and p and all(is_int(t) for t in p):
                out.append((None, p))
            else:
                raise bad_field("prompt", f"prompt[{i}] must be a non-empty string or list of token ids")
        return out

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, state.policy)
        adapter = pick_model(state, body)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise bad_field("echo", f"echo must be true or false, got {show(echo)}")
        logprobs = top_count(body, "logprobs")
        for key in ("best_of", "suffix"):
            if body.get(key) not in (None, 1 if key == "best_of" else None):
                raise bad_field(key, f"{key} is not supported by this server")
        prompts = await prompt_list(body)
        return await generate(request, engine, tokenizer, adapter or state.model_name, body, prompts, adapter,
                              Scoring(echo=echo, logprobs=logprobs))  # fmt: skip

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
        for key in ("tools", "response_format"):
            if body.get(key) not in (None, False):
                raise bad_field(key, f"{key} is not supported by this server")
        wants = body.get("logprobs", False)
        if not isinstance(wants, (bool, type(None))):
            raise bad_field("logprobs", f"logprobs must be true or false, got {show(wants)}")
        top = top_count(body, "top_logprobs")
        if top is not None and not wants:
            raise bad_field("top_logprobs", "top_logprobs needs logprobs: true")
        if sum(len(m["content"]) for m in clean) > max_tokens * tokenizer.longest_token_chars:
            raise APIError(400, f"the messages are longer than the {max_tokens} tokens of the context can hold",
                           code="context_length_exceeded", param="messages")  # fmt: skip
        ids = await encode("messages", tokenizer.encode_chat, clean)
        scoring = Scoring(chat=True, logprobs=(top or 0) if wants else None)
        return await generate(request, engine, tokenizer, adapter or state.model_name, body, [(None, ids)], adapter,
                              scoring)  # fmt: skip

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
        engine.load_adapter(name, source, max_rank=policy.max_lora_rank, max_bytes=policy.max_lora_bytes)
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


def render_metrics(state: ServerState) -> str:
    """Prometheus text exposition of the engine's counters, gauges and latency histograms."""
    e = state.engine
    m = e.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP qserve_{name} {help_}", f"# TYPE qserve_{name} {kind}"])
        lines.extend(f"qserve_{name}{labels} {value:g}" for labels, value in samples)

    metric("requests_total", "counter", "Requests accepted by the engine.", [("", m.received)])
    refused = sum(n for status, n in state.responses.items() if 400 <= status < 500)
    metric("requests_rejected_total", "counter", "Requests refused before any work: every 4xx response (bad "
           "fields 400, API key 401, unknown model or route 404, body too large 413, not JSON 415, queue full 429).",
           [("", refused)])  # fmt: skip
    metric("requests_finished_total", "counter", "Requests finished, by reason (stop, length, cancelled, error).",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(m.finished_by_reason.items())])  # fmt: skip
    metric("http_responses_total", "counter", "Responses sent, by HTTP status.",
           [(f'{{status="{s}"}}', n) for s, n in sorted(state.responses.items())])  # fmt: skip
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


class StatusCounter:
    """ASGI middleware: counts every HTTP response by its status (a stream counts once, when it starts)."""

    def __init__(self, app, counts: dict[int, int]):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] = self.counts.get(message["status"], 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def build_server(model: str, adapters: dict[str, str] | None = None, *, served_model_name: str | None = None,
                 max_batch: int = 8, max_queue: int = 64, max_model_len: int | None = None, dtype=None,
                 device: str = "cpu", revision: str | None = None, progress: bool = False,
                 policy: ServerPolicy | None = None, compile: bool = False) -> tuple[FastAPI, Engine]:  # fmt: skip
    """Load the base (folder or Hub id) and adapters ({name: folder or Hub id}); the engine is started.

    policy: API key, body limit, runtime adapter loading and its limits (default: no key, loading off).
    compile: the decode step through torch.compile (`Engine(compile=True)`).
    """
    from qserve.loader import load_model, resolve_model_dir

    model_dir = resolve_model_dir(model, revision)
    tokenizer = Tokenizer.from_dir(model_dir)
    lm = load_model(model_dir, dtype=dtype, device=device, progress=progress)
    engine = Engine(lm, tokenizer, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len,
                    compile=compile)
    name = served_model_name or model
    for adapter_name, source in (adapters or {}).items():
        if adapter_name == name:
            raise QError(f"adapter name {adapter_name!r} is the base model's name: pick another (NAME=PATH)")
        engine.load_adapter(adapter_name, source)
    return create_app(engine, tokenizer, name, policy), engine.start()


def run_server(app: FastAPI, engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (ctrl-C), then stop the engine."""
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.stop()
