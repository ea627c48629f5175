"""Continuous batching: one model, many concurrent requests, each with its own adapter, joining and leaving per token.

The engine owns the model and its static KV cache (`max_batch` slots of `max_model_len` positions)
and runs on one background thread. Each loop iteration is one step:

1. apply pending commands (adapter load/unload), drop cancelled requests (their slots free now),
   and admit waiting requests into free slots (FIFO, at most `prefill_tokens` padded prompt tokens
   per step so a long prompt does not stall everyone's next token for long);
2. prefill the newcomers together in one forward (right-padded, each into its own slot) and sample
   their first token;
3. one decode forward for every running row: row b feeds its last token at its own position in its
   own slot, with its own adapter (`MultiLoRA.use`), and samples with its own parameters and seed.

Both forwards are the model's own steps, `CausalLM.prefill` and `CausalLM.decode` (which `Generator`
runs too); `compile=True` runs the decode step through torch.compile (`CausalLM.compile_decode`).

Rows leave as soon as they finish (stop token, stop string, max_tokens) or are cancelled; their slot
is reused by the next step's newcomers, after the positions its last occupant wrote are zeroed: a
masked cache entry still reaches attention arithmetic (0 x NaN = NaN), so nothing a request leaves
behind, whatever it holds, may stay for the next one. A row's right padding repeats its own last
prompt token, so the padding's cache entries come from that request's own input and adapter too. A request's output does not depend on what else is in the
batch (greedy equals the request served alone; a seed gives the same sample stream).

Failures stay inside the request that caused them: an exception while admitting it (its seed, its
stop set), sampling, decoding text or delivering an event fails that request only; an exception in a batched forward re-runs the rows
one by one (the cache writes are idempotent) and fails only the rows that fail alone.

A request may ask for log-probabilities (qserve.logprobs): of its prompt tokens, from the prefill's
hidden states of every prompt position, and of each token it samples; `max_new_tokens` 0 with prompt
log-probabilities is a scoring request that finishes at its prefill.

Requests talk back through `emit(Event)`, called on the engine thread (the server forwards events
to its event loop). `Engine.generate` is the blocking form for tests, benchmarks and scripts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from qformats.errors import QError
from qformats.peft_adapter import PeftAdapter, read_adapter
from qserve.engine_metrics import EngineMetrics
from qserve.engine_request import Event, Request
from qserve.generate import (
    Completion,
    ContextTooLong,
    DecodeRow,
    SamplingParams,
    check_prompt,
    sample,
    seeded_generator,
    stop_ids,
)
from qserve.logprobs import TokenLogprob, token_logprobs
from qserve.lora import MultiLoRA
from qserve.model import CausalLM
from qserve.tokenizer import Tokenizer

log = logging.getLogger("qserve.engine")


DEFAULT_MAX_MODEL_LEN = 2048


class QueueFull(QError):
    """The waiting queue holds `max_queue` requests already (HTTP 429)."""


class UnknownAdapter(QError):
    """No adapter of that name is loaded (HTTP 404)."""


class Engine:
    """Continuous batching over one `CausalLM` and any number of LoRA adapters (see module doc)."""

    prompt_logprob_chunk = 256  # prompt positions whose logits exist at once when scoring

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, *, max_batch: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, prefill_tokens: int = 2048, compile: bool = False):  # fmt: skip
        if max_batch < 1 or max_queue < 0:
            raise QError(f"max batch must be >= 1 and max queue >= 0 (got {max_batch}, {max_queue})")
        context = model.args.max_position_embeddings
        # The static cache holds max_batch x max_model_len positions: default to at most 2048 of them.
        self.max_model_len = min(max_model_len or DEFAULT_MAX_MODEL_LEN, context)
        if max_model_len and max_model_len > context:
            raise QError(f"--max-model-len {max_model_len} exceeds the model's context of {context} tokens")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.device = model.device
        model.setup_cache(max_batch, self.max_model_len)
        if compile:  # the decode step through torch.compile: compiled once per batch size it meets
            model.compile_decode()
        self.lora = MultiLoRA(model)
        self.adapter_ids: dict[str, int] = {}  # served name -> id; unloaded names leave at once
        self._retired: set[int] = set()  # unloaded ids whose weights wait for their last request
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._slot_written = [0] * max_batch  # per slot: cache positions [0, n) hold something to clear
        self.metrics = EngineMetrics()
        self._lock = threading.Condition()
        self._commands: list[tuple[Callable[[], object], queue.SimpleQueue]] = []
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public API (any thread)

    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="qserve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None,
               emit: Callable[[Event], None] = lambda e: None) -> Request:  # fmt: skip
        """Queue a request; raises ContextTooLong, UnknownAdapter, QueueFull or QError (bad parameters)."""
        if adapter is not None and adapter not in self.adapter_ids:
            raise UnknownAdapter(f"no adapter named {adapter!r} is loaded")
        params.check()
        ids, limit = check_prompt(prompt_ids, self.model.args.vocab_size, self.max_model_len), self.max_model_len
        if len(ids) + params.max_new_tokens > limit:
            n = len(ids)
            raise ContextTooLong(f"the maximum context length is {limit} tokens, but {n + params.max_new_tokens} were "
                                 f"requested ({n} in the prompt, {params.max_new_tokens} to generate); "
                                 f"lower max_tokens to {limit - n} or less")  # fmt: skip
        req = Request(ids, params, adapter, emit)
        with self._lock:
            if adapter is not None:
                if adapter not in self.adapter_ids:  # unloaded meanwhile
                    raise UnknownAdapter(f"no adapter named {adapter!r} is loaded")
                req.adapter_id = self.adapter_ids[adapter]
            if len(self.waiting) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting already (max queue)")
            self.waiting.append(req)
            self.metrics.received += 1
            self._lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away): it leaves the queue now, or its slot frees before the next step."""
        with self._lock:
            if req.done:
                return
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
                self._finish(req, Event(finish_reason="cancelled"))
            self._lock.notify_all()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None) -> Completion:
        """Blocking: submit and wait; the engine must be started."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        start = time.perf_counter()
        req = self.submit(prompt_ids, params, adapter, events.put)
        chunks, ids = [], []
        while True:
            ev = events.get()
            chunks.append(ev.text)
            ids.extend(ev.token_ids)
            if ev.error:
                raise QError(f"request failed: {ev.error}")
            if ev.final:
                return Completion(text="".join(chunks), token_ids=ids, finish_reason=ev.finish_reason,
                                  prompt_tokens=len(req.prompt_ids), seconds=time.perf_counter() - start)  # fmt: skip

    def load_adapter(self, name: str, source: str | Path, *, max_rank: int | None = None,
                     max_bytes: int | None = None) -> PeftAdapter:  # fmt: skip
        """Read a PEFT adapter (folder or Hub id, on this thread) and install it between two steps under `name`.

        max_rank / max_bytes: refuse a larger adapter before reading its weights (qformats.peft_adapter).
        """
        if name in self.adapter_ids:
            raise QError(f"an adapter named {name!r} is already loaded")
        adapter = read_adapter(source, max_rank=max_rank, max_bytes=max_bytes)

        def install():
            if name in self.adapter_ids:
                raise QError(f"an adapter named {name!r} is already loaded")
            self.adapter_ids[name] = self.lora.add(adapter)  # the fit check runs here, once

        self._run_on_engine(install)
        return adapter

    def unload_adapter(self, name: str) -> None:
        """New requests can no longer name it; its weights go once the requests using it finish."""
        with self._lock:
            if name not in self.adapter_ids:
                raise UnknownAdapter(f"no adapter named {name!r} is loaded")
            self._retired.add(self.adapter_ids.pop(name))
            self._lock.notify_all()

    def adapters(self) -> dict[str, PeftAdapter]:
        with self._lock:
            return {name: self.lora.adapters[aid] for name, aid in self.adapter_ids.items()}

    # ------------------------------------------------------------------ the engine thread

    def _run_on_engine(self, fn: Callable[[], object]) -> object:
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._commands.append((fn, done))
            self._lock.notify_all()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self.waiting or self.running or self._commands or self._retired):
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self._iteration()
            except Exception as e:  # an engine bug must not kill the server: fail the batch, go on
                log.exception("engine step failed")
                with self._lock:
                    for req in list(self.running.values()):
                        self._finish(req, Event(error=f"internal error: {e}"))
        with self._lock:
            for req in [*self.waiting, *self.running.values()]:
                self._finish(req, Event(error="the server is shutting down"))
            self.waiting.clear()

    def _iteration(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
            for req in list(self.running.values()):
                if req.cancelled:
                    self._finish(req, Event(finish_reason="cancelled"))
            joiners = self._admit()
        for fn, done in commands:
            try:
                done.put((True, fn()))
            except Exception as e:  # noqa: BLE001 (handed back to the caller)
                done.put((False, e))
        try:
            self._free_retired()
        except Exception:
            log.exception("freeing unloaded adapters failed")
        self._step(joiners)

    def _admit(self) -> list[Request]:
        """Move waiting requests into free slots (called with the lock held)."""
        free = [s for s in range(self.max_batch) if s not in self.running]
        joiners: list[Request] = []
        while self.waiting and free:
            nxt = self.waiting[0]
            padded = (len(joiners) + 1) * max(len(r.prompt_ids) for r in [nxt, *joiners])
            if joiners and padded > self.prefill_tokens:
                break
            req = self.waiting.popleft()
            try:
                req.row = DecodeRow(self.tokenizer, req.params, stop_ids(req.params, self.tokenizer))
                req.generator = seeded_generator(req.params.seed, self.device)
            except Exception as e:  # noqa: BLE001 (fails this request only; it holds no slot yet)
                self._fail(req, e)
                continue
            req.slot = free.pop(0)
            self.running[req.slot] = req
            joiners.append(req)
        return joiners

    def _free_retired(self) -> None:
        with self._lock:
            in_use = {r.adapter_id for r in [*self.waiting, *self.running.values()]}
            for aid in [a for a in self._retired if a not in in_use]:
                self._retired.discard(aid)
                self.lora.remove(aid)

    @torch.inference_mode()
    def _step(self, joiners: list[Request]) -> None:
        if joiners:
            for req in joiners:
                self.model.clear_cache(req.slot, self._slot_written[req.slot])
                self._slot_written[req.slot] = max(len(r.prompt_ids) for r in joiners)  # with the right padding
            logits = self._forward_isolated(joiners, self._prefill_forward)
            for req, row_logits in logits.items():
                req.pos = len(req.prompt_ids)
                if req.params.max_new_tokens == 0:  # scoring only: the prompt's log-probabilities are the answer
                    with self._lock:
                        self._finish(req, Event(finish_reason="length", prompt_logprobs=req.prompt_logprobs))
                else:
                    self._advance(req, row_logits)
        with self._lock:
            decoding = sorted((r for r in self.running.values() if not r.done and not r.cancelled), key=lambda r: r.slot)
        if decoding:
            self.metrics.batch_size = len(decoding)
            for req in decoding:
                self._slot_written[req.slot] = max(self._slot_written[req.slot], req.pos + 1)
            logits = self._forward_isolated(decoding, self._decode_forward)
            for req, row_logits in logits.items():
                req.pos += 1
                self._advance(req, row_logits)
        self.metrics.steps += 1

    def _prefill_forward(self, reqs: list[Request]) -> torch.Tensor:
        lens = [len(r.prompt_ids) for r in reqs]
        with self.lora.use([r.adapter_id for r in reqs]):
            hidden = self.model.prefill([r.prompt_ids for r in reqs], [r.slot for r in reqs])
            for i, (r, n) in enumerate(zip(reqs, lens)):
                if r.params.prompt_logprobs is not None:
                    r.prompt_logprobs = [None, *self._prompt_logprobs(hidden[i, : n - 1], r)]
            return self.model.logits(hidden, torch.tensor(lens, device=self.device) - 1)

    def _prompt_logprobs(self, hidden: torch.Tensor, req: Request) -> list[TokenLogprob]:
        """Position j's logits score prompt token j + 1; `prompt_logprob_chunk` positions at a time, so a long
        prompt never holds its whole [tokens, vocab] logits at once."""
        out: list[TokenLogprob] = []
        step = self.prompt_logprob_chunk
        for start in range(0, hidden.shape[0], step):
            chunk = hidden[start : start + step]
            out += token_logprobs(self.model.logits(chunk), req.prompt_ids[start + 1 : start + 1 + chunk.shape[0]],
                                  req.params.prompt_logprobs)  # fmt: skip
        return out

    def _decode_forward(self, reqs: list[Request]) -> torch.Tensor:
        dev = self.device
        tokens = torch.tensor([r.pending for r in reqs], device=dev)
        # Rows in slots 0..B-1 in order (the usual case: free slots are taken lowest first) read the cache
        # as a view; other sets of slots gather their rows.
        contiguous = all(r.slot == i for i, r in enumerate(reqs))
        slots = None if contiguous else torch.tensor([r.slot for r in reqs], device=dev)
        positions = torch.tensor([r.pos for r in reqs], device=dev)
        with self.lora.use([r.adapter_id for r in reqs]):
            return self.model.decode(tokens, positions, slots, kv_len=max(r.pos for r in reqs) + 1)

    def _forward_isolated(self, reqs: list[Request], forward) -> dict[Request, torch.Tensor]:
        """Logits per request; if the batched forward raises, each row alone, failing only rows that fail alone."""
        try:
            logits = forward(reqs)
            return {r: logits[i] for i, r in enumerate(reqs)}
        except Exception as e:  # noqa: BLE001 (isolated below)
            if len(reqs) == 1:
                self._fail(reqs[0], e)
                return {}
            log.warning("batched forward failed (%s); retrying its %d rows one by one", e, len(reqs))
        out = {}
        for r in reqs:
            try:
                out[r] = forward([r])[0]
            except Exception as e:  # noqa: BLE001 (fails this request only)
                self._fail(r, e)
        return out

    def _advance(self, req: Request, logits: torch.Tensor) -> None:
        """Sample this row's next token, emit its text, finish it if done; errors fail this row only."""
        try:
            token = int(sample(logits[None], req.params, req.generator)[0])
            k = req.params.logprobs
            scored = None if k is None else token_logprobs(logits[None], [token], k)
            prompt_scored, req.prompt_logprobs = req.prompt_logprobs, None  # once, with the first event
            now = time.perf_counter()
            if req.first_token_at is None:
                req.first_token_at = now
                self.metrics.ttft.observe(now - req.arrival)
            else:
                self.metrics.inter_token.observe(now - req.last_token_at)
            req.last_token_at = now
            req.pending = token
            delta = req.row.push(token)
            self.metrics.generated_tokens += 1
            if req.row.done or req.pos >= self.max_model_len:  # (submit keeps pos below the limit)
                with self._lock:
                    self._finish(req, Event(text=delta, token_ids=[token], finish_reason=req.row.reason,
                                            logprobs=scored, prompt_logprobs=prompt_scored))  # fmt: skip
            elif not req.cancelled:
                req.emit(Event(text=delta, token_ids=[token], logprobs=scored, prompt_logprobs=prompt_scored))
        except Exception as e:  # noqa: BLE001 (fails this request only)
            self._fail(req, e)

    def _fail(self, req: Request, e: BaseException) -> None:
        log.warning("request %d failed: %r", req.id, e)
        with self._lock:
            self._finish(req, Event(error=f"{type(e).__name__}: {e}"))

    def _finish(self, req: Request, event: Event) -> None:
        """The last event of a request; frees its slot (called with the lock held)."""
        if req.done:
            return
        req.done = True
        if self.running.get(req.slot) is req:
            del self.running[req.slot]
        event.prompt_tokens = len(req.prompt_ids)
        event.completion_tokens = len(req.row.ids) if req.row else 0
        self.metrics.finished(event, time.perf_counter() - req.arrival, len(req.prompt_ids))
        if req.cancelled and event.finish_reason != "cancelled":
            return
        try:
            req.emit(event)
        except Exception:  # noqa: BLE001 (a client that cannot take its last event is gone anyway)
            log.warning("request %d: could not deliver its last event", req.id)
