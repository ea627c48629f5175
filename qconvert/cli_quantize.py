"""`qconvert quantize SRC OUT`: a thin shell over `qconvert.quantize.quantize_checkpoint`."""

from __future__ import annotations

import click

from qserve.cli_group import skip_finalization
from qserve.cli_options import (
    device_option,
    dtype_option,
    force_option,
    push_if_asked,
    push_to_hub_option,
    revision_option,
)


@click.command("quantize")
@click.argument("src", is_eager=True, callback=lambda ctx, param, value: _start_source_hashes(ctx, value))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--blocksize", default=64, show_default=True, type=int,
              help="Elements per absmax block (a power of two, 32..4096).")  # fmt: skip
@click.option("--no-double-quant", is_flag=True, help="Store fp32 absmax instead of 8-bit double-quantized scales.")
@dtype_option(auto="the source dtype", name="--compute-dtype", what="bnb_4bit_compute_dtype recorded for loaders")
@click.option("--skip-modules", multiple=True, metavar="NAMES",
              help="Modules to keep unquantized (comma-separated or repeated), matched like transformers' "
                   "llm_int8_skip_modules: a prefix, a regex or a suffix, e.g. mlp.down_proj.")  # fmt: skip
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@device_option
@force_option()
@revision_option("SRC")
@click.option("--allow-nonfinite", is_flag=True,
              help="Quantize source tensors holding NaN or inf (refused by default, naming the tensor).")  # fmt: skip
@click.option("--base-model", metavar="OWNER/NAME",
              help="Hub repo SRC was made from, recorded for model cards when SRC's lineage does not show it.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@push_to_hub_option
def quantize(src, out, blocksize, no_double_quant, compute_dtype, skip_modules, shard_size, device, force,
             revision, allow_nonfinite, base_model, quiet, push_to_hub, push_private):  # fmt: skip
    """Quantize the FP16/BF16 checkpoint SRC to NF4 with double-quantized scales, into folder OUT.

    SRC is a local Hugging Face folder (safetensors, single or sharded) or a Hub repo id such as
    owner/name (downloaded into the local cache; HF_HUB_OFFLINE=1 uses the cache only). Linear
    weights inside the decoder layers become NF4; embeddings, lm_head, norms and biases keep the
    source dtype. The result loads as-is in transformers + bitsandbytes, vLLM and qserve. Tensors
    are read, quantized and written in a pipeline holding about two tensors, so memory stays far
    below one shard. A tensor with NaN or inf values is refused unless --allow-nonfinite. OUT appears only
    when complete; tokenizer files, generation_config.json and the chat template are copied, and
    qconvert.json records the settings and the sha256 of every file.

    \b
    Example:
      qconvert quantize ./smollm2-fp16 ./smollm2-nf4
      qconvert quantize owner/model ./model-nf4 --revision main --shard-size 2GB
    """
    import os

    # Before torch loads OpenMP: between the offset's short parallel means an OpenMP worker would
    # spin on the cores the reader and writer need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from qconvert.quantize import quantize_checkpoint

    names = [m.strip() for group in skip_modules for m in group.split(",") if m.strip()]
    summary = quantize_checkpoint(src, out, blocksize=blocksize, double_quant=not no_double_quant,
                                  compute_dtype=compute_dtype, skip_modules=names, shard_size=shard_size,
                                  device=device, force=force, revision=revision, progress=not quiet,
                                  allow_nonfinite=allow_nonfinite, base_model=base_model,
                                  source_hashes=click.get_current_context().meta.get(_HASHES))  # fmt: skip
    if not quiet:
        click.echo(summary.describe())
    push_if_asked(out, push_to_hub, push_private)
    if not push_to_hub:  # OUT is committed, every file closed, the pipeline's threads joined
        skip_finalization()


_HASHES = "qconvert.quantize.source_hashes"


def _start_source_hashes(ctx: click.Context, src: str) -> str:
    """SRC's callback: for a local checkpoint folder, start its files' sha256 in a background thread
    (ctx.meta[_HASHES]). Eager, so it runs before --device's callback imports torch, which takes one
    core for a second or more; nothing for a Hub id or a folder the quantizer will refuse (it says why)."""
    from pathlib import Path

    from qformats.checkpoint_files import list_shards
    from qformats.errors import QError
    from qformats.manifest import BackgroundSha256

    folder = Path(src)
    if folder.is_dir() and not ctx.resilient_parsing:
        try:
            shards, index = list_shards(folder)
        except QError:
            return src
        ctx.meta[_HASHES] = BackgroundSha256([*shards, folder / "config.json", *([index] if index else [])])
    return src
