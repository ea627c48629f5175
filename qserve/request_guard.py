"""What the server checks before a request does any work: its API key, content type, body size and JSON.

The server may face other users and any web page a user opens (a browser sends a `text/plain` POST
to localhost without asking first), so every `/v1` route asks for the API key when one is set (as
vLLM: `Authorization: Bearer KEY`), every POST must say `Content-Type: application/json` (which a
page can only send after a CORS preflight this server never grants), and a body is read only up to
`max_body_bytes`. The JSON must be an object of at most Python's nesting depth, its strings valid
Unicode (no lone surrogates). Each refusal is an `APIError`, answered as OpenAI's error object.

`ServerPolicy` also holds the limits on adapters loaded at run time (off unless enabled).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import reprlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 60, 60, 4, 4


def show(value) -> str:
    """A short repr of a client's value for an error message (bounded, whatever the value's size or depth)."""
    return _repr.repr(value)


@dataclass
class ServerPolicy:
    """Who may call the server, how much it reads, and which adapters it loads at run time."""

    api_key: str | None = None  # None: no authentication
    max_body_bytes: int = 4 * 2**20
    max_prompts: int = 256  # prompts in one /v1/completions request (a list: one choice each)
    enable_lora_loading: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    adapter_root: Path | None = None  # runtime loads only from folders under it (None: any folder or Hub id)
    max_lora_rank: int = 64
    max_lora_bytes: int = 512 * 2**20  # adapter_model.safetensors of a runtime load
    max_loras: int = 16  # adapters loaded at once, counting those given at start

    def check_headers(self, request: Request) -> None:
        """401 without the API key on a /v1 route; 415 for a POST that is not application/json."""
        path = request.url.path
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")  # fmt: skip
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json', "
                                    f"not {show(kind or 'none')}", code="unsupported_media_type")  # fmt: skip


async def read_json(request: Request, policy: ServerPolicy) -> dict:
    """The body as a JSON object, read up to the size limit (413 beyond it) and parsed off the event loop."""
    limit = policy.max_body_bytes
    too_big = APIError(413, f"the request body exceeds the server's limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = await asyncio.to_thread(json.loads, raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if b"\\u" in raw or b"\\U" in raw:  # only a \u escape can make a lone surrogate
        _check_unicode(body)
    return body


def _check_unicode(body: dict) -> None:
    """400 if any key or string holds a lone surrogate (valid JSON, but no text a tokenizer can encode)."""
    stack: list = [body]
    while stack:
        value = stack.pop()
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            for s in (key, item):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise APIError(400, f"a string in the request ({show(s)}) holds a lone surrogate: it is not "
                                            "valid Unicode text", code="invalid_value",
                                       param=key if isinstance(key, str) else None) from None  # fmt: skip
            if isinstance(item, (dict, list)):
                stack.append(item)
