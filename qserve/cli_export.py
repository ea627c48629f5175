"""`qserve export`: a merged HF checkpoint (base + adapter) that transformers and vLLM load, or NF4 again."""

from __future__ import annotations

import click

from qserve.device import device_option


@click.command("export")
@click.option("--model", required=True, help="Base model: NF4 (or fp16/bf16) folder or Hub id owner/name.")
@click.option("--adapter", default=None, help="PEFT LoRA adapter folder or Hub id to merge in (none: just dequantize).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (must be new or empty).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]), default=None,
              help="Dtype of the written weights (default: the base checkpoint's dtype).")  # fmt: skip
@click.option("--requantize", is_flag=True,
              help="Write NF4 + double-quantized scales again (a 4-bit model with the adapter baked in) and print "
                   "the perplexity change that re-quantizing causes.")  # fmt: skip
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --requantize: UTF-8 text file for the perplexity check (default: a built-in paragraph).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 2GB.")
@device_option
@click.option("--revision", default=None, help="Hub branch, tag or commit of --model.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--push-to-hub", "push_repo", metavar="REPO_ID", default=None,
              help="When done, verify OUT and push it to this Hub repo, with its model card.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
def export_cmd(model, adapter, out, dtype, requantize, eval_text, shard_size, device, revision, force, push_repo,
               private):  # fmt: skip
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
    if push_repo:  # in this process: the push sits next to the pull, in qformats
        from qformats.hub_push import push_after

        click.echo(push_after(out, push_repo, private=private, report=lambda line: click.echo(line, err=True)).url)
