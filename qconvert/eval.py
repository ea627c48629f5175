"""Perplexity of a model on a text file: a sliding window over the tokens, as in transformers' guide.

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens that
no earlier window scored, with everything before them in the window as context. With
`stride < context` every token but the file's first is scored once; with `stride == context` the
windows are disjoint and each window's first token (no context) is skipped, as in transformers'
guide. A smaller stride gives every scored token more context (fairer perplexity) at more compute.
The same numbers come out of transformers with the same windows (bench/decode.py compares them).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qformats.errors import QError
from qserve.lm_loss import IGNORE
from qserve.loader import load_model, resolve_model_dir
from qserve.model import CausalLM
from qserve.tokenizer import Tokenizer


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float  # tokens pushed through the model per second (window tokens, overlaps included)

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window; no token is scored twice."""
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@torch.inference_mode()
def perplexity(model: CausalLM, token_ids: list[int], context: int, stride: int | None = None,
               progress: bool = False) -> EvalResult:  # fmt: skip
    """Sliding-window perplexity of `token_ids` under `model` (plain causal forward, no KV cache)."""
    stride = stride or context
    if context < 2 or not 0 < stride <= context:
        raise QError(f"need context >= 2 and 0 < stride <= context, got context {context}, stride {stride}")
    if context > model.args.max_position_embeddings:
        raise QError(f"context {context} exceeds the model's {model.args.max_position_embeddings} positions")
    if len(token_ids) < 2:
        raise QError(f"the text is {len(token_ids)} token(s); perplexity needs at least 2")
    ids = torch.tensor(token_ids, device=model.device)
    spans = window_spans(len(token_ids), context, stride)
    nll_sum, scored, pushed = 0.0, 0, 0
    start = time.perf_counter()
    for begin, end, first in tqdm(spans, desc="windows", disable=None if progress else True, leave=False):
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, : first - begin] = IGNORE  # score targets first..end-1 only
        nll_sum += model.loss(window, labels, 1).item()
        scored += end - first
        pushed += end - begin
    seconds = time.perf_counter() - start
    nll = nll_sum / scored
    return EvalResult(perplexity=math.exp(nll), nll=nll, tokens=scored, windows=len(spans), context=context,
                      stride=stride, seconds=seconds, tokens_per_s=pushed / seconds)  # fmt: skip


def evaluate_file(model: str | Path, text_file: str | Path, context: int | None = None, stride: int | None = None,
                  dtype: str | torch.dtype | None = None, device: str = "cpu", revision: str | None = None,
                  progress: bool = False) -> EvalResult:  # fmt: skip
    """Perplexity of the model at `model` (folder or Hub id) on a UTF-8 text file.

    context defaults to min(1024, the model's positions); stride to half the context.
    """
    path = Path(text_file)
    if not path.is_file():
        raise QError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    model_dir = resolve_model_dir(model, revision)
    ids = Tokenizer.from_dir(model_dir).encode(text)
    lm = load_model(model_dir, dtype=dtype, device=device, progress=progress)
    context = context or min(1024, lm.args.max_position_embeddings)
    return perplexity(lm, ids, context, stride or max(1, context // 2), progress=progress)
