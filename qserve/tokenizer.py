"""The tokenizer of a model folder: `tokenizers` for text <-> ids, jinja2 for the chat template.

Everything comes from the files transformers writes: tokenizer.json (vocabulary, normalizer,
post-processor that adds BOS where the model wants it), tokenizer_config.json (special tokens,
chat template), chat_template.jinja / chat_template.json (where newer transformers put the
template), generation_config.json and config.json (EOS ids: every one of them stops generation).
The chat template is rendered the way transformers renders it (sandboxed, trim_blocks,
lstrip_blocks, its `tojson`, `raise_exception`, `strftime_now`), so prompts are identical.
A template comes with the model, not from us: it renders under a time limit (checked at every
`range` step and output chunk), an output size limit, and a size limit on `*` of strings and lists,
so a huge loop is a QError rather than a frozen server.

`CHAT_ROLES` is the one list of chat roles: the server accepts these and finetune data may use them.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from qformats.errors import QError


class TextTooLong(QError):
    """A text too long for the token budget, found out before tokenizing it."""


_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
CHAT_ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_SECONDS = 2.0  # longest a chat template may take to render one prompt
TEMPLATE_MAX_CHARS = 2**24  # longest prompt text it may produce (also the limit on `*` of strings/lists)


class Tokenizer:
    """Text <-> token ids, chat prompts, and the stop tokens of a model."""

    def __init__(self, tokenizer: HFTokenizer, tokenizer_config: dict | None = None,
                 generation_config: dict | None = None, model_config: dict | None = None,
                 chat_template: str | None = None):  # fmt: skip
        self.tokenizer = tokenizer
        cfg, gen, model = tokenizer_config or {}, generation_config or {}, model_config or {}
        self.special_tokens = {n: _token_text(cfg.get(n)) for n in _SPECIAL_NAMES if _token_text(cfg.get(n))}
        self.chat_template = chat_template or _template_of(cfg.get("chat_template"))
        self.clean_up_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.bos_token_id = _first(gen.get("bos_token_id"), model.get("bos_token_id"), self._id("bos_token"))
        eos_ids: list[int] = []
        for source in (gen.get("eos_token_id"), model.get("eos_token_id"), self._id("eos_token")):
            for i in source if isinstance(source, list) else [source]:
                if isinstance(i, int) and i not in eos_ids:
                    eos_ids.append(i)
        self.eos_token_ids = eos_ids
        self.pad_token_id = _first(gen.get("pad_token_id"), model.get("pad_token_id"), self._id("pad_token"))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise QError(f"{d}: no tokenizer.json (qserve needs the fast-tokenizer file)")
        try:
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception on a bad file)
            raise QError(f"{d / 'tokenizer.json'}: unreadable ({e})") from None
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif (d / "chat_template.json").is_file():
            template = _template_of(_read_json(d / "chat_template.json").get("chat_template"))
        return cls(tok, _read_json(d / "tokenizer_config.json"), _read_json(d / "generation_config.json"),
                   _read_json(d / "config.json"), template)  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return self.tokenizer.token_to_id(text) if text else None

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token stands for: a text longer than n times this is more than n tokens."""
        return max(1, max(len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)))

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`; `add_special_tokens` lets the post-processor add BOS as transformers does.

        max_tokens: raise TextTooLong, without tokenizing, for a text too long to be that few tokens.
        """
        if max_tokens is not None and len(text) > max_tokens * self.longest_token_chars:
            raise TextTooLong(f"the prompt is {len(text)} characters, more than the {max_tokens} tokens of the "
                              f"context can hold")  # fmt: skip
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]), rendered like transformers."""
        if not self.chat_template:
            raise QError("this model has no chat template (tokenizer_config.json has no chat_template); "
                         "prompt it without --chat")  # fmt: skip
        template = _compile(self.chat_template)
        _render_deadline.at = time.monotonic() + TEMPLATE_SECONDS
        try:
            parts, size = [], 0
            for part in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **self.special_tokens, **kwargs):  # fmt: skip
                size += len(part)
                if size > TEMPLATE_MAX_CHARS:
                    raise jinja2.TemplateError(f"the rendered prompt exceeds {TEMPLATE_MAX_CHARS} characters")
                _check_deadline()
                parts.append(part)
            return "".join(parts)
        except (jinja2.TemplateError, OverflowError) as e:
            raise QError(f"chat template: {e}") from None
        finally:
            _render_deadline.at = None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    max_tokens: int | None = None) -> list[int]:  # fmt: skip
        # The template writes every special token itself (BOS included), so none are added here.
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False, max_tokens=max_tokens)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise QError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_of(value) -> str | None:
    """A chat template: a string, or a list of named templates (the one named "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def _first(*values):
    for v in values:
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return None


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (for tokenizers whose config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_render_deadline = threading.local()  # per thread: the server renders prompts on worker threads


def _check_deadline() -> None:
    at = getattr(_render_deadline, "at", None)
    if at is not None and time.monotonic() > at:
        raise jinja2.TemplateError(f"rendering took longer than {TEMPLATE_SECONDS:g} s")


def _timed_range(*args):
    """The sandbox's `range` (at most 100000 items), checking the render deadline at every step."""
    from jinja2.sandbox import safe_range

    for i in safe_range(*args):
        _check_deadline()
        yield i


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus a size limit on `*` and `**` (`'x' * 10**9` would take gigabytes)."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator: str, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.TemplateError(f"exponent {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                    raise jinja2.TemplateError(f"a sequence repeated {n} times exceeds {TEMPLATE_MAX_CHARS} items")
        return super().call_binop(context, operator, left, right)


_COMPILED: dict[str, jinja2.Template] = {}


def _compile(template: str) -> jinja2.Template:
    if template not in _COMPILED:
        env = _TemplateEnvironment(trim_blocks=True, lstrip_blocks=True,
                                   extensions=[_GenerationTag, jinja2.ext.loopcontrols])  # fmt: skip
        env.globals["range"] = _timed_range
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _COMPILED[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise QError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None
    return _COMPILED[template]


class StreamDecoder:
    """Incremental detokenization: `push(id)` returns the new text, never half a UTF-8 character.

    Decodes a short window of recent ids twice (with and without the newest) and emits the
    difference, as vLLM does: decoders that depend on the neighbouring token (SentencePiece's
    leading space, byte-level BPE's multi-byte characters) then give exactly the text that
    `decode(all ids)` gives. A window whose text ends in U+FFFD (an incomplete byte sequence)
    is held back until the character completes; `flush()` returns whatever is left.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]
