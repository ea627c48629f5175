"""Generation against transformers' generate, batching, streaming, stops, sampling, the tokenizer, the CLI."""

import pytest
import torch
from click.testing import CliRunner
from tiny_models import FAMILIES, save_tiny, save_tiny_tokenizer
from transformers import AutoTokenizer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from qformats.errors import QError
from qserve.cli import main as qserve_main
from qserve.generate import Generator, SamplingParams, StopStrings, filter_logits, sample
from qserve.loader import load_model
from qserve.tokenizer import StreamDecoder, Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France? 🙂"}]  # fmt: skip
TEXT = "Hello café 🙂 world, 日本語 test 1234 naïve"


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(request.param, out)
    return hf, load_model(out)


@pytest.fixture(scope="module", params=["bytelevel", "sp"])
def chat_model(request, tmp_path_factory):
    """A tiny Llama with a real (small, trained) tokenizer and chat template."""
    out = tmp_path_factory.mktemp(f"chat-{request.param}")
    save_tiny("smollm2", out, vocab_size=320, eos_token_id=2, bos_token_id=1)
    save_tiny_tokenizer(out, request.param)
    return out


def test_greedy_32_tokens_equal_transformers(tiny):
    hf, ours = tiny
    hf.generation_config.eos_token_id = None  # 32 tokens, whatever they are
    gen = Generator(ours)
    params = SamplingParams(max_new_tokens=32, stop_token_ids=())
    for n in (1, 7, 19):
        prompt = torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, pad_token_id=0)[0, n:]
        assert gen.generate([prompt], params)[0].token_ids == ref.tolist()


def test_batch_equals_one_by_one(tiny):
    _, ours = tiny
    gen = Generator(ours)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 21, 9, 14)]
    batch = gen.generate(prompts, params)
    for prompt, got in zip(prompts, batch):
        assert got.token_ids == gen.generate([prompt], params)[0].token_ids


def test_stream_equals_generate_and_decode(chat_model):
    tok = Tokenizer.from_dir(chat_model)
    gen = Generator(load_model(chat_model), tok)
    for params in (SamplingParams(max_new_tokens=40, stop_token_ids=()),
                   SamplingParams(max_new_tokens=40, temperature=1.5, seed=3, stop_token_ids=())):  # fmt: skip
        deltas = list(gen.stream("The capital of France", params))
        done = gen.generate(["The capital of France"], params)[0]
        assert "".join(deltas) == done.text
        # A random model emits invalid byte sequences now and then; decode() of a whole run of byte
        # tokens may replace them differently from a window. Valid text must come out identical.
        full = tok.decode(done.token_ids)
        assert done.text == full or "\ufffd" in full
        assert len(done.token_ids) == 40 and done.finish_reason == "length"


def test_stream_decoder_never_splits_utf8(chat_model):
    tok = Tokenizer.from_dir(chat_model)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.encode()) // 3  # multi-byte characters span several tokens
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids) == TEXT.strip()
    assert not any("\ufffd" in d for d in deltas)


def test_stop_token_and_stop_string(chat_model):
    tok = Tokenizer.from_dir(chat_model)
    gen = Generator(load_model(chat_model), tok)
    free = gen.generate(["Hello"], SamplingParams(max_new_tokens=30, stop_token_ids=()))[0]
    # Stop on a token that the free run produced: the output ends with it, and stops there.
    k = 5
    stop_id = free.token_ids[k]
    got = gen.generate(["Hello"], SamplingParams(max_new_tokens=30, stop_token_ids=[stop_id]))[0]
    first = free.token_ids.index(stop_id)
    assert got.token_ids == free.token_ids[: first + 1] and got.finish_reason == "stop"
    # A stop string taken from the middle of a free text: the text ends right before it, streamed or not.
    # The window must hold no U+FFFD: the random model emits stray bytes, which decode to U+FFFD only
    # when the text is flushed, never as streamed text a stop string is matched against. Its output for
    # one prompt can be all stray bytes (and it varies from run to run), so a few prompts are tried.
    for prompt in ("Hello", "The", "a b c", "Tell me", "1 2 3", "Why"):
        text = gen.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=()))[0].text
        starts = [*range(len(text) // 2, len(text) - 2), *range(len(text) // 2)]
        start = next((i for i in starts if "\ufffd" not in text[i : i + 3] and text.index(text[i : i + 3]) == i), None)
        if start is not None:
            break
    assert start is not None, "no prompt gave a text with three clean characters"
    stop = text[start : start + 3]
    params = SamplingParams(max_new_tokens=30, stop=[stop], stop_token_ids=())
    got = gen.generate([prompt], params)[0]
    assert got.text == text[: text.index(stop)] and got.finish_reason == "stop"
    assert "".join(gen.stream(prompt, params)) == got.text


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["</end>", "STOP"])
    shown = [s.feed(x) for x in ["abc<", "/e", "nx", " S", "TO", "P tail"]]
    assert shown == ["abc", "", "</enx", " ", "", ""] and s.stopped and s.text == "abc</enx "


def test_eos_from_configs_stops(chat_model):
    tok = Tokenizer.from_dir(chat_model)
    assert tok.eos_token_ids == [2]
    gen = Generator(load_model(chat_model), tok)
    params = SamplingParams(max_new_tokens=60, stop_token_ids=())
    free = gen.generate(["Hello"], params)[0]
    if 2 in free.token_ids:  # only meaningful when the random model emits EOS; the stop-token test covers the rest
        got = gen.generate(["Hello"], SamplingParams(max_new_tokens=60))[0]
        assert got.token_ids[-1] == 2 and got.finish_reason == "stop"


def test_sampling_filters_equal_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 320, generator=g) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.9), (0.8, 50, 0.5)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.equal(filter_logits(logits, temperature, top_k, top_p), ref)


def test_sampling_seed_and_greedy_limits():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=5)
    a = sample(logits, p, torch.Generator().manual_seed(5))
    b = sample(logits, p, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert torch.equal(sample(logits, top1, torch.Generator()), logits.argmax(-1))
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6)
    assert torch.equal(sample(logits, tiny_p, torch.Generator()), logits.argmax(-1))


def test_tokenizer_and_chat_template_equal_transformers(chat_model):
    ours, hf = Tokenizer.from_dir(chat_model), AutoTokenizer.from_pretrained(chat_model)
    assert ours.encode(TEXT) == hf(TEXT)["input_ids"]
    assert ours.decode(ours.encode(TEXT)) == hf.decode(hf(TEXT)["input_ids"], skip_special_tokens=True)
    msgs = MESSAGES if "im_start" in (ours.chat_template or "") else MESSAGES[1:]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ref = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode_chat(msgs) == list(ref)


def test_prompt_longer_than_context(chat_model):
    gen = Generator(load_model(chat_model), Tokenizer.from_dir(chat_model))
    with pytest.raises(QError, match=r"the prompt is 200 tokens, but the maximum context length is 128 tokens"):
        gen.generate([[5] * 200])
    # A prompt that fits but leaves less room than max_new_tokens: it stops at the context.
    got = gen.generate([[5] * 120], SamplingParams(max_new_tokens=50, stop_token_ids=()))[0]
    assert len(got.token_ids) == 8 and got.finish_reason == "length"


def test_prompt_checks_are_the_engines(chat_model):
    """Generator and engine refuse the same prompts with the same words (qserve.generate.check_prompt)."""
    gen = Generator(load_model(chat_model), Tokenizer.from_dir(chat_model))
    with pytest.raises(QError, match=r"prompt token id 100000 is outside the vocabulary \(0\.\.319\)"):
        gen.generate([[5, 100000]])
    with pytest.raises(QError, match="the prompt is empty"):
        gen.generate([[]])


def test_cli_generate_streams_the_generator_text(chat_model):
    tok = Tokenizer.from_dir(chat_model)
    want = Generator(load_model(chat_model), tok).generate(
        [tok.encode_chat([{"role": "user", "content": "Hi"}])], SamplingParams(max_new_tokens=12))[0].text
    r = CliRunner().invoke(qserve_main, ["generate", "--model", str(chat_model), "--prompt", "Hi", "--chat",
                                         "--max-tokens", "12"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"


def test_cli_generate_bad_input_one_line(chat_model, tmp_path):
    runner = CliRunner()
    long_prompt = " ".join(["word"] * 300)
    cases = [
        (["--model", str(chat_model), "--prompt", long_prompt], "but the maximum context length is 128 tokens"),
        (["--model", str(tmp_path / "nope"), "--prompt", "x"], "no such folder"),
    ]
    for args, message in cases:
        r = runner.invoke(qserve_main, ["generate", *args])
        assert r.exit_code == 1
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


@pytest.fixture(scope="module")
def smollm2(smollm2_fp16_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_fp16_dir, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(smollm2_fp16_dir), Generator(load_model(smollm2_fp16_dir),
                                                                           Tokenizer.from_dir(smollm2_fp16_dir))


def test_smollm2_chat_greedy_equals_transformers(smollm2):
    hf, hf_tok, gen = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = gen.tokenizer.encode_chat(messages)
    assert prompt == list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))  # fmt: skip
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)[0, len(prompt):].tolist()
    got = gen.generate([prompt], SamplingParams(max_new_tokens=32))[0]
    assert got.token_ids == ref
    assert "Paris" in got.text and got.text == hf_tok.decode(ref, skip_special_tokens=True)
    assert "".join(gen.stream(prompt, SamplingParams(max_new_tokens=32))) == got.text


def test_smollm2_batch_of_prompts_equals_one_by_one(smollm2):
    _, _, gen = smollm2
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "2 + 2 ="]
    params = SamplingParams(max_new_tokens=24)
    batch = gen.generate(prompts, params)
    assert [c.text for c in batch] == [gen.generate([p], params)[0].text for p in prompts]


@pytest.mark.parametrize("weights", ["fp32", "nf4"])
def test_compiled_decode_equals_eager(tmp_path, weights):
    """`--compile` (torch.compile of the one decode step) gives the eager tokens, in Generator and in the
    engine; on NF4 the eager step runs the decode stack (AVX-512) or its prepared kernel arguments, the
    traced one the modules' forwards."""
    from qconvert.quantize import quantize_checkpoint
    from qserve.engine import Engine

    save_tiny("smollm2", tmp_path / "fp32", seed=3, intermediate_size=128)  # rows of whole blocks: the stack runs
    if weights == "nf4":
        quantize_checkpoint(tmp_path / "fp32", tmp_path / "nf4", progress=False)
    eager, compiled = load_model(tmp_path / weights), load_model(tmp_path / weights)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 11)]
    want = [c.token_ids for c in Generator(eager).generate(prompts, params)]
    if weights == "nf4":
        assert (eager.model._fused[2] is not None) == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    assert [c.token_ids for c in Generator(compiled, compile=True).generate(prompts, params)] == want
    engine = Engine(compiled, None, max_batch=2, compile=True).start()
    try:
        assert [engine.generate(p, params).token_ids for p in prompts] == want
    finally:
        engine.stop()
