"""`qconvert finetune MODEL DATA OUT`: a thin shell over `qconvert.finetune.finetune`."""

from __future__ import annotations

import sys

import click

from qserve.cli_options import device_option, dtype_option, force_option, push_if_asked, push_to_hub_option

FORMATS = ("messages", "alpaca", "prompt-completion", "text")  # mirrors qconvert.sft_data.FORMATS (no torch import)


@click.command("finetune")
@click.argument("model")
@click.argument("data", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--eval-file", type=click.Path(dir_okay=False), help="Held-out JSONL for eval loss (same format as DATA).")
@click.option("--eval-fraction", type=float, default=0.0, help="Hold out this fraction of DATA for eval loss instead.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Record shape of the JSONL  [default: detected from the first line]")  # fmt: skip
@click.option("--max-seq-len", type=int, default=1024, show_default=True,
              help="Longer examples are truncated (and dropped if no response token is left).")  # fmt: skip
@click.option("--train-on-prompt", is_flag=True, help="Loss on every token, not only on the responses.")
@click.option("--no-chat-template", is_flag=True, help="Concatenate prompt and response as plain text.")
@click.option("--rank", "-r", type=int, default=64, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scaling alpha / r).")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="Dropout on the LoRA input.")
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Comma-separated module names (q_proj,v_proj) or a regex; all-linear = every decoder linear.")  # fmt: skip
@click.option("--rslora", is_flag=True, help="Rank-stabilized LoRA: scaling alpha / sqrt(r).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--schedule", type=click.Choice(("constant", "linear", "cosine")), default="constant",
              show_default=True, help="Learning-rate schedule after warmup.")  # fmt: skip
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True, help="Fraction of steps of linear warmup.")
@click.option("--max-grad-norm", type=float, default=0.3, show_default=True, help="Gradient clipping.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--optimizer-bits", type=click.Choice(("32", "8")), default="32", show_default=True,
              help="Paged AdamW state precision (8: bitsandbytes' blockwise 8-bit scheme).")  # fmt: skip
@click.option("--optimizer-budget", default=None, metavar="SIZE",
              help="Device memory for optimizer state pages, e.g. 2GB  [default: whatever is free]")  # fmt: skip
@click.option("--steps", type=int, default=None, help="Optimizer steps to run  [default: --epochs over DATA]")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Examples per micro-batch per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--no-gradient-checkpointing", is_flag=True, help="Keep activations instead of recomputing them.")
@dtype_option(auto="bfloat16 on GPUs that have it, float32 on CPU")
@device_option
@click.option("--eval-every", type=int, default=0, show_default=True, help="Steps between eval losses (0: end only).")
@click.option("--save-every", type=int, default=0, show_default=True,
              help="Steps between checkpoints (0: only on ctrl-C).")  # fmt: skip
@click.option("--keep-checkpoints", type=int, default=2, show_default=True, help="Newest checkpoints kept.")
@click.option("--checkpoint-dir", default=None, help="[default: OUT-checkpoints]")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint of this run.")
@force_option("OUT and earlier checkpoints if they exist")
@click.option("--base-model", metavar="OWNER/NAME",
              help="Hub repo of the base, for adapter_config.json and the card when MODEL's lineage does not show it.")  # fmt: skip
@click.option("--report-to", multiple=True, metavar="tensorboard",
              help="Also write the metrics as TensorBoard event files (OUT/runs; live in the checkpoint folder). "
                   "metrics.jsonl and the card's loss curve are always written.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
@push_to_hub_option
def finetune_cmd(model, data, out, eval_file, eval_fraction, fmt, max_seq_len, train_on_prompt, no_chat_template,
                 rank, alpha, dropout, target_modules, rslora, lr, schedule, warmup_ratio, max_grad_norm,
                 weight_decay, optimizer_bits, optimizer_budget, steps, epochs, batch_size, grad_accum, seed,
                 no_gradient_checkpointing, dtype, device, eval_every, save_every, keep_checkpoints, checkpoint_dir,
                 resume, force, base_model, report_to, quiet, push_to_hub, push_private):  # fmt: skip
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
    on GPU): torchrun --nproc-per-node N $(which qconvert) finetune ...

    \b
    Example:
      qconvert finetune ./smollm2-nf4 train.jsonl ./my-adapter --eval-file eval.jsonl --epochs 3
      qconvert finetune ./smollm2-nf4 train.jsonl ./my-adapter --resume
    """
    from qconvert.finetune import FinetuneConfig, finetune
    from qformats.checkpoint import parse_size

    targets = None if target_modules == "all-linear" else target_modules
    if targets and not any(c in targets for c in "*()[]|\\$^+?"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cfg = FinetuneConfig(
        model=model, data=data, output=out, eval_file=eval_file, eval_fraction=eval_fraction, format=fmt,
        max_seq_len=max_seq_len, train_on_prompt=train_on_prompt, chat_template=not no_chat_template, rank=rank,
        alpha=alpha, dropout=dropout, target_modules=targets, rslora=rslora, lr=lr, schedule=schedule,
        warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
        optimizer_bits=int(optimizer_bits), optimizer_budget=parse_size(optimizer_budget) if optimizer_budget else None,
        steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
        gradient_checkpointing=not no_gradient_checkpointing, dtype=dtype, device=device, eval_every=eval_every,
        save_every=save_every, keep_checkpoints=keep_checkpoints, checkpoint_dir=checkpoint_dir, resume=resume,
        force=force, progress=not quiet, base_model=base_model,
        report_to=[name.strip() for group in report_to for name in group.split(",") if name.strip()],
    )  # fmt: skip
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
