"""A request inside the serving engine (qserve/engine.py) and the events it gets back."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qserve.generate import DecodeRow, SamplingParams
from qserve.logprobs import TokenLogprob
from qserve.lora import BASE


@dataclass
class Event:
    """What a request gets back after each step it took part in; the last one has `finish_reason` or `error`."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked (params.logprobs)
    # On the request's first event, when it asked (params.prompt_logprobs): None for the first prompt token.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    emit: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # Set by the engine:
    adapter_id: int = BASE
    slot: int = -1
    pos: int = 0  # cache position of the pending token (= tokens in the cache so far)
    pending: int = -1  # the last sampled token, fed at the next decode
    row: DecodeRow | None = None
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None  # computed at prefill, sent with the first event
