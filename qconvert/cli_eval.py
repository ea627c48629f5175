"""`qconvert eval`: perplexity and tokens/s of a model on a text file."""

from __future__ import annotations

import json

import click

from qserve.cli_options import device_option, dtype_option, revision_option


@click.command("eval")
@click.option("--model", "model_path", required=True, help="Model folder (fp16/bf16 or NF4) or Hub id owner/name.")
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False),
              help="UTF-8 text file to score.")
@click.option("--context", default=None, type=click.IntRange(min=2),
              help="Tokens per window [default: min(1024, the model's context)].")
@click.option("--stride", default=None, type=click.IntRange(min=1),
              help="Tokens between window starts; each window scores only tokens no earlier window scored "
                   "[default: context / 2].")
@dtype_option(auto="float32 on CPU, the checkpoint's dtype on CUDA")
@device_option
@revision_option()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def eval_cmd(model_path, text_file, context, stride, dtype, device, revision, as_json):
    """Perplexity of a model on a text file (sliding window), and tokens/s.

    \b
    Examples:
      qconvert eval --model ./smollm2-fp16 --text tests/data/prose.txt
      qconvert eval --model ./smollm2-nf4 --text notes.txt --context 512 --stride 256 --json
    """
    from qconvert.eval import evaluate_file  # torch: imported when the command runs, not for --help

    result = evaluate_file(model_path, text_file, context=context, stride=stride,
                           dtype=dtype, device=device, revision=revision,
                           progress=not as_json)  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
                   f"({result.windows} window{'s' if result.windows != 1 else ''} of {result.context}, stride {result.stride}); "
                   f"{result.tokens_per_s:.0f} tokens/s")  # fmt: skip
