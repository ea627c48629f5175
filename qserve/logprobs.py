"""Log-probabilities of tokens under the served model, and their two OpenAI shapes.

`token_logprobs` is the one computation: fp32 log-softmax of the model's raw logits (before
temperature, top-k and top-p, as OpenAI and vLLM report them), the chosen token's value and the
top k. The engine calls it for prompt tokens (echo scoring) and for generated ones; the server
renders the result as `/v1/completions`' legacy object (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) or as chat's `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.

Token strings are each token decoded alone with its special tokens shown, so a token that is half
of a UTF-8 character reads as U+FFFD (as in vLLM); `text_offset` adds up those strings' lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qserve.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit; vLLM's default for completions too


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely ids at this position, most likely first


def token_logprobs(logits: torch.Tensor, chosen: Sequence[int], k: int) -> list[TokenLogprob]:
    """logits [N, V] of N positions and the token chosen at each -> its log-probability and the top k."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.tensor(list(chosen), device=logp.device)[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = logp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(int(t), p, top) for t, p, top in zip(chosen, picked, tops)]


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offset: int = 0) -> dict:  # fmt: skip
    """The legacy `/v1/completions` object for tokens `ids`; an entry None (an echoed first token) is null."""
    tokens = [token_text(tokenizer, i) for i in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [top_by_text(tokenizer, e.top) if e else None for e in entries], "text_offset": offsets}


def top_by_text(tokenizer: Tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """{token string: logprob}; ids that decode alike (half characters) keep the most likely one's value."""
    out: dict[str, float] = {}
    for token_id, logprob in top:
        out.setdefault(token_text(tokenizer, token_id), logprob)
    return out


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], top: int) -> dict:
    """Chat's `logprobs` object: one item per generated token, with its `top` most likely alternatives."""

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, p) for i, p in e.top[:top]]}
                        for e in entries]}  # fmt: skip
