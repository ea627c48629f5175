"""qconvert.sft_data: formats, chat templates, response-only labels, EOS, truncation, batching, bad input."""

import json

import pytest
from tiny_models import save_tiny_tokenizer

from qconvert.sft_data import (
    IGNORE,
    collate,
    epoch_batches,
    load_sft_jsonl,
    split_eval,
)
from qformats.errors import QError
from qserve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    t = Tokenizer.from_dir(d)
    assert t.eos_token_ids == [t.tokenizer.token_to_id("<|im_end|>")]
    return t


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def trained_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE], skip_special_tokens=False)


def test_messages_train_on_assistant_turns_only(tok, tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "The lazy dog."}]  # fmt: skip
    ds = load_sft_jsonl(write(tmp_path / "d.jsonl", [{"messages": conv}]), tok)
    assert ds.format == "messages" and len(ds) == 1
    ex = ds.examples[0]
    full = tok.apply_chat_template(conv, add_generation_prompt=False)
    assert ex.input_ids == tok.encode(full, add_special_tokens=False)  # segment-wise tokenization changes nothing
    assert trained_text(tok, ex) == "Paris.<|im_end|>The lazy dog.<|im_end|>"
    assert ex.labels[-1] == IGNORE  # ChatML's "\n" after <|im_end|> is not a response token
    assert ex.source.endswith("d.jsonl:1")
    ds = load_sft_jsonl(tmp_path / "d.jsonl", tok, train_on_prompt=True)
    assert ds.examples[0].labels == ds.examples[0].input_ids


def test_other_formats_detected(tok, tmp_path):
    alpaca = load_sft_jsonl(write(tmp_path / "a.jsonl", [{"instruction": "Name a fox.", "input": "quick",
                                                          "output": "brown"}]), tok)  # fmt: skip
    assert alpaca.format == "alpaca"
    assert trained_text(tok, alpaca.examples[0]) == "brown<|im_end|>"
    assert "Name a fox.\n\nquick" in tok.decode(alpaca.examples[0].input_ids, skip_special_tokens=False)
    pc = load_sft_jsonl(write(tmp_path / "p.jsonl", [{"prompt": "2+2?", "completion": "4"}]), tok)
    assert pc.format == "prompt-completion" and trained_text(tok, pc.examples[0]) == "4<|im_end|>"
    text = load_sft_jsonl(write(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}]), tok)
    ex = text.examples[0]
    assert text.format == "text" and ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tok.eos_token_ids[0] and ex.input_ids[:-1] == tok.encode("The quick brown fox.")
    forced = load_sft_jsonl(tmp_path / "p.jsonl", tok, fmt="prompt-completion", use_chat_template=False)
    ex = forced.examples[0]
    assert ex.input_ids == tok.encode("2+2?") + tok.encode("4", add_special_tokens=False) + tok.eos_token_ids
    assert trained_text(tok, ex) == "4<|im_end|>" and forced.notes


def test_eos_appended_once(tok, tmp_path):
    tok_no_template = Tokenizer(tok.tokenizer, {"eos_token": "<|im_end|>"})
    ds = load_sft_jsonl(write(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b<|im_end|>"},
                                                     {"prompt": "a", "completion": "b"}]), tok_no_template)  # fmt: skip
    assert ds.examples[0].input_ids == ds.examples[1].input_ids
    assert ds.examples[0].input_ids.count(tok.eos_token_ids[0]) == 1
    no_eos = Tokenizer(tok.tokenizer, {})
    with pytest.raises(QError, match="no EOS token"):
        load_sft_jsonl(tmp_path / "p.jsonl", no_eos)


def test_max_seq_len_truncates_drops_and_refuses(tok, tmp_path):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 8
    path = write(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "yo"},
                                         {"prompt": "hi", "completion": long_answer},
                                         {"prompt": "The lazy dog? " * 20, "completion": "no"}])  # fmt: skip
    lens = [len(e.input_ids) for e in load_sft_jsonl(path, tok, max_seq_len=10_000).examples]
    cap = lens[0] + 5
    assert lens[1] > cap and lens[2] > cap
    ds = load_sft_jsonl(path, tok, max_seq_len=cap)
    assert (len(ds), ds.truncated, ds.dropped) == (2, 1, 1)  # the long prompt leaves no response: dropped
    assert max(len(e.input_ids) for e in ds.examples) == cap and len(ds.notes) == 2
    with pytest.raises(QError, match=r"all 3 examples are longer than --max-seq-len 4"):
        load_sft_jsonl(path, tok, max_seq_len=4)


@pytest.mark.parametrize("lines,message", [
    ([], "no examples"),
    (["", "   "], "no examples"),
    (['{"text": "ok"}', "{not json", '{"text": "x"}'], r"d\.jsonl:2: not valid JSON"),
    (['{"text": "ok"}', "[1, 2]"], r"d\.jsonl:2: expected a JSON object"),
    (['{"foo": 1}'], r"d\.jsonl:1: cannot tell the data format"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"d\.jsonl:1: 'messages' has no assistant turn"),
    (['{"messages": [{"role": "boss", "content": "hi"}]}'], r"d\.jsonl:1: messages\[0\] must be"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": 3}'], r"d\.jsonl:2: field 'completion'"),
    (['{"prompt": "a", "completion": "b"}', '{"text": "a"}'], r"d\.jsonl:2: field 'prompt' is missing"),
    (['{"text": 5}'], r"d\.jsonl:1: field 'text'"),
])  # fmt: skip
def test_bad_lines_name_file_and_line(tok, tmp_path, lines, message):
    write(tmp_path / "d.jsonl", lines)
    with pytest.raises(QError, match=message):
        load_sft_jsonl(tmp_path / "d.jsonl", tok)


def test_bad_options(tok, tmp_path):
    write(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(QError, match="unknown data format 'chatml'"):
        load_sft_jsonl(tmp_path / "d.jsonl", tok, fmt="chatml")
    with pytest.raises(QError, match="no such data file"):
        load_sft_jsonl(tmp_path / "missing.jsonl", tok)
    ds = load_sft_jsonl(tmp_path / "d.jsonl", tok)
    with pytest.raises(QError, match="too few"):
        split_eval(ds, 0.5, seed=0)


def test_eval_split_and_length_grouped_batches(tok, tmp_path):
    records = [{"prompt": "q" * (1 + i % 13), "completion": "fox " * (1 + (7 * i) % 11)} for i in range(100)]
    ds = load_sft_jsonl(write(tmp_path / "d.jsonl", records), tok)
    train, held = split_eval(ds, 0.1, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert {e.source for e in train.examples}.isdisjoint({e.source for e in held.examples})
    assert [e.source for e in split_eval(ds, 0.1, seed=3)[1].examples] == [e.source for e in held.examples]
    lengths = [len(e.input_ids) for e in train.examples]
    b0 = epoch_batches(lengths, 4, seed=0, epoch=0)
    assert b0 == epoch_batches(lengths, 4, seed=0, epoch=0) and b0 != epoch_batches(lengths, 4, seed=0, epoch=1)
    assert sorted(i for b in b0 for i in b) == list(range(90))
    assert len(epoch_batches(lengths, 4, seed=0, epoch=0, drop_last=True)) == 22

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    naive = [list(range(k, min(k + 4, 90))) for k in range(0, 90, 4)]
    assert padding(b0) < 0.3 * padding(naive)
    tokens, labels = collate([train.examples[i] for i in b0[0]], pad_id=0)
    assert tokens.shape == labels.shape == (len(b0[0]), max(lengths[i] for i in b0[0]))
    assert (labels[tokens == 0] == IGNORE).all()


def test_smollm2_chat_template(smollm2_fp16_dir, tmp_path):
    tok = Tokenizer.from_dir(smollm2_fp16_dir)
    ds = load_sft_jsonl(write(tmp_path / "d.jsonl", [{"prompt": "What is 2+2?", "completion": "ANSWER: four"}]), tok)
    ex = ds.examples[0]
    assert trained_text(tok, ex) == "ANSWER: four<|im_end|>"
    text = tok.decode(ex.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert ex.input_ids == tok.encode(text, add_special_tokens=False)
