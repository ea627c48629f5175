"""`FinetuneConfig`: every setting of a fine-tuning run, each written once.

A field's metadata (`flag(...)`) is its `qconvert finetune` flag: the help text, and where needed
the flag's name, type, choices and how the command-line text becomes the field's value;
`qconvert/cli_finetune.py` builds the options from it, so a new setting is one field here. Fields
without a flag are the command's arguments (MODEL DATA OUT) or options it shares with other
commands (`--dtype`, `--device`, `--force`). No torch here: `--help` reads this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMATS = ("messages", "alpaca", "prompt-completion", "text")  # the JSONL record shapes qconvert.sft_data reads
SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINTING = {"auto": None, "on": True, "off": False}  # --gradient-checkpointing


def flag(help: str, *names: str, type: Any = None, default: Any = None, choices: tuple[str, ...] | None = None,
         metavar: str | None = None, parse: Callable[[Any], Any] | None = None, show_default: bool = True,
         multiple: bool = False) -> dict:  # fmt: skip
    """Field metadata for the setting's flag. `names`: the flag's spelling(s) when not `--field-name` (a bool
    field whose default is True gets `--no-field-name`, or its one name, which turns it off); `parse`: the
    command-line value -> the field's value; `type`: when the default (None) does not say it, `"file"` a path;
    `default`: the flag's, when the field's is not what the command line says."""
    return {"help": help, "names": names, "type": type, "default": default, "choices": choices, "metavar": metavar, "parse": parse,
            "show_default": show_default, "multiple": multiple}  # fmt: skip


def _target_modules(text: str) -> list[str] | str | None:
    """`all-linear` -> None (every decoder linear); a regex stays a string; else a comma-separated list of names."""
    if text == "all-linear":
        return None
    if any(c in text for c in "*()[]|\\$^+?"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(text: str | None) -> int | None:
    from qformats.sharded_writer import parse_size

    return parse_size(text) if text else None


def _names(groups: tuple[str, ...]) -> list[str]:
    """Repeated or comma-separated names."""
    return [name.strip() for group in groups for name in group.split(",") if name.strip()]


@dataclass
class FinetuneConfig:
    """Every setting of a run; the defaults are the QLoRA paper's."""

    model: str
    data: str
    output: str
    eval_file: str | None = field(default=None, metadata=flag(
        "Held-out JSONL for eval loss (same format as DATA).", type="file"))  # fmt: skip
    eval_fraction: float = field(default=0.0, metadata=flag(
        "Hold out this fraction of DATA for eval loss instead.", show_default=False))  # fmt: skip
    format: str | None = field(default=None, metadata=flag(
        "Record shape of the JSONL  [default: detected from the first line]", choices=FORMATS))  # fmt: skip
    max_seq_len: int = field(default=1024, metadata=flag(
        "Longer examples are truncated (and dropped if no response token is left)."))  # fmt: skip
    train_on_prompt: bool = field(default=False, metadata=flag("Loss on every token, not only on the responses."))
    chat_template: bool = field(default=True, metadata=flag("Concatenate prompt and response as plain text."))
    rank: int = field(default=64, metadata=flag("LoRA rank r.", "--rank", "-r"))
    alpha: float = field(default=16.0, metadata=flag("LoRA alpha (scaling alpha / r)."))
    dropout: float = field(default=0.05, metadata=flag("Dropout on the LoRA input."))
    # None: every linear layer of the decoder
    target_modules: list[str] | str | None = field(default=None, metadata=flag(
        "Comma-separated module names (q_proj,v_proj) or a regex; all-linear = every decoder linear.",
        type=str, default="all-linear", parse=_target_modules))  # fmt: skip
    rslora: bool = field(default=False, metadata=flag("Rank-stabilized LoRA: scaling alpha / sqrt(r)."))
    lr: float = field(default=2e-4, metadata=flag("Peak learning rate."))
    schedule: str = field(default="constant", metadata=flag("Learning-rate schedule after warmup.", choices=SCHEDULES))
    warmup_ratio: float = field(default=0.03, metadata=flag("Fraction of steps of linear warmup."))
    max_grad_norm: float = field(default=0.3, metadata=flag("Gradient clipping."))
    weight_decay: float = field(default=0.0, metadata=flag("AdamW weight decay of the LoRA weights."))
    optimizer_bits: int = field(default=32, metadata=flag(
        "Paged AdamW state precision (8: bitsandbytes' blockwise 8-bit scheme).", default="32", choices=("32", "8"), parse=int))  # fmt: skip
    # bytes of optimizer state on the device; None: whatever is free
    optimizer_budget: int | None = field(default=None, metadata=flag(
        "Device memory for optimizer state pages, e.g. 2GB  [default: whatever is free]", type=str, metavar="SIZE",
        parse=_size))  # fmt: skip
    steps: int | None = field(default=None, metadata=flag(  # None: `epochs` passes over the data
        "Optimizer steps to run  [default: --epochs over DATA]", type=int))  # fmt: skip
    epochs: float = field(default=1.0, metadata=flag("Passes over DATA (when --steps is not given)."))
    batch_size: int = field(default=4, metadata=flag("Examples per micro-batch per process."))
    grad_accum: int = field(default=1, metadata=flag("Micro-batches per optimizer step."))
    seed: int = field(default=42, metadata=flag("Seed of the LoRA init, the data order, the held-out split and dropout."))
    # None (auto): on only when the memory plan says the run would not fit without it (qconvert/memory_plan.py)
    gradient_checkpointing: bool | None = field(default=None, metadata=flag(
        "Recompute each layer's activations in the backward pass: on, off, or auto (on only when `qconvert plan` "
        "says the run would not fit in the device's memory without it).", type=str, default="auto",
        choices=tuple(CHECKPOINTING), parse=lambda text: CHECKPOINTING[text]))  # fmt: skip
    fsdp: bool = field(default=False, metadata=flag(
        "Shard the 4-bit base, the LoRA weights, their gradients and the optimizer state over the processes "
        "(FSDP2; under torchrun with 2 or more) instead of a whole copy per process."))  # fmt: skip
    fsdp_offload: bool = field(default=False, metadata=flag(
        "With --fsdp: keep the shards and their gradients in CPU memory between uses (FSDP2's CPU offload)."))  # fmt: skip
    dtype: str | None = None  # None: bf16 on a GPU that has it, fp32 on CPU
    device: str | torch.device | None = None  # None or "auto": the local GPU if there is one, else CPU
    eval_every: int = field(default=0, metadata=flag("Steps between eval losses (0: end only)."))
    save_every: int = field(default=0, metadata=flag("Steps between checkpoints (0: only on ctrl-C)."))
    keep_checkpoints: int = field(default=2, metadata=flag("Newest checkpoints kept."))
    checkpoint_dir: str | None = field(default=None, metadata=flag("[default: OUT-checkpoints]", type=str))
    resume: bool = field(default=False, metadata=flag("Continue from the newest checkpoint of this run."))
    force: bool = False
    progress: bool = field(default=True, metadata=flag("No progress bar.", "--quiet"))
    base_model: str | None = field(default=None, metadata=flag(  # Hub repo id of the base where its lineage has none
        "Hub repo of the base, for adapter_config.json and the card when MODEL's lineage does not show it.",
        type=str, metavar="OWNER/NAME"))  # fmt: skip
    report_to: list[str] = field(default_factory=list, metadata=flag(  # metrics.jsonl is always written
        "Also write the metrics as TensorBoard event files (OUT/runs; live in the checkpoint folder). "
        "metrics.jsonl and the card's loss curve are always written.", type=str, metavar="tensorboard",
        parse=_names, multiple=True))  # fmt: skip
