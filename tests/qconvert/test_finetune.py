"""qconvert finetune: the step equals PEFT's, adapters load in PEFT, resume / ctrl-C / DDP are exact, bad input."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import copy_into_peft, save_tiny, save_tiny_tokenizer

from qconvert.cli import main as qconvert_main
from qconvert.data.check_answer_format import FORMAT, answers, format_rate, held_out_questions
from qconvert.finetune import FinetuneConfig, _Run, finetune
from qconvert.quantize import quantize_checkpoint
from qconvert.sft_data import IGNORE, collate, load_sft_jsonl
from qformats.errors import QError
from qserve.loader import load_model
from qserve.lora import ALL_LINEAR, apply_lora, load_lora, lora_config, lora_parameters
from qserve.model import CausalLM
from qserve.tokenizer import Tokenizer

BIN = Path(sys.executable).parent
DATA = Path(__file__).resolve().parents[2] / "qconvert" / "data"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "capital", "of", "France", "is", "Paris",
         "numbers", "main", "return"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny NF4 Llama with a ChatML byte-level tokenizer, its fp32 source, and a prompt/completion dataset."""
    d = tmp_path_factory.mktemp("ft")
    save_tiny("llama", d / "fp", vocab_size=320)
    save_tiny_tokenizer(d / "fp")
    quantize_checkpoint(d / "fp", d / "nf4", compute_dtype="float32", progress=False)
    g = torch.Generator().manual_seed(0)
    with open(d / "data.jsonl", "w") as f:
        for i in range(24):
            words = [WORDS[j] for j in torch.randint(len(WORDS), (2 + i % 5,), generator=g)]
            f.write(json.dumps({"prompt": " ".join(words) + "?", "completion": f"ANSWER: {words[-1]}"}) + "\n")
    return d


def cfg(tiny, out, **kw) -> FinetuneConfig:
    base = {"model": str(tiny / "nf4"), "data": str(tiny / "data.jsonl"), "output": str(out), "rank": 4,
            "alpha": 8.0, "lr": 3e-3, "batch_size": 4, "steps": 6, "progress": False}  # fmt: skip
    return FinetuneConfig(**(base | kw))


def adapter(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def assert_adapters_close(a, b, tol):
    a, b = adapter(a), adapter(b)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol * max(1.0, b[k].abs().max().item()), k


def peft_model(tiny, r=4, alpha=8):
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny / "nf4")
    return peft.get_peft_model(ref, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=ALL_LINEAR,
                                                    task_type="CAUSAL_LM"))  # fmt: skip


def batch(tiny, n=4):
    tok = Tokenizer.from_dir(tiny / "nf4")
    ds = load_sft_jsonl(tiny / "data.jsonl", tok)
    return collate(ds.examples[:n], pad_id=0)


def test_loss_and_grads_equal_peft(tiny):
    """Our response-only loss (fused lm_head + CE) and LoRA gradients equal PEFT's over transformers + bnb."""
    tokens, labels = batch(tiny)
    ours = load_model(tiny / "nf4")
    apply_lora(ours, lora_config(r=4, alpha=8), seed=1)
    with torch.no_grad():
        for p in lora_parameters(ours)[1::2]:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    ref = peft_model(tiny)
    copy_into_peft(ours, ref)
    ours.train()
    n = int((labels[:, 1:] != IGNORE).sum())
    loss = ours.loss(tokens, labels, n)
    ref_loss = ref(input_ids=tokens, labels=labels).loss
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    loss.backward()
    ref_loss.backward()
    ref_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                 for n, p in ref.named_parameters() if p.requires_grad}  # fmt: skip
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert (p.grad - ref_grads[name]).abs().max() < 1e-4 * max(1.0, ref_grads[name].abs().max().item()), name


def test_fused_loss_equals_plain_cross_entropy(tiny):
    tokens, labels = batch(tiny)
    model = load_model(tiny / "nf4")
    apply_lora(model, lora_config(r=4), seed=0)
    n = int((labels[:, 1:] != IGNORE).sum())
    fused = model.loss(tokens, labels, n, chunk=7)  # chunks that do not divide the rows
    fused.backward()
    g_fused = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    logits = model(tokens)[:, :-1].float()
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    plain.backward()
    assert abs(fused.item() - plain.item()) < 1e-5
    for a, p in zip(g_fused, lora_parameters(model)):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_one_step_equals_peft_step_and_adapter_loads_in_peft(tiny, tmp_path):
    """One full step (clip 0.3, AdamW) from the same init on the same batch gives PEFT's adapter; PEFT loads ours."""
    data = tmp_path / "four.jsonl"
    data.write_text("".join((tiny / "data.jsonl").read_text().splitlines(True)[:4]))
    run = cfg(tiny, tmp_path / "out", data=str(data), steps=1, warmup_ratio=0.0, dropout=0.0, seed=5)
    result = finetune(run)
    ours = load_model(tiny / "nf4")
    apply_lora(ours, lora_config(r=4, alpha=8), seed=5)  # the init finetune made (same seed, same generator)
    ref = peft_model(tiny)
    copy_into_peft(ours, ref)
    tok = Tokenizer.from_dir(tiny / "nf4")
    tokens, labels = collate(load_sft_jsonl(data, tok).examples, pad_id=0)
    ref.train()
    loss = ref(input_ids=tokens, labels=labels).loss
    assert abs(result.history[0]["loss"] - loss.item()) < 1e-4
    loss.backward()
    params = [p for p in ref.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0).step()
    ref.save_pretrained(tmp_path / "peft")
    assert_adapters_close(tmp_path / "out", tmp_path / "peft", 1e-4)
    assert_peft_gives_our_logits(tiny, tmp_path / "out", tokens)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "final train loss" in card and "r" in json.loads((tmp_path / "out" / "adapter_config.json").read_text())


def assert_peft_gives_our_logits(tiny, adapter_dir, tokens):
    """Our saved adapter, loaded by PEFT over transformers + bitsandbytes, gives our logits (1e-3 relative)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny / "nf4")
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    mine = load_model(tiny / "nf4")
    load_lora(mine, adapter_dir)
    with torch.no_grad():
        a, b = mine.eval()(tokens), theirs(input_ids=tokens).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-3


def test_grad_accum_and_checkpointing_do_not_change_the_result(tiny, tmp_path):
    a = finetune(cfg(tiny, tmp_path / "a", dropout=0.0, steps=3, gradient_checkpointing=True))
    b = finetune(cfg(tiny, tmp_path / "b", dropout=0.0, steps=3, batch_size=2, grad_accum=2,
                     gradient_checkpointing=False))  # fmt: skip
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-5)
    assert_adapters_close(tmp_path / "a", tmp_path / "b", 1e-5)


def test_gradient_checkpointing_auto_asks_the_memory_plan(tiny, tmp_path, monkeypatch):
    """auto (the default): off when the run fits without it, on when the plan says it would not; the card says which."""
    import qconvert.finetune as ft

    finetune(cfg(tiny, tmp_path / "roomy", steps=1))
    monkeypatch.setattr(ft, "device_memory", lambda device, processes=1: 1 << 20)  # 1 MiB: nothing fits
    finetune(cfg(tiny, tmp_path / "tight", steps=1))
    assert "| gradient checkpointing | False |" in (tmp_path / "roomy" / "README.md").read_text()
    assert "| gradient checkpointing | True |" in (tmp_path / "tight" / "README.md").read_text()


def run_cli(args, **kw):
    return subprocess.Popen([str(BIN / "qconvert"), "finetune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip


def cli_args(tiny, out, steps, *extra, held_out=True):
    return [str(tiny / "nf4"), str(tiny / "data.jsonl"), str(out), "--rank", "4", "--alpha", "8", "--lr", "3e-3",
            "--steps", str(steps), "--quiet", *(["--eval-fraction", "0.25"] if held_out else []), *extra]  # fmt: skip


def wait_for(path_glob_dir, pattern, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(Path(path_glob_dir).glob(pattern)) if Path(path_glob_dir).is_dir() else []:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before {pattern}: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_resume_after_kill_equals_uninterrupted(tiny, tmp_path):
    steps = 40
    whole = finetune(cfg(tiny, tmp_path / "whole", steps=steps, eval_fraction=0.25))
    proc = run_cli(cli_args(tiny, tmp_path / "run", steps, "--save-every", "4"))
    wait_for(tmp_path / "run-checkpoints", "step-0000008", proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert not (tmp_path / "run").exists()
    resumed = finetune(cfg(tiny, tmp_path / "run", steps=steps, eval_fraction=0.25, save_every=4, resume=True))
    assert resumed.steps == steps
    assert_adapters_close(tmp_path / "run", tmp_path / "whole", 1e-5)
    assert resumed.history[-1]["loss"] == pytest.approx(whole.history[-1]["loss"], rel=1e-5)
    assert len(list((tmp_path / "run-checkpoints").glob("step-*"))) <= 2  # --keep-checkpoints 2


def test_ctrl_c_writes_a_checkpoint_and_resumes(tiny, tmp_path):
    steps = 40
    proc = run_cli(cli_args(tiny, tmp_path / "run", steps, "--save-every", "3"))
    wait_for(tmp_path / "run-checkpoints", "step-0000003", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    ckpts = sorted((tmp_path / "run-checkpoints").glob("step-*"))
    stopped_at = int(ckpts[-1].name.split("-")[1])
    assert 3 <= stopped_at < steps and not (tmp_path / "run").exists()
    r = CliRunner().invoke(qconvert_main, ["finetune", *cli_args(tiny, tmp_path / "run", steps, "--resume")])
    assert r.exit_code == 0, r.output
    finetune(cfg(tiny, tmp_path / "whole", steps=steps, eval_fraction=0.25))
    assert_adapters_close(tmp_path / "run", tmp_path / "whole", 1e-5)


def test_two_process_gloo_ddp_equals_single_process(tiny, tmp_path):
    single = finetune(cfg(tiny, tmp_path / "single", steps=4, batch_size=4, dropout=0.0))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(BIN / "qconvert"), "finetune", *cli_args(tiny, tmp_path / "ddp", 4, "--batch-size", "2",
                                                         "--dropout", "0", held_out=False)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes and reports
    assert_adapters_close(tmp_path / "ddp", tmp_path / "single", 1e-5)
    state = json.loads((tmp_path / "ddp" / "qconvert.json").read_text())["training"]
    assert state["batch"] == "2 per process x 1 accumulation x 2 processes"
    assert state["final train loss"] == pytest.approx(sum(h["loss"] for h in single.history) / 4, rel=1e-5)


def cli(*args):
    r = CliRunner().invoke(qconvert_main, ["finetune", *args])
    assert r.exit_code != 1 or (len(r.output.strip().splitlines()) == 1 and r.output.startswith("error: ")), r.output
    return r


def test_bad_input_is_one_line(tiny, tmp_path):
    base = [str(tiny / "nf4")]
    (tmp_path / "exists").mkdir()
    r = cli(*base, str(tiny / "data.jsonl"), str(tmp_path / "exists"), "--steps", "1", "--quiet")
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    (tmp_path / "empty.jsonl").write_text("\n")
    r = cli(*base, str(tmp_path / "empty.jsonl"), str(tmp_path / "o1"), "--quiet")
    assert r.exit_code == 1 and "no examples" in r.output
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    r = cli(*base, str(tmp_path / "bad.jsonl"), str(tmp_path / "o2"), "--quiet")
    assert r.exit_code == 1 and "bad.jsonl:2: not valid JSON" in r.output
    r = cli(*base, str(tiny / "data.jsonl"), str(tmp_path / "o3"), "--max-seq-len", "8", "--quiet")
    assert r.exit_code == 1 and "all 24 examples are longer than --max-seq-len 8" in r.output
    r = cli(*base, str(tiny / "data.jsonl"), str(tmp_path / "o4"), "--resume", "--quiet")
    assert r.exit_code == 1 and "no checkpoint" in r.output


@pytest.mark.parametrize(("option", "value"), [("--lr", "nan"), ("--alpha", "nan"), ("--alpha", "inf"),
                                               ("--weight-decay", "nan"), ("--max-grad-norm", "inf"),
                                               ("--eval-fraction", "nan"), ("--epochs", "inf")])  # fmt: skip
def test_non_finite_hyperparameters_are_refused(tiny, tmp_path, option, value):
    """--lr nan used to train and write 420 NaN tensors with exit 0."""
    r = cli(str(tiny / "nf4"), str(tiny / "data.jsonl"), str(tmp_path / "out"), option, value, "--steps", "2", "--quiet")
    assert r.exit_code == 1 and f"error: {option} must be a finite number, not {value}" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_bad_target_modules_regex_is_one_line(tiny, tmp_path):
    r = cli(str(tiny / "nf4"), str(tiny / "data.jsonl"), str(tmp_path / "out"), "--target-modules", "(", "--quiet")
    assert r.exit_code == 1 and "--target-modules '(' is not a valid regular expression" in r.output


def test_non_finite_loss_stops_keeping_the_checkpoints(tiny, tmp_path):
    """lr 1e30 makes the loss NaN at step 3: stop there, write no adapter, keep step 1 and 2's checkpoints."""
    with pytest.raises(QError, match=r"^step 3: the loss became nan; stopped without writing .*out: start again "
                                     r"with a lower --lr or --alpha; the checkpoints so far are kept \(newest: "
                                     r".*out-checkpoints/step-0000002\)$"):  # fmt: skip
        finetune(cfg(tiny, tmp_path / "out", lr=1e30, steps=4, save_every=1))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    kept = sorted(p.name for p in (tmp_path / "out-checkpoints").iterdir())
    assert kept == ["step-0000001", "step-0000002"]
    for folder in kept:
        assert all(t.isfinite().all() for t in adapter(tmp_path / "out-checkpoints" / folder).values())
    # A gradient that overflows at the first step: no checkpoint yet, and the CLI exits 1 with one line.
    r = cli(str(tiny / "nf4"), str(tiny / "data.jsonl"), str(tmp_path / "o2"), "--alpha", "1e38", "--rank", "4",
            "--steps", "2", "--quiet")  # fmt: skip
    assert r.exit_code == 1 and "step 1: the gradient norm became inf" in r.output and not (tmp_path / "o2").exists()


def test_resume_falls_back_past_a_truncated_checkpoint(tiny, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    finetune(cfg(tiny, whole, steps=5, dropout=0.0))
    original = _Run._train_step

    def crash_at_step_4(self):  # as a crash would: checkpoints of steps 1-3 are on disk
        if self.step == 3:
            raise QError("simulated crash")
        return original(self)

    monkeypatch.setattr(_Run, "_train_step", crash_at_step_4)
    run = cfg(tiny, tmp_path / "run", steps=5, dropout=0.0, save_every=1, keep_checkpoints=3)
    with pytest.raises(QError, match="simulated crash"):
        finetune(run)
    monkeypatch.setattr(_Run, "_train_step", original)
    weights = tmp_path / "run-checkpoints" / "step-0000003" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the disk filled up while it was written
    notes = []
    resumed = finetune(dataclasses.replace(run, resume=True), echo=notes.append)
    assert notes[0].startswith("note: checkpoint step-0000003 is damaged (") and notes[0].endswith(
        "(truncated shard)); falling back to an older one"), notes  # fmt: skip
    assert notes[1] == f"resuming from {tmp_path / 'run-checkpoints' / 'step-0000002'} (step 2 of 5)", notes
    assert resumed.steps == 5
    assert_adapters_close(tmp_path / "run", whole, 1e-5)


def test_finetune_force_never_deletes_a_source_inside_out(tiny, tmp_path):
    """OUT (replaced with --force) holding the data file: refused before anything is deleted or trained."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tiny / "data.jsonl", out / "data.jsonl")
    r = cli(str(tiny / "nf4"), str(out / "data.jsonl"), str(out), "--steps", "1", "--force", "--quiet")
    assert r.exit_code == 1 and "holds the source file" in r.output and (out / "data.jsonl").is_file()
    # The checkpoint folder is replaced too: it may not hold the model.
    shutil.copytree(tiny / "nf4", tmp_path / "ck" / "nf4")
    r = cli(str(tmp_path / "ck" / "nf4"), str(tiny / "data.jsonl"), str(tmp_path / "o2"), "--checkpoint-dir",
            str(tmp_path / "ck"), "--steps", "1", "--force", "--quiet")  # fmt: skip
    assert r.exit_code == 1 and "holds the source folder" in r.output and (tmp_path / "ck" / "nf4").is_dir()


def test_float_base_trains_plain_lora_with_a_note(tiny, tmp_path):
    notes = []
    result = finetune(cfg(tiny, tmp_path / "out", model=str(tiny / "fp"), steps=2), echo=notes.append)
    assert any("not an NF4 checkpoint" in n and "plain LoRA" in n for n in notes)
    assert result.output.is_dir() and len(adapter(result.output)) == 2 * 7 * 2


def test_shipped_dataset_teaches_the_answer_format(smollm2_fp16_dir, tmp_path):
    """The demo's claim, measured on SmolLM2 NF4 with the held-out split: a short CPU run (8 steps of 8
    examples) cuts the held-out eval loss by >= 30% and makes >= 80% of answers `ANSWER: <word>` (< 10% before)."""
    nf4 = tmp_path / "nf4"
    quantize_checkpoint(smollm2_fp16_dir, nf4, progress=False)
    questions = held_out_questions()
    assert len(questions) >= 40
    before = answers(nf4, questions, max_new_tokens=8)
    assert format_rate(before) < 0.10, before[:5]
    result = finetune(FinetuneConfig(model=str(nf4), data=str(DATA / "answer_format_train.jsonl"),
                                     eval_file=str(DATA / "answer_format_eval.jsonl"), output=str(tmp_path / "adapter"),
                                     rank=16, alpha=16, lr=2e-3, warmup_ratio=0.0, steps=8, batch_size=8,
                                     max_seq_len=128, gradient_checkpointing=False, progress=False))  # fmt: skip
    assert result.eval_loss_after <= 0.7 * result.eval_loss_before, (result.eval_loss_before, result.eval_loss_after)
    after = answers(nf4, questions, tmp_path / "adapter", max_new_tokens=8)
    assert format_rate(after) >= 0.80, [a for a in after if not FORMAT.fullmatch(a[0])][:5]


def test_out_of_memory_evicts_optimizer_pages_and_retries(tiny, tmp_path, monkeypatch):
    """A memory spike (OutOfMemoryError in a forward pass) evicts the paged optimizer state first and retries."""
    normal = finetune(cfg(tiny, tmp_path / "normal", optimizer_budget=1 << 16, dropout=0.0))
    calls, real = [], CausalLM.loss

    def spiky(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated spike")
        return real(*args, **kw)

    monkeypatch.setattr(CausalLM, "loss", spiky)
    notes = []
    spiked = finetune(cfg(tiny, tmp_path / "spiked", optimizer_budget=1 << 16, dropout=0.0), echo=notes.append)
    assert any("evicted" in n and "MiB of optimizer pages" in n for n in notes), notes
    assert spiked.steps == normal.steps
    assert_adapters_close(tmp_path / "spiked", tmp_path / "normal", 0.0)
