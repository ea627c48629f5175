"""`qconvert finetune MODEL DATA OUT`: a thin shell over `qconvert.finetune.finetune`.

Its flags are `FinetuneConfig`'s fields (`qconvert/finetune_config.py`, each field's metadata is its
flag), plus the options every command shares (`qserve/cli_options.py`).
"""

from __future__ import annotations

import dataclasses
import sys

import click

from qconvert.finetune_config import FinetuneConfig
from qserve.cli_options import device_option, dtype_option, force_option, push_if_asked, push_to_hub_option

# Settings that are options every command shares, not flags of their own.
SHARED = {"dtype": dtype_option(auto="bfloat16 on GPUs that have it, float32 on CPU"), "device": device_option,
          "force": force_option("OUT and earlier checkpoints if they exist")}  # fmt: skip
SETTINGS = [f for f in dataclasses.fields(FinetuneConfig) if f.metadata or f.name in SHARED]


def _option(f: dataclasses.Field):
    """The click option of a setting, from its metadata (see `qconvert.finetune_config.flag`)."""
    if f.name in SHARED:
        return SHARED[f.name]
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):  # a flag: on when the field's default is False, off when it is True
        names = meta["names"] or ((f"--no-{f.name}" if default else f"--{f.name}").replace("_", "-"),)
        return click.option(*names, f.name, is_flag=True, help=meta["help"])
    names = meta["names"] or (f"--{f.name.replace('_', '-')}",)
    default = meta["default"] if meta["default"] is not None else default
    kind = meta["type"]
    if meta["choices"]:
        kind = click.Choice(meta["choices"])
    elif kind == "file":
        kind = click.Path(dir_okay=False)
    return click.option(*names, f.name, type=kind, default=default, show_default=meta["show_default"] and default is not None,
                        metavar=meta["metavar"], multiple=meta["multiple"], help=meta["help"])  # fmt: skip


def _setting(f: dataclasses.Field, value):
    """The field's value from what the command line gave."""
    meta = f.metadata
    if f.name in SHARED:
        return value
    if isinstance(f.default, bool) and f.default:
        return not value
    return meta["parse"](value) if meta["parse"] else value


def settings_options(fn):
    """Every setting's option, in the order of FinetuneConfig's fields."""
    for f in reversed(SETTINGS):
        fn = _option(f)(fn)
    return fn


@click.command("finetune")
@click.argument("model")
@click.argument("data", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@settings_options
@push_to_hub_option
def finetune_cmd(model, data, out, push_to_hub, push_private, **settings):
    """Train a LoRA adapter for MODEL on DATA (JSONL), written as a PEFT adapter folder OUT.

    MODEL is an NF4 checkpoint folder (from `qconvert quantize`), a bitsandbytes-4bit Hub repo, or
    a float checkpoint (then plain LoRA, without QLoRA's memory savings). The 4-bit base stays
    frozen and packed; only the adapters train, with paged AdamW. DATA lines are chat
    {"messages": [...]}, alpaca {"instruction", "input", "output"}, {"prompt", "completion"} or
    {"text"}; the model's chat template formats them and the loss covers the responses only.

    Defaults are the QLoRA paper's: all linear layers, r=64, alpha=16, dropout 0.05, lr 2e-4
    constant with 3% warmup, max grad norm 0.3, paged AdamW 32-bit, bf16 compute on GPUs.
    OUT (adapter_config.json, adapter_model.safetensors, README.md, qconvert.json) loads in PEFT
    over transformers + bitsandbytes, in vLLM and in qserve. ctrl-C writes a checkpoint; run the
    same command with --resume to continue. Several processes (data parallel, gloo on CPU, nccl
    on GPU): torchrun --nproc-per-node N $(which qconvert) finetune ...; add --fsdp to shard
    the base over them instead of a whole copy each.

    \b
    Example:
      qconvert finetune ./smollm2-nf4 train.jsonl ./my-adapter --eval-file eval.jsonl --epochs 3
      qconvert finetune ./smollm2-nf4 train.jsonl ./my-adapter --resume
    """
    from qconvert.finetune import finetune  # torch: imported when the command runs, not for --help

    cfg = FinetuneConfig(model=model, data=data, output=out,
                         **{f.name: _setting(f, settings[f.name]) for f in SETTINGS})  # fmt: skip
    result = finetune(cfg, echo=lambda msg: click.echo(msg, err=True))
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.interrupted:
        click.echo(f"interrupted at step {result.steps} of {result.total_steps}: checkpoint {result.checkpoint}; "
                   "run the same command with --resume to continue", err=True)  # fmt: skip
        sys.exit(130)
    losses = f"train loss {result.train_loss:.4f}"
    if result.eval_loss_after is not None:
        before = f"{result.eval_loss_before:.4f} -> " if result.eval_loss_before is not None else ""
        losses += f", eval loss {before}{result.eval_loss_after:.4f}"
    click.echo(f"wrote {result.output} ({result.steps} steps, {losses}, {result.seconds:.0f} s, "
               f"{result.tokens_per_s:.0f} tokens/s)")  # fmt: skip
    push_if_asked(out, push_to_hub, push_private)
