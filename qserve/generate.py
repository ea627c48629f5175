"""Text generation on a `CausalLM`: sampling, stop conditions, streaming, batches of different lengths.

`Generator(model, tokenizer).generate(prompts, params)` runs a batch: the prompts are right-padded
and prefilled together with per-row positions, then every row decodes one token per step at its
own position (see `CausalLM.forward`), so a batch answers exactly as its prompts would one by one
(greedy; sampled rows share one random stream). `stream(prompt, params)` yields text deltas as
they are decoded, never half a UTF-8 character and never text that a stop string later takes back;
joined, they equal `generate(...)[0].text`.

Sampling follows transformers' order: temperature, then top-k, then top-p, then a draw from the
softmax with a `torch.Generator` seeded by `seed`. `temperature == 0` is greedy (argmax).
The steps are the serving engine's (`CausalLM.prefill` and `CausalLM.decode`, qserve/engine.py);
with `compile=True` the decode step runs through `torch.compile` (`CausalLM.compile_decode`; static
shapes: the batch fills the whole cache and attention spans all of it); eager is the default.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from qformats.errors import QError
from qserve.embeddings16 import hold_embeddings_16bit
from qserve.model import CausalLM
from qserve.tokenizer import StreamDecoder, Tokenizer

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit signed seed, as OpenAI and vLLM take it


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one
    stop_token_ids: Sequence[int] | None = None  # None: the tokenizer's EOS ids; () never stops on a token
    # Engine only: log-probabilities (qserve.logprobs) of each generated token with its top k (None: off),
    # and of each prompt token after the first with its top k (None: off; with max_new_tokens 0: scoring only).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise QError(f"max new tokens must be at least 1 (0 only when scoring the prompt), got {self.max_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= 20:
                raise QError(f"{name} must be in [0, 20], got {k}")
        if self.temperature < 0:
            raise QError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise QError(f"top-k must be >= 0, got {self.top_k}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise QError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (64-bit signed), got {self.seed}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, the stop token included
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """fp32 logits [B, V] after temperature, top-k and top-p (removed entries are -inf), as transformers does."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ContextTooLong(QError):
    """Prompt (plus max_tokens) does not fit the context (HTTP 400)."""


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, context: int) -> list[int]:
    """The prompt as a list of ints, refused if empty, outside the vocabulary or leaving no room for an answer."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise QError("the prompt is empty")
    if not all(0 <= i < vocab_size for i in ids):
        raise QError(f"prompt token id {next(i for i in ids if not 0 <= i < vocab_size)} is outside the vocabulary "
                     f"(0..{vocab_size - 1})")  # fmt: skip
    if len(ids) >= context:
        raise ContextTooLong(f"the prompt is {len(ids)} tokens, but the maximum context length is {context} tokens "
                             f"(at most {context - 1} leave room for an answer)")  # fmt: skip
    return ids


def stop_ids(params: SamplingParams, tokenizer: Tokenizer | None) -> set[int]:
    """The token ids that end a completion: the request's, else the tokenizer's EOS ids."""
    if params.stop_token_ids is not None:
        return set(params.stop_token_ids)
    return set(tokenizer.eos_token_ids) if tokenizer else set()


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The random stream of one sampling run: from `seed`, or from fresh entropy without one."""
    generator = torch.Generator(device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


class StopStrings:
    """Cuts the text at the first stop string and holds back a tail that may still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text, self.emitted, self.stopped = "", 0, False

    def feed(self, delta: str, final: bool = False) -> str:
        """Add decoded text; return what can be shown now."""
        self.text += delta
        for s in self.stops:
            i = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if i != -1:
                self.text, self.stopped, final = self.text[:i], True, True
        hold = 0 if final else self._partial_suffix()
        out = self.text[self.emitted : len(self.text) - hold]
        self.emitted += len(out)
        return out

    def _partial_suffix(self) -> int:
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


class Generator:
    """Generation with one model; keeps its KV cache between calls (grown when a call needs more)."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None = None, compile: bool = False,
                 context: int | None = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        hold_embeddings_16bit(model)  # the output layer's bytes per token halved where that is exact
        self.context = context or model.args.max_position_embeddings
        self.compile = compile
        if compile:
            model.compile_decode()
        self.last_completion: Completion | None = None  # set when a stream() iterator is exhausted

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise QError("a text prompt needs a tokenizer")
            prompt = self.tokenizer.encode(prompt)
        return check_prompt(prompt, self.model.args.vocab_size, self.context)

    def _ensure_cache(self, batch: int, seq: int) -> None:
        m = self.model
        if self.compile:  # static shapes: one cache size for every call, so the step compiles once
            seq = max(seq, m.max_seq)
            if m.max_batch != batch or m.max_seq != seq:
                m.setup_cache(batch, seq)
        elif m.max_batch < batch or m.max_seq < seq:
            m.setup_cache(max(batch, m.max_batch), max(seq, m.max_seq))

    @torch.inference_mode()
    def token_steps(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, [B] on the CPU, for up to max_new_tokens steps.

        Rows never stop early here (the caller decides); the caller stops iterating when all are done.
        The steps are the engine's (`CausalLM.prefill` / `decode`); rows share one random stream.
        """
        params.check()
        lens = [len(p) for p in prompts]
        b, t = len(prompts), max(lens)
        steps = min(params.max_new_tokens, self.context - t)
        self._ensure_cache(b, t + steps)
        dev = self.model.device
        generator = seeded_generator(params.seed, dev)
        pos = torch.tensor(lens, device=dev)
        for row in range(b):  # nothing an earlier call left in the cache may reach this one
            self.model.clear_cache(row, t + steps)
        logits = self.model.logits(self.model.prefill(prompts, range(b)), pos - 1)
        for _ in range(steps):
            nxt = sample(logits, params, generator)
            yield nxt.cpu()
            pos = pos + 1
            logits = self.model.decode(nxt, pos - 1, kv_len=int(pos.max()))

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
                 ) -> list[Completion]:  # fmt: skip
        """Complete every prompt (text or token ids); one batch, rows of any lengths."""
        params = params or SamplingParams()
        ids = [self._prompt_ids(p) for p in prompts]
        start = time.perf_counter()
        rows = [DecodeRow(self.tokenizer, params, stop_ids(params, self.tokenizer)) for _ in ids]
        for nxt in self.token_steps(ids, params):
            for row, tok in zip(rows, nxt.tolist()):
                if not row.done:
                    row.push(tok)
            if all(r.done for r in rows):
                break
        seconds = time.perf_counter() - start
        return [r.completion(len(p), seconds) for r, p in zip(rows, ids)]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated; `''.join()` equals `generate()`'s text."""
        if self.tokenizer is None:
            raise QError("streaming text needs a tokenizer")
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt)
        row = DecodeRow(self.tokenizer, params, stop_ids(params, self.tokenizer))
        for nxt in self.token_steps([ids], params):
            delta = row.push(int(nxt[0]))
            if delta:
                yield delta
            if row.done:
                break
        tail = row.finish()
        if tail:
            yield tail
        self.last_completion = row.completion(len(ids), 0.0)


class DecodeRow:
    """One sequence's generated ids, text and stop state."""

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, stop_ids: set[int]):
        self.params, self.stop_ids = params, stop_ids
        self.decoder = StreamDecoder(tokenizer) if tokenizer else None
        self.stops = StopStrings(params.stop)
        self.ids: list[int] = []
        self.done, self.reason, self.finished_text = False, "length", False
        self.chunks: list[str] = []

    def push(self, token: int) -> str:
        self.ids.append(token)
        if token in self.stop_ids:
            self.done, self.reason = True, "stop"
            return self.finish()
        delta = self.stops.feed(self.decoder.push(token)) if self.decoder else ""
        if self.stops.stopped:
            self.done, self.reason = True, "stop"
            return self.finish(delta)
        if len(self.ids) >= self.params.max_new_tokens:
            self.done = True
            return self.finish(delta)
        self.chunks.append(delta)
        return delta

    def finish(self, delta: str = "") -> str:
        """Flush held-back text once the row is over; returns the last delta (once)."""
        if self.finished_text:
            return ""
        self.finished_text = True
        if self.decoder and not self.stops.stopped:
            delta += self.stops.feed(self.decoder.flush(), final=True)
        self.chunks.append(delta)
        return delta

    def completion(self, prompt_tokens: int, seconds: float) -> Completion:
        self.finish()
        return Completion(text="".join(self.chunks), token_ids=self.ids, finish_reason=self.reason,
                          prompt_tokens=prompt_tokens, seconds=seconds)  # fmt: skip
