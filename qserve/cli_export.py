"""`qserve export`: a merged HF checkpoint (base + adapter) that transformers and vLLM load, or NF4 again."""

from __future__ import annotations

import click

from qserve.cli_options import (
    device_option,
    dtype_option,
    force_option,
    push_if_asked,
    push_to_hub_option,
    revision_option,
)


@click.command("export")
@click.option("--model", required=True, help="Base model: NF4 (or fp16/bf16) folder or Hub id owner/name.")
@click.option("--adapter", default=None, help="PEFT LoRA adapter folder or Hub id to merge in (none: just dequantize).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (must be new or empty).")
@dtype_option(auto="the base checkpoint's dtype", what="Dtype of the written weights")
@click.option("--requantize", is_flag=True,
              help="Write NF4 + double-quantized scales again (a 4-bit model with the adapter baked in) and print "
                   "the perplexity change that re-quantizing causes.")  # fmt: skip
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --requantize: UTF-8 text file for the perplexity check (default: a built-in paragraph).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 2GB.")
@device_option
@revision_option()
@force_option()
@push_to_hub_option
def export_cmd(model, adapter, out, dtype, requantize, eval_text, shard_size, device, revision, force, push_to_hub,
               push_private):  # fmt: skip
    """Dequantize the base, merge the adapter in fp32 and save an HF checkpoint.

    The result loads in transformers (AutoModelForCausalLM.from_pretrained) and vLLM as a plain
    fp16/bf16 model; with --requantize it is an NF4 checkpoint again.

    \b
    Examples:
      qserve export --model ./smollm2-nf4 --adapter ./answer-adapter --out ./merged
      qserve export --model ./smollm2-nf4 --adapter ./answer-adapter --out ./merged-nf4 --requantize
    """
    # torch and the runtime: imported when the command runs, not for --help
    from qserve.export import export_merged

    summary = export_merged(model, out, adapter, dtype=dtype, requantize=requantize, eval_text=eval_text,
                            shard_size=shard_size, force=force, revision=revision, device=device)  # fmt: skip
    click.echo(summary.describe())
    push_if_asked(out, push_to_hub, push_private)
