"""qconvert eval: sliding-window perplexity against transformers, the CLI, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import CORPUS, save_tiny, save_tiny_tokenizer

from qconvert.cli import main as qconvert_main
from qconvert.eval import evaluate_file, perplexity, window_spans
from qserve.loader import load_model
from qserve.tokenizer import Tokenizer

PROSE = Path(__file__).parents[1] / "data" / "prose.txt"


def hf_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """transformers' perplexity guide, verbatim in spirit: labels -100 outside each window's new tokens."""
    input_ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        valid = (labels[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("n,context,stride", [(10, 4, 4), (10, 4, 1), (11, 5, 3), (3, 8, 4), (100, 32, 16)])
def test_windows_score_each_token_at_most_once(n, context, stride):
    spans = window_spans(n, context, stride)
    scored = [i for begin, end, first in spans for i in range(first, end)]
    if stride < context:
        assert scored == list(range(1, n))
    else:  # disjoint windows: a window's first token has no context in it and is not scored (as in transformers)
        assert scored == [i for i in range(1, n) if i not in {b for b, _, _ in spans}]
    assert all(end - begin <= context for begin, end, _ in window_spans(n, context, stride))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    hf = save_tiny("llama", folder, vocab_size=320, max_position_embeddings=64)
    save_tiny_tokenizer(folder)
    text = folder / "text.txt"
    text.write_text("\n".join(CORPUS[:6]))
    return hf, folder, text


@pytest.mark.parametrize("context,stride", [(64, 32), (48, 48), (16, 5)])
def test_perplexity_equals_transformers(tiny, context, stride):
    hf, folder, text = tiny
    ids = Tokenizer.from_dir(folder).encode(text.read_text())
    assert len(ids) > 2 * context
    got = perplexity(load_model(folder), ids, context, stride)
    assert got.perplexity == pytest.approx(hf_perplexity(hf, ids, context, stride), rel=1e-5)
    assert got.tokens == sum(end - first for _, end, first in window_spans(len(ids), context, stride))
    assert got.tokens_per_s > 0


def test_cli_eval_text_and_json(tiny):
    _, folder, text = tiny
    want = evaluate_file(folder, text, context=32, stride=16)
    runner = CliRunner()
    r = runner.invoke(qconvert_main, ["eval", "--model", str(folder), "--text", str(text), "--context", "32",
                                      "--stride", "16", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-9) and got["tokens"] == want.tokens
    assert got["context"] == 32 and got["stride"] == 16 and got["tokens_per_s"] > 0
    r = runner.invoke(qconvert_main, ["eval", "--model", str(folder), "--text", str(text)])
    assert r.exit_code == 0 and r.stdout.startswith("perplexity ") and "tokens/s" in r.stdout


def test_cli_eval_bad_input_one_line(tiny, tmp_path):
    _, folder, text = tiny
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    cases = [
        (["--text", str(tmp_path / "missing.txt")], "no such file"),
        (["--text", str(text), "--context", "100"], "context 100 exceeds the model's 64 positions"),
        (["--text", str(text), "--context", "8", "--stride", "9"], "0 < stride <= context"),
        (["--text", str(tmp_path / "one.txt")], "perplexity needs at least 2"),
        (["--text", str(tmp_path / "bin.txt")], "not UTF-8 text"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(qconvert_main, ["eval", "--model", str(folder), *args])
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert message in r.stderr, r.stderr


def test_smollm2_prose_perplexity_equals_transformers(smollm2_fp16_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_fp16_dir, dtype=torch.float32).eval()
    ids = Tokenizer.from_dir(smollm2_fp16_dir).encode(PROSE.read_text())
    got = perplexity(load_model(smollm2_fp16_dir), ids, context=256, stride=128)
    assert got.perplexity == pytest.approx(hf_perplexity(hf, ids, 256, 128), rel=1e-4)
    assert 5 < got.perplexity < 30  # plain English prose (DESIGN: ~13 with the Q/K un-permutation)
