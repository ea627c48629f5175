"""One OpenAI completion request through the engine: its sampling fields, its choices, its response.

A request holds one or more prompts (`/v1/completions` takes a list) times `n` samples: each is its own
engine request, so they batch with every other request, and each is a choice with its `index`
(prompt i, sample j: i * n + j; sample j > 0 of a seeded request uses seed + j). If any choice fails
or the client goes away, the request's other choices are cancelled; no other request is touched.
`Scoring` says what the response carries besides text: the echoed prompt, and log-probabilities
(qserve.logprobs) in the legacy completions shape or in chat's.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qformats.errors import QError
from qserve.engine import ContextTooLong, Engine, Event, QueueFull, UnknownAdapter
from qserve.generate import SEED_MAX, SEED_MIN, SamplingParams
from qserve.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, chat_logprobs, completion_logprobs
from qserve.request_guard import APIError, bad_field, show
from qserve.tokenizer import Tokenizer

MAX_N = 16  # samples per prompt


@dataclass
class Scoring:
    chat: bool = False
    echo: bool = False  # completions: the prompt's text (and, with logprobs, its tokens) lead each choice
    logprobs: int | None = None  # top alternatives per token (None: no logprobs at all)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def top_count(body: dict, key: str) -> int | None:
    """`logprobs` (completions) or `top_logprobs` (chat): None, or an integer in [0, 20]."""
    v = body.get(key)
    if v is not None and (not is_int(v) or not 0 <= v <= MAX_TOP_LOGPROBS):
        raise bad_field(key, f"{key} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {show(v)}")
    return v


def sampling_params(body: dict, prompt_len: int, max_model_len: int, scoring: Scoring) -> SamplingParams:
    """OpenAI request fields -> SamplingParams; 400 for values out of range or unsupported."""

    def number(key: str, default, lo: float, hi: float, lo_open: bool = False):
        v = body.get(key)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
            raise bad_field(key, f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {show(v)}")
        return float(v)

    chat = scoring.chat
    least = 0 if scoring.echo else 1  # 0 with echo: score the prompt, generate nothing
    for key in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        v = body.get(key)
        if v is not None and (not is_int(v) or v < least):
            raise bad_field(key, f"{key} must be a positive integer (0 only with echo), got {show(v)}")
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else body.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, max_model_len - prompt_len)  # as vLLM: up to the end of the context
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
    # Echoed prompt tokens are scored when logprobs are asked for; max_tokens 0 alone still needs the prefill.
    prompt_logprobs = scoring.logprobs if scoring.echo and scoring.logprobs is not None else None
    if max_tokens == 0 and prompt_logprobs is None:
        prompt_logprobs = 0
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: always generate max_tokens (benchmarks)
    if not isinstance(ignore_eos, bool):
        raise bad_field("ignore_eos", "ignore_eos must be true or false")
    return SamplingParams(max_new_tokens=max_tokens, temperature=number("temperature", 1.0, 0, 2),
                          top_p=number("top_p", 1.0, 0, 1, lo_open=True), top_k=max(top_k, 0), seed=seed,
                          stop=stop, stop_token_ids=() if ignore_eos else None, logprobs=scoring.logprobs,
                          prompt_logprobs=prompt_logprobs)  # fmt: skip




@dataclass
class Choice:
    """What one engine request has produced so far."""

    prompt_text: str | None  # the prompt as the client sent it (None: token ids)
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    entries: list[TokenLogprob | None] = field(default_factory=list)  # prompt's (echo), then generated tokens'
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: bool = False


async def generate(request: Request, engine: Engine, tokenizer: Tokenizer, model: str, body: dict,
                   prompts: list[tuple[str | None, list[int]]], adapter: str | None, scoring: Scoring) -> Response:  # fmt: skip
    """Submit every (prompt, sample) to the engine and answer with all choices (JSON or server-sent events)."""
    chat = scoring.chat
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise bad_field("n", f"n must be an integer in [1, {MAX_N}], got {show(n)}")
    params = [sampling_params(body, len(ids), engine.max_model_len, scoring) for _, ids in prompts]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_field("stream", "stream must be true or false")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_field("stream_options", "stream_options must be an object like {\"include_usage\": true}")
    include_usage = stream and options.get("include_usage", False)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    choices: list[Choice] = []
    reqs = []
    try:
        for (text, ids), p in zip(prompts, params):
            for j in range(n):
                seed = p.seed if p.seed is None or j == 0 else (p.seed + j if p.seed + j <= SEED_MAX else p.seed - j)
                sub = SamplingParams(**{**p.__dict__, "seed": seed})
                index = len(choices)
                choices.append(Choice(text, list(ids)))
                reqs.append(engine.submit(ids, sub, adapter,
                                          lambda ev, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, ev))))
    except QError as e:
        for r in reqs:
            engine.cancel(r)
        param = "messages" if chat else "prompt"
        if isinstance(e, ContextTooLong):
            raise APIError(400, str(e), code="context_length_exceeded", param=param) from None
        if isinstance(e, QueueFull):
            raise APIError(429, str(e), "rate_limit_error", "queue_full") from None
        if isinstance(e, UnknownAdapter):
            raise APIError(404, str(e), "not_found_error", "model_not_found", "model") from None
        raise APIError(400, str(e), code="invalid_value") from None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model}  # fmt: skip

    def take(i: int, ev: Event) -> tuple[str, list[int], list]:
        """Record an event on its choice; the text, ids and logprob entries it adds (echo on the first)."""
        c = choices[i]
        text, ids, entries = ev.text, list(ev.token_ids), list(ev.logprobs or [])
        if not c.started:
            c.started = True
            if scoring.echo:
                echoed = c.prompt_text if c.prompt_text is not None else tokenizer.decode(c.prompt_ids, False)
                text, ids = echoed + text, c.prompt_ids + ids
                entries = list(ev.prompt_logprobs or []) + entries
        c.text += text
        c.token_ids += ids
        c.entries += entries
        if ev.final:
            c.finish_reason, c.prompt_tokens, c.completion_tokens = ev.finish_reason, ev.prompt_tokens, ev.completion_tokens
        return text, ids, entries

    def logprobs_of(ids: list[int], entries: list, offset: int) -> dict | None:
        if scoring.logprobs is None:
            return None
        if chat:
            return chat_logprobs(tokenizer, entries, scoring.logprobs)
        return completion_logprobs(tokenizer, ids, entries, offset)

    def total_usage() -> dict:
        prompt_tokens = sum(c.prompt_tokens for k, c in enumerate(choices) if k % n == 0)
        return usage(prompt_tokens, sum(c.completion_tokens for c in choices))

    def failure(ev: Event) -> str:
        for r in reqs:
            engine.cancel(r)
        return f"the request failed: {ev.error}"

    if not stream:
        watcher = asyncio.create_task(cancel_on_disconnect(request, engine, reqs))
        try:
            pending = len(choices)
            while pending:
                i, ev = await events.get()
                if ev.error:
                    raise APIError(500, failure(ev), "server_error")
                take(i, ev)
                pending -= ev.final
        finally:
            watcher.cancel()
        out = []
        for i, c in enumerate(choices):
            choice = {"index": i, "logprobs": logprobs_of(c.token_ids, c.entries, 0), "finish_reason": c.finish_reason}
            choice.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
            out.append(choice)
        return JSONResponse({**head, "choices": out, "usage": total_usage()})

    head["object"] += ".chunk"
    offsets = [0] * len(choices)

    def chunk(i: int, text: str = "", ids=(), entries=(), finish: str | None = None, role: bool = False) -> str:
        lp = logprobs_of(list(ids), list(entries), offsets[i]) if entries else None
        offsets[i] += len(text)
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    async def body_iter():
        try:
            if chat:
                for i in range(len(choices)):
                    yield chunk(i, role=True)
            pending = len(choices)
            while pending:
                i, ev = await events.get()
                if ev.error:
                    yield sse({"error": {"message": failure(ev), "type": "server_error", "param": None, "code": None}})
                    break
                text, ids, entries = take(i, ev)
                if text or entries:
                    yield chunk(i, text, ids, entries)
                if ev.final:
                    pending -= 1
                    yield chunk(i, finish=ev.finish_reason)
            else:
                if include_usage:
                    yield sse({**head, "choices": [], "usage": total_usage()})
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                engine.cancel(r)  # a no-op once finished; frees the slot if the client went away

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def cancel_on_disconnect(request: Request, engine: Engine, reqs: list) -> None:
    while not all(r.done for r in reqs):
        if await request.is_disconnected():
            for r in reqs:
                engine.cancel(r)
            return
        await asyncio.sleep(0.1)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


