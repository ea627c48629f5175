"""Does a model answer in the `answer_format` dataset's format? Greedy answers to held-out questions.

    python -m qconvert.data.check_answer_format --model ./smollm2-nf4 --adapter ./answer-adapter

prints, for the first --show questions of the held-out split, the base model's answer and the
answer with the adapter, then the share of all held-out questions answered as `ANSWER: <one word>`
(the whole answer, ended by EOS within --max-new-tokens). The demo and tests/qconvert/test_finetune.py use it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FORMAT = re.compile(r"ANSWER: \S+")
EVAL_FILE = Path(__file__).with_name("answer_format_eval.jsonl")


def held_out_questions(path: Path = EVAL_FILE) -> list[str]:
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines() if line.strip()]


def answers(model_dir: str | Path, questions: list[str], adapter: str | Path | None = None,
            max_new_tokens: int = 10) -> list[tuple[str, bool]]:  # fmt: skip
    """(answer text, stopped at EOS) per question, greedy, as a chat user turn."""
    from qserve.generate import Generator, SamplingParams
    from qserve.loader import load_model
    from qserve.lora import load_lora
    from qserve.tokenizer import Tokenizer

    model = load_model(model_dir)
    if adapter is not None:
        load_lora(model, adapter)
    tok = Tokenizer.from_dir(model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    outs = Generator(model, tok).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return [(o.text.strip(), o.finish_reason == "stop") for o in outs]


def in_format(answer: tuple[str, bool]) -> bool:
    text, stopped = answer
    return stopped and FORMAT.fullmatch(text) is not None


def format_rate(results: list[tuple[str, bool]]) -> float:
    return sum(map(in_format, results)) / len(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--eval-file", type=Path, default=EVAL_FILE)
    p.add_argument("--show", type=int, default=5)
    args = p.parse_args()
    questions = held_out_questions(args.eval_file)
    before, after = answers(args.model, questions), answers(args.model, questions, args.adapter)
    for q, (b, _), (a, _) in list(zip(questions, before, after))[: args.show]:
        print(f"Q: {q}\n   base:         {b[:70]!r}\n   with adapter: {a!r}")
    print(f"answers in the format: base {format_rate(before):.0%}, with adapter {format_rate(after):.0%} "
          f"({len(questions)} held-out questions)")  # fmt: skip


if __name__ == "__main__":
    main()
