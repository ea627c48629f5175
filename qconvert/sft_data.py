"""Supervised fine-tuning data: JSONL records -> token ids with a loss mask -> length-grouped batches.

Record shapes (one JSON object per line; detected from the first record, or named):
- `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`
- `alpaca`: `{"instruction": ..., "input": ... (optional), "output": ...}`
- `prompt-completion`: `{"prompt": ..., "completion": ...}`
- `text`: `{"text": ...}` (plain language modelling: every token is trained)

The first three are rendered with the model's chat template (a user turn, an assistant turn); a
tokenizer without one gets plain concatenation (Alpaca's prompt for `alpaca`). The loss covers
the assistant's tokens only, up to and including the end-of-turn EOS, unless `train_on_prompt`.
Every trained response ends in EOS: the template's own, or one appended. Examples longer than
`max_seq_len` are truncated; one left with no trained token is dropped, and a file in which no
example fits is an error. A bad line is a QError naming the file and line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from qconvert.finetune_config import FORMATS
from qformats.errors import QError
from qserve.lm_loss import IGNORE
from qserve.tokenizer import CHAT_ROLES

ROLES = CHAT_ROLES  # the one list: the server accepts exactly these
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")  # fmt: skip


class TokenizerLike(Protocol):
    """What the data needs of a tokenizer (qserve.tokenizer.Tokenizer provides it)."""

    chat_template: str | None
    eos_token_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    source: str  # "file:line"

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Dataset:
    examples: list[Example]
    format: str
    path: str
    truncated: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; QError naming file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise QError(f"{path}: no such data file")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise QError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise QError(f"{path}:{lineno}: JSON nested too deeply to read") from None
            if not isinstance(record, dict):
                raise QError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise QError(f"{path}: no examples (the file is empty)")
    return records


def detect_format(record: dict, where: str) -> str:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "text" in record:
        return "text"
    raise QError(f"{where}: cannot tell the data format from keys {sorted(record)}; expected one of "
                 "messages / instruction+output / prompt+completion / text (or pass --format)")  # fmt: skip


def _string(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise QError(f"{where}: field {key!r} is {what}")
    return value


def to_messages(record: dict, fmt: str, where: str) -> list[dict]:
    """The conversation of a record in any of the instruction formats; QError naming what is wrong."""
    if fmt == "messages":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise QError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise QError(f"{where}: messages[{i}] must be {{\"role\": one of {'/'.join(ROLES)}, "
                             "\"content\": a string}")  # fmt: skip
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise QError(f"{where}: 'messages' has no assistant turn to learn from")
        return out
    if fmt == "alpaca":
        instruction, extra = _string(record, "instruction", where), _string(record, "input", where, optional=True)
        user = instruction + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, "output", where)}]
    if fmt == "prompt-completion":
        return [{"role": "user", "content": _string(record, "prompt", where)},
                {"role": "assistant", "content": _string(record, "completion", where)}]  # fmt: skip
    raise AssertionError(fmt)


def eos_id(tokenizer: TokenizerLike) -> int:
    """The EOS appended to responses: the model's first stop token (generation_config's eos_token_id)."""
    ids = getattr(tokenizer, "eos_token_ids", None) or []
    if not ids:
        raise QError("the tokenizer has no EOS token (tokenizer_config.json eos_token / generation_config.json "
                     "eos_token_id): training could not teach the model to stop")  # fmt: skip
    return ids[0]


def tokenize_chat(messages: list[dict], tokenizer: TokenizerLike, train_on_prompt: bool,
                  where: str) -> tuple[list[int], list[int]]:  # fmt: skip
    """ids and labels of a conversation rendered with the chat template; assistant turns trained."""
    eos, eos_all = eos_id(tokenizer), set(tokenizer.eos_token_ids)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []  # (start, end) character span of each assistant turn in `full`
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise QError(f"{where}: the chat template does not render conversations incrementally, so the "
                         "assistant turns cannot be located; use the text format instead")  # fmt: skip
        spans.append((len(before), len(through)))
    ids, labels, pos = [], [], 0
    last = len(spans) - 1
    for j, (start, end) in enumerate(spans):
        prompt = tokenizer.encode(full[pos:start], add_special_tokens=False) if start > pos else []
        reply = tokenizer.encode(full[start:end], add_special_tokens=False)
        cut = max((i for i, t in enumerate(reply) if t in eos_all), default=None)
        if cut is None:
            trained, tail = reply, []
            if j == last:
                trained = reply + [eos]  # the template writes no EOS: append one so the model learns to stop
        else:
            trained, tail = reply[: cut + 1], reply[cut + 1 :]  # e.g. ChatML's "\n" after <|im_end|>
        ids += prompt + trained + tail
        labels += [IGNORE] * len(prompt) + trained + [IGNORE] * len(tail)
        pos = end
    if pos < len(full):
        rest = tokenizer.encode(full[pos:], add_special_tokens=False)
        ids += rest
        labels += [IGNORE] * len(rest)
    if train_on_prompt:
        labels = list(ids)
    return ids, labels


def tokenize_raw(prompt: str, completion: str, tokenizer: TokenizerLike, train_on_prompt: bool) -> tuple[list, list]:
    """`prompt + completion + EOS` without a template (BOS as the tokenizer adds it)."""
    eos, eos_all = eos_id(tokenizer), set(tokenizer.eos_token_ids)
    p = tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
    c = tokenizer.encode(completion, add_special_tokens=not prompt)
    if not c or c[-1] not in eos_all:
        c = c + [eos]
    ids = p + c
    labels = list(ids) if train_on_prompt else [IGNORE] * len(p) + c
    return ids, labels


def load_sft_jsonl(path: str | Path, tokenizer: TokenizerLike, *, fmt: str | None = None, max_seq_len: int = 2048,
                   train_on_prompt: bool = False, use_chat_template: bool = True) -> Dataset:  # fmt: skip
    """Read, validate and tokenize a JSONL file; see the module doc for the rules."""
    if fmt is not None and fmt not in FORMATS:
        raise QError(f"unknown data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if max_seq_len < 2:
        raise QError(f"--max-seq-len must be at least 2, not {max_seq_len}")
    records = read_jsonl(path)
    fmt = fmt or detect_format(records[0][1], f"{path}:{records[0][0]}")
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None)) and fmt != "text"
    ds = Dataset([], fmt, str(path))
    if fmt != "text" and not chat:
        ds.notes.append("no chat template: prompts and responses are concatenated as plain text")
    too_long, shortest = 0, None
    for lineno, record in records:
        where = f"{path}:{lineno}"
        if fmt == "text":
            ids, labels = tokenize_raw("", _string(record, "text", where), tokenizer, True)
        else:
            msgs = to_messages(record, fmt, where)
            if chat:
                ids, labels = tokenize_chat(msgs, tokenizer, train_on_prompt, where)
            else:
                ids, labels = tokenize_raw(*_plain(msgs, fmt), tokenizer, train_on_prompt)
        if sum(1 for x in labels[1:] if x != IGNORE) == 0:
            raise QError(f"{where}: the example has no token to train on (empty response?)")
        shortest = len(ids) if shortest is None else min(shortest, len(ids))
        if len(ids) > max_seq_len:
            too_long += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if sum(1 for x in labels[1:] if x != IGNORE) == 0:
                ds.dropped += 1
                continue
            ds.truncated += 1
        ds.examples.append(Example(ids, labels, where))
    if too_long == len(records):
        raise QError(f"{path}: all {len(records)} examples are longer than --max-seq-len {max_seq_len} tokens "
                     f"(the shortest has {shortest}): raise --max-seq-len")  # fmt: skip
    if ds.truncated:
        ds.notes.append(f"{ds.truncated} examples longer than {max_seq_len} tokens were truncated")
    if ds.dropped:
        ds.notes.append(f"{ds.dropped} examples had no response left within {max_seq_len} tokens and were dropped")
    return ds


def _plain(msgs: list[dict], fmt: str) -> tuple[str, str]:
    """(prompt, completion) without a chat template: the last assistant turn is the completion."""
    k = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    context = "\n\n".join(m["content"] for m in msgs[:k])
    if fmt == "alpaca":
        context = ALPACA_PROMPT.format(ctx="", instruction=context, input="")
    return context, msgs[k]["content"]


def split_eval(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A deterministic (seeded) held-out split; QError if either side would be empty."""
    if not 0 < fraction < 1:
        raise QError(f"--eval-fraction must be between 0 and 1, not {fraction}")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(ds) * fraction))
    if n_eval >= len(ds):
        raise QError(f"{ds.path}: {len(ds)} examples are too few to hold out {fraction:.0%} for evaluation")
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(ds.examples) if i not in held]
    evals = [e for i, e in enumerate(ds.examples) if i in held]
    return (Dataset(train, ds.format, ds.path, ds.truncated, ds.dropped, ds.notes),
            Dataset(evals, ds.format, ds.path + f" (held-out {fraction:.0%})"))  # fmt: skip


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 50,
                  drop_last: bool = False) -> list[list[int]]:  # fmt: skip
    """The batches (lists of example indices) of one epoch, grouped by length, deterministic in (seed, epoch).

    As transformers' LengthGroupedSampler: shuffle, cut into mega-batches of `group` batches, sort
    each by length (longest first) so a batch holds similar lengths (little padding), then shuffle
    the batch order so steps do not run from long to short.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * group
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, T], labels [B, T]) right-padded to the longest; padding carries no loss.

    Right padding needs no attention mask for a causal model: real tokens never attend to later ones.
    """
    t = max(len(e.input_ids) for e in examples)
    tokens = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        tokens[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return tokens.to(device), labels.to(device)
