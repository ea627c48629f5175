"""qserve.engine and qserve.lora.batched: continuous batching with a different PEFT adapter per row.

The helpers at the top build a tiny random Llama with a byte-level tokenizer and ChatML template
(so text, chat and stop strings work) and PEFT adapters made by `peft` itself; test_server.py
and test_export.py use them too.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import peft
import pytest
import torch
from tiny_models import save_tiny, save_tiny_tokenizer, tiny_hf_model

from qconvert.quantize import quantize_checkpoint
from qformats.errors import QError
from qformats.peft_adapter import read_adapter
from qserve.engine import ContextTooLong, Engine, QueueFull, UnknownAdapter
from qserve.generate import Generator, SamplingParams
from qserve.loader import load_model
from qserve.lora import MultiLoRA
from qserve.tokenizer import Tokenizer as QTokenizer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_served_model(out: Path, seed: int = 0, nf4: bool = False):
    """A tiny SmolLM2-shaped model folder with a byte-level BPE tokenizer and ChatML template (eos <|im_end|> = 2).

    Returns (transformers fp32 model, folder). With nf4=True the folder holds the NF4 checkpoint made
    by `qconvert quantize` and `out/fp32` the float one.
    """
    src = out / "fp32" if nf4 else out
    hf = save_tiny("smollm2", src, seed=seed, vocab_size=320, max_position_embeddings=256)
    save_tiny_tokenizer(src)
    if nf4:
        quantize_checkpoint(src, out, progress=False)
    return hf, out


def make_peft_adapter(hf_model, out: Path, seed: int, r: int = 4, alpha: float = 8, targets=ALL_LINEAR,
                      rslora: bool = False):  # fmt: skip
    """A PEFT LoRA adapter on `hf_model` with random (non-zero) A and B, saved by peft to `out`."""
    import copy

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                          use_rslora=rslora, task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(hf_model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    hf, folder = tiny_served_model(root / "base")
    adapters = {
        "a1": make_peft_adapter(hf, root / "a1", seed=1),
        "a2": make_peft_adapter(hf, root / "a2", seed=2, r=8, alpha=16, targets=["q_proj", "v_proj"], rslora=True),
        "a3": make_peft_adapter(hf, root / "a3", seed=3, r=2, alpha=4, targets=["down_proj", "o_proj"]),
    }
    return hf, folder, adapters, root


def test_batched_lora_rows_equal_peft(served):
    """One forward, four rows, four different adapters (or none): each row equals PEFT's logits."""
    hf, folder, adapters, root = served
    model = load_model(folder)
    lora = MultiLoRA(model)
    ids = {name: lora.add(read_adapter(root / name)) for name in adapters}
    tokens = torch.randint(3, 320, (4, 12))
    rows = [0, ids["a1"], ids["a2"], ids["a3"]]
    with torch.no_grad(), lora.use(rows):
        ours = model(tokens)
        want = [hf(tokens[:1]).logits[0]] + [adapters[n](input_ids=tokens[i + 1 : i + 2]).logits[0]
                                              for i, n in enumerate(["a1", "a2", "a3"])]  # fmt: skip
    for i in range(4):
        torch.testing.assert_close(ours[i], want[i], rtol=1e-4, atol=1e-4)
    with torch.no_grad(), lora.use([ids["a2"]] * 4):  # one adapter for the whole batch: the fast path
        torch.testing.assert_close(model(tokens)[2], want[2], rtol=1e-4, atol=1e-4)


def test_adapter_not_fitting_the_model_is_named(served, tmp_path):
    _, folder, _, _ = served
    bad = tmp_path / "bad"
    make_peft_adapter(tiny_hf_model("smollm2", hidden_size=32, vocab_size=320), bad, seed=0)
    with pytest.raises(QError, match="do not fit"):
        MultiLoRA(load_model(folder)).add(read_adapter(bad))
    with pytest.raises(QError, match="adapter_config.json"):
        read_adapter(tmp_path)


@pytest.fixture()
def engine(served):
    _, folder, adapters, root = served
    eng = Engine(load_model(folder), QTokenizer.from_dir(folder), max_batch=4, max_queue=8, max_model_len=128)
    for name in adapters:
        eng.load_adapter(name, str(root / name))
    eng.start()
    yield eng
    eng.stop()


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def alone(folder, root, prompt, params, adapter=None):
    """The reference: the request served by a fresh engine with nothing else in it."""
    eng = Engine(load_model(folder), QTokenizer.from_dir(folder), max_batch=1, max_model_len=128)
    if adapter:
        eng.load_adapter(adapter, str(root / adapter))
    eng.start()
    try:
        return eng.generate(prompt, params, adapter)
    finally:
        eng.stop()


def test_greedy_equals_generator(served, engine):
    _, folder, _, _ = served
    tok = QTokenizer.from_dir(folder)
    params = SamplingParams(max_new_tokens=20)
    prompt = tok.encode("Hello there, how are you?")
    ours = engine.generate(prompt, params)
    ref = Generator(load_model(folder), tok).generate([prompt], params)[0]
    assert ours.token_ids == ref.token_ids and ours.text == ref.text and ours.finish_reason == ref.finish_reason


def test_concurrent_mixed_adapters_equal_alone(served, engine):
    """12 requests over 3 adapters and the base, joining while others decode: each equals itself served alone."""
    _, folder, _, root = served
    names = [None, "a1", "a2", "a3"]
    jobs = [(list(torch.randint(3, 320, (3 + 5 * i % 17,)).tolist()), names[i % 4], 6 + (i * 7) % 15)
            for i in range(12)]  # fmt: skip
    results = [None] * len(jobs)

    def run(i, prompt, adapter, n):
        time.sleep(0.01 * i)  # arrivals spread over the first steps
        results[i] = engine.generate(prompt, SamplingParams(max_new_tokens=n), adapter)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.metrics.steps < sum(n for *_, n in jobs)  # rows really shared steps
    for (prompt, adapter, n), got in zip(jobs, results):
        ref = alone(folder, root, prompt, SamplingParams(max_new_tokens=n), adapter)
        assert got.token_ids == ref.token_ids, adapter


def test_seeded_sampling_is_independent_of_the_batch(served, engine):
    _, folder, _, root = served
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    prompt = [5, 6, 7, 8]
    others = [threading.Thread(target=engine.generate, args=([9, 9, 9], SamplingParams(max_new_tokens=20), "a1"))
              for _ in range(2)]  # fmt: skip
    for t in others:
        t.start()
    got = engine.generate(prompt, params, "a2")
    for t in others:
        t.join()
    assert got.token_ids == alone(folder, root, prompt, params, "a2").token_ids


def test_cancel_frees_the_slot_and_queue_bounds(served, engine):
    params = SamplingParams(max_new_tokens=100, stop_token_ids=())
    reqs = [engine.submit([1, 2, 3], params) for _ in range(4)]  # 4 slots ...
    wait_for(lambda: len(engine.running) == 4)
    reqs += [engine.submit([1, 2, 3], params) for _ in range(8)]  # ... + 8 queued
    with pytest.raises(QueueFull):
        engine.submit([1, 2, 3], params)
    for r in reqs:
        engine.cancel(r)
    wait_for(lambda: not engine.running and not engine.waiting)
    assert engine.generate([1, 2], SamplingParams(max_new_tokens=3)).finish_reason in ("stop", "length")


def test_bad_requests_raise(engine):
    with pytest.raises(ContextTooLong, match="maximum context length is 128"):
        engine.submit(list(range(128)), SamplingParams(max_new_tokens=1))
    with pytest.raises(ContextTooLong, match="lower max_tokens to 28"):
        engine.submit(list(range(100)), SamplingParams(max_new_tokens=40))
    with pytest.raises(UnknownAdapter):
        engine.submit([1], SamplingParams(), adapter="nope")
    with pytest.raises(QError, match="temperature"):
        engine.submit([1], SamplingParams(max_new_tokens=4, temperature=-1))


def test_a_failing_request_does_not_take_down_the_others(served, engine, monkeypatch):
    _, folder, _, root = served
    # 1) its client raises when given an event; 2) the model raises on a forward that contains token 250.
    broken = engine.submit([3, 4], SamplingParams(max_new_tokens=30), emit=lambda e: 1 / 0)
    real_forward = engine.model.model.forward

    def forward(tokens, *args, **kwargs):
        if (tokens == 250).any():
            raise RuntimeError("poisoned row")
        return real_forward(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.model.model, "forward", forward)
    results = {}

    def run(key, prompt):
        try:
            results[key] = engine.generate(prompt, SamplingParams(max_new_tokens=15, stop_token_ids=()), "a1")
        except QError as e:
            results[key] = e

    threads = [threading.Thread(target=run, args=(k, p)) for k, p in (("ok", [10, 11, 12]), ("bad", [250, 1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["bad"], QError) and "poisoned row" in str(results["bad"])
    assert results["ok"].token_ids == alone(folder, root, [10, 11, 12], SamplingParams(max_new_tokens=15,
                                                                                        stop_token_ids=()), "a1").token_ids  # fmt: skip
    assert broken.done and engine.metrics.finished_by_reason["error"] >= 2


def test_unload_waits_for_running_requests(engine):
    req_done = []
    t = threading.Thread(target=lambda: req_done.append(
        engine.generate([1, 2, 3], SamplingParams(max_new_tokens=40, stop_token_ids=()), "a3")))  # fmt: skip
    t.start()
    time.sleep(0.05)
    engine.unload_adapter("a3")
    with pytest.raises(UnknownAdapter):
        engine.submit([1], SamplingParams(), adapter="a3")
    t.join()
    assert len(req_done[0].token_ids) == 40
    wait_for(lambda: len(engine.lora.adapters) == 2)
