"""`qserve generate`: stream a completion (or a chat answer) of one prompt to stdout."""

from __future__ import annotations

import sys
import time

import click

from qserve.cli_options import compile_option, device_option, dtype_option, revision_option


@click.command("generate")
@click.option("--model", "model_path", required=True, help="Model folder (fp16/bf16 or NF4) or Hub id owner/name.")
@click.option("--prompt", required=True, help="The prompt text (with --chat: the user's message).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template as a user message.")
@click.option("--system", default=None, help="With --chat: a system message before the prompt.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most new tokens to generate (fewer if the context runs out).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature; 0 is greedy (deterministic).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling: keep the smallest set of tokens whose probability reaches P.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Keep only the K most likely tokens (0: all).")
@click.option("--seed", default=None, type=int, help="Random seed for sampling (reproducible answers).")
@click.option("--stop", multiple=True, help="Stop string (repeatable): the answer ends before it.")
@dtype_option(auto="float32 on CPU, the checkpoint's dtype on CUDA")
@device_option
@revision_option()
@compile_option
@click.option("--stats", is_flag=True, help="Print token counts and tokens/s to stderr at the end.")
def generate_cmd(model_path, prompt, chat, system, max_tokens, temperature, top_p, top_k, seed, stop, dtype, device,
                 revision, compile_, stats):  # fmt: skip
    """Generate text with a model and stream it to stdout.

    \b
    Examples:
      qserve generate --model ./smollm2-nf4 --prompt "The capital of France is"
      qserve generate --model ./smollm2-nf4 --chat --prompt "What is the capital of France?"
      qserve generate --model ./nf4 --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1
    """
    # torch and the runtime: imported when the command runs, not for --help
    from qformats.checkpoint import load_config
    from qserve.generate import Generator, SamplingParams, check_prompt
    from qserve.loader import load_model, resolve_model_dir
    from qserve.model_config import ModelArgs
    from qserve.tokenizer import Tokenizer

    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=stop)  # fmt: skip
    params.check()  # a bad seed is one line before any loading, not a traceback after it
    model_dir = resolve_model_dir(model_path, revision)
    tokenizer = Tokenizer.from_dir(model_dir)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.encode_chat(messages)
    else:
        prompt_ids = tokenizer.encode(prompt)
    # Refuse a prompt that cannot fit before spending time on loading the weights.
    args = ModelArgs.from_config(load_config(model_dir))
    check_prompt(prompt_ids, args.vocab_size, args.max_position_embeddings)
    model = load_model(model_dir, dtype=dtype, device=device, progress=True)
    generator = Generator(model, tokenizer, compile=compile_)
    start = time.perf_counter()
    for delta in generator.stream(prompt_ids, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    done = generator.last_completion
    if stats and done is not None:
        seconds = time.perf_counter() - start
        n = len(done.token_ids)
        click.echo(f"[{done.prompt_tokens} prompt tokens, {n} generated in {seconds:.2f}s: {n / seconds:.1f} tokens/s, "
                   f"finish: {done.finish_reason}]", err=True)  # fmt: skip
