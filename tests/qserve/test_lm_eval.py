"""lm-evaluation-harness itself against the server (issue 16): `local-completions` over HTTP, `--batch_size 4`,
`num_concurrent` 2, on three small offline tasks of this file's own (multiple choice,
`loglikelihood_rolling` perplexity, `generate_until`), equal to lm-eval's `hf` backend (transformers +
bitsandbytes) on the same NF4 folder.
"""

from __future__ import annotations

import json

import torch
from test_server import LiveServer
from test_server_scoring import BASE, folders  # noqa: F401 (the module's NF4 folder fixture)
from tiny_models import CORPUS

from qserve.server import build_server

# Rolling windows of this many tokens in both backends: lm-eval's API models keep max_length - 1 for the
# generated token and roll windows of one less again, so local-completions gets MAX_LENGTH + 2.
MAX_LENGTH = 192
QUESTIONS = ["The capital of France is", "def main():", "Größe, café,", "The quick brown fox", "emoji",
             "numbers 1234", "return", "naïve and"]  # fmt: skip
TASKS = {
    "qtoy_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "choices",
                "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "qtoy_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                 {"metric": "bits_per_byte"}]},
    "qtoy_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                 "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}  # fmt: skip


def write_tasks(root) -> None:
    """Three tasks over local JSONL files (lm-eval reads them with `datasets`' json builder, offline)."""
    docs = {
        "qtoy_mc": [{"question": q, "choices": [" Paris", " 42", " the end", " café"], "answer": i % 4}
                    for i, q in enumerate(QUESTIONS)],
        "qtoy_ppl": [{"text": " ".join(CORPUS[i : i + 3 + 4 * i])} for i in range(4)],  # the last spans windows
        "qtoy_gen": [{"question": q, "answer": " Paris"} for q in QUESTIONS],
    }  # fmt: skip
    for name, task in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **task}  # fmt: skip
        (root / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML


def evaluate(model: str, model_args: str, tasks_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=4, log_samples=True,
                           task_manager=TaskManager(include_path=str(tasks_dir)), random_seed=0, numpy_random_seed=0,
                           torch_random_seed=0, fewshot_random_seed=0)  # fmt: skip


def test_lm_eval_local_completions_equals_its_hf_backend(folders, tmp_path):  # noqa: F811
    nf4, _ = folders
    write_tasks(tmp_path)
    app, engine = build_server(str(nf4), served_model_name=BASE, max_batch=4, max_model_len=256, dtype=torch.float32)
    server = LiveServer(app, engine)
    try:
        served = evaluate("local-completions", f"model={BASE},base_url={server.url}/v1/completions,tokenizer={nf4},"
                          f"tokenizer_backend=huggingface,num_concurrent=2,max_retries=1,max_length={MAX_LENGTH + 2}",
                          tmp_path)  # fmt: skip
    finally:
        server.close()
    peer = evaluate("hf", f"pretrained={nf4},dtype=float32,device=cpu,max_length={MAX_LENGTH}", tmp_path)
    for task, metrics in TASKS.items():
        for m in metrics["metric_list"]:
            got, want = served["results"][task][f"{m['metric']},none"], peer["results"][task][f"{m['metric']},none"]
            assert abs(got - want) <= 0.002 * abs(want) + 1e-12, (task, m["metric"], got, want)
        got_resps = [s["filtered_resps"] for s in served["samples"][task]]
        want_resps = [s["filtered_resps"] for s in peer["samples"][task]]
        assert len(got_resps) == len(want_resps) > 0
        for g, w in zip(got_resps, want_resps):  # every document, not just the averages
            if metrics["output_type"] == "generate_until":
                assert g == w
            else:
                flat = [(x[0] if isinstance(x, (list, tuple)) else x) for x in g]
                ref = [(x[0] if isinstance(x, (list, tuple)) else x) for x in w]
                assert all(abs(a - b) < 1e-3 for a, b in zip(flat, ref)), (task, flat, ref)
