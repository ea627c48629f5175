"""`qconvert finetune`: QLoRA training of LoRA adapters on the frozen 4-bit base.

One optimizer step takes `batch_size * grad_accum * world` examples (length-grouped), split into
`grad_accum` micro-batches, each shared among the `world` processes. The loss is the token-mean
cross-entropy over the responses of the whole step (every micro-batch and rank), so the update does
not depend on how the step is split: batch 4 = batch 2 x 2 accumulation = 2 processes x batch 2,
exactly up to float summation order. Under torchrun each
rank holds the 4-bit base and its LoRA copy; after the micro-batches the LoRA gradients are
summed over ranks (all-reduce, gloo on CPU, nccl on GPU), every rank takes the same optimizer step,
and only rank 0 writes files. With `fsdp` each rank holds 1/world of the base, the LoRA weights,
their gradients and the optimizer state instead (qconvert/fsdp.py): FSDP sums the gradients as it
reduce-scatters them, every rank runs every micro-batch (its gathers are collectives), and the
adapter is gathered whole on every rank before rank 0 writes it.

Stopping: ctrl-C (SIGINT, or SIGTERM as torchrun sends) finishes the current step, writes a
checkpoint and returns `interrupted`; a second ctrl-C aborts at once. `resume=True` continues
from the newest checkpoint and ends with the adapter an uninterrupted run would have made.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch
import torch.distributed as tdist
from tqdm import tqdm

from qconvert import fsdp_checkpoint
from qconvert import train_checkpoint as ckpt
from qconvert.finetune_config import SCHEDULES, FinetuneConfig
from qconvert.fsdp import full_tensor
from qconvert.fsdp_load import load_sharded_model
from qconvert.memory_plan import Settings, needs_checkpointing
from qconvert.paged_adamw import PagedAdamW
from qconvert.sft_data import IGNORE, Dataset, collate, epoch_batches, load_sft_jsonl, split_eval
from qconvert.train_card import base_record, write_card
from qconvert.train_metrics import TENSORBOARD_DIR, TensorBoardLog, check_report_to, metric_records, write_reports
from qformats.checkpoint import load_config
from qformats.dtypes import parse_dtype
from qformats.errors import QError
from qformats.lineage import check_base_model_id
from qformats.manifest import sha256_file
from qformats.output_folder import check_out_apart_from_sources
from qformats.peft_adapter import save_adapter_files, write_adapter
from qkernels.cpu_allocator import caching_allocator
from qserve.device import device_memory, resolve_device
from qserve.lm_loss import count_trained
from qserve.loader import load_model, resolve_model_dir
from qserve.lora import ALL_LINEAR, apply_lora, lora_adapter, lora_config, lora_parameters
from qserve.nf4_linear import NF4Linear
from qserve.tokenizer import Tokenizer


@dataclass
class FinetuneResult:
    output: Path | None
    steps: int
    total_steps: int
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    seconds: float
    tokens_per_s: float
    interrupted: bool = False
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # collectives run here (GPU: nccl)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over ranks (t itself when alone)."""
        if self.world == 1:
            return t
        x = t.to(self.device)
        tdist.all_reduce(x)
        return x.to(t.device)


def _init_dist(device: str | torch.device | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    use_cuda = resolve_device(device or "auto").type == "cuda"
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class _StopRequest:
    """ctrl-C / SIGTERM ask for a checkpoint at the end of the current step; a second one aborts."""

    def __init__(self, echo):
        self.requested, self.echo, self._old = False, echo, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.echo("stopping: finishing this step and writing a checkpoint (ctrl-C again to abort at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def lr_factor(schedule: str, warmup: int, total: int):
    """transformers' schedules: linear warmup from 0, then constant / linear decay / cosine decay."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return f


class LRSchedule:
    """LambdaLR's contract for any optimizer with `param_groups`: lr = base lr x factor(steps taken)."""

    def __init__(self, optimizer, factor):
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.factor(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch, self.base_lrs = int(state["last_epoch"]), list(state["base_lrs"])
        self._apply()


def prepare_for_training(model, gradient_checkpointing: bool) -> None:
    """Training mode, checkpointing on or off."""
    model.gradient_checkpointing = gradient_checkpointing
    model.train()


# Float settings that must be finite numbers (NaN passes every `<` check and poisons every weight).
_FINITE = ("lr", "alpha", "dropout", "warmup_ratio", "max_grad_norm", "weight_decay", "eval_fraction", "epochs")


def _validate(cfg: FinetuneConfig) -> None:
    for name in _FINITE:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise QError(f"--{name.replace('_', '-')} must be a finite number, not {value!r}")
    for name in ("lr", "alpha", "max_grad_norm"):
        if getattr(cfg, name) <= 0:
            raise QError(f"--{name.replace('_', '-')} must be positive, not {getattr(cfg, name)}")
    if cfg.weight_decay < 0:
        raise QError(f"--weight-decay must be at least 0, not {cfg.weight_decay}")
    if not 0 <= cfg.eval_fraction < 1:
        raise QError(f"--eval-fraction must be in [0, 1), not {cfg.eval_fraction}")
    if isinstance(cfg.target_modules, str):
        try:
            re.compile(cfg.target_modules)
        except re.error as e:
            raise QError(f"--target-modules {cfg.target_modules!r} is not a valid regular expression ({e})") from None
    for name in ("rank", "batch_size", "grad_accum", "max_seq_len"):
        if getattr(cfg, name) < 1:
            raise QError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if cfg.steps is not None and cfg.steps < 1:
        raise QError(f"--steps must be at least 1, not {cfg.steps}")
    if cfg.steps is None and cfg.epochs <= 0:
        raise QError(f"--epochs must be positive, not {cfg.epochs}")
    if cfg.schedule not in SCHEDULES:
        raise QError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.warmup_ratio < 1:
        raise QError("--dropout and --warmup-ratio must be in [0, 1)")
    if cfg.eval_file and cfg.eval_fraction:
        raise QError("give either --eval-file or --eval-fraction, not both")
    check_base_model_id(cfg.base_model)
    check_report_to(cfg.report_to)
    _check_fsdp(cfg)


def _check_fsdp(cfg: FinetuneConfig) -> None:
    """--fsdp needs several processes, and the options it cannot honour are refused by name."""
    if cfg.fsdp_offload and not cfg.fsdp:
        raise QError("--fsdp-offload offloads FSDP's shards: pass --fsdp too")
    if not cfg.fsdp:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise QError("--fsdp shards the model over processes: run it under torchrun with 2 or more, e.g. "
                     "`torchrun --nproc-per-node 2 $(which qconvert) finetune ... --fsdp`")  # fmt: skip
    if cfg.fsdp_offload and cfg.optimizer_budget is not None:
        # The offloaded LoRA shards and gradients live in host memory, so the optimizer steps there too:
        # there is no device memory for its pages to budget.
        raise QError("--optimizer-budget: with --fsdp-offload the optimizer state stays in host memory "
                     "with the offloaded shards; leave --optimizer-budget out")  # fmt: skip


def finetune(cfg: FinetuneConfig, echo=lambda msg: None) -> FinetuneResult:
    """Run (or resume) a fine-tuning run; see the module doc. `echo` receives notes (rank 0 only)."""
    _validate(cfg)
    dist = _init_dist(cfg.device)
    run = _Run(cfg, dist, echo if dist.main else (lambda msg: None))
    try:
        with run.scope:  # what set-up entered for the run (the CPU allocator), left when it ends
            return run.run()
    finally:
        if dist.world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


class _Run:
    def __init__(self, cfg: FinetuneConfig, dist: _Dist, echo):
        self.cfg, self.dist, self.echo, self.notes = cfg, dist, echo, []
        self.output = Path(cfg.output)
        self.ckpt_root = Path(cfg.checkpoint_dir or f"{cfg.output}-checkpoints")
        self.scope = contextlib.ExitStack()

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.echo(f"note: {msg}")

    # --- set-up -------------------------------------------------------------------------------

    def _gradient_checkpointing(self, model_dir: Path) -> bool:
        """The setting, or with auto (None) the memory plan's answer: on only when the run would not fit without it."""
        cfg = self.cfg
        if cfg.gradient_checkpointing is not None:
            return cfg.gradient_checkpointing
        targets = cfg.target_modules if isinstance(cfg.target_modules, list) else ALL_LINEAR  # a regex: all, to be safe
        settings = Settings(seq_len=cfg.max_seq_len, batch_size=cfg.batch_size, rank=cfg.rank,
                            target_modules=tuple(t for t in targets if t in ALL_LINEAR) or ALL_LINEAR,
                            gpus=self.dist.world, fsdp=cfg.fsdp, fsdp_offload=cfg.fsdp_offload,
                            optimizer_bits=cfg.optimizer_bits, device=self.device.type,
                            dtype=str(self.dtype).removeprefix("torch."))  # fmt: skip
        available = device_memory(self.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's
        on = needs_checkpointing(load_config(model_dir), settings, available)
        if on:  # the slower choice is said; off is the plain case (the model card records both)
            self.echo(f"gradient checkpointing on (auto): without it the run is planned to exceed "
                      f"{available / 2**30:.1f} GiB")  # fmt: skip
        return on

    def _setup(self) -> None:
        cfg = self.cfg
        if self.output.exists() and not cfg.force:
            raise QError(f"{self.output} already exists: choose another output folder or pass --force to replace it")
        model_dir = resolve_model_dir(cfg.model)
        for out in (self.output, self.ckpt_root):  # both get replaced with --force: neither may hold a source
            check_out_apart_from_sources(out, [model_dir, cfg.data, cfg.eval_file])
        self.resume_from = ckpt.newest_intact_checkpoint(self.ckpt_root, self.note) if cfg.resume else None
        if cfg.resume and self.resume_from is None:
            raise QError(f"--resume: no checkpoint under {self.ckpt_root} to resume from")
        if not cfg.resume and ckpt.newest_checkpoint(self.ckpt_root) is not None:
            if not cfg.force:
                raise QError(f"{self.ckpt_root} holds checkpoints of an earlier run: pass --resume to continue it, "
                             "or --force to start over")  # fmt: skip
            if self.dist.main:
                shutil.rmtree(self.ckpt_root)
        self.device = resolve_device(cfg.device or "auto")
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # under torchrun each process takes its local GPU
            self.device = torch.device(f"cuda:{self.dist.local_rank}")
        elif cuda and self.dist.world > 1:
            raise QError(f"--device {self.device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device "
                         "cuda (or auto)")  # fmt: skip
        if cuda:
            torch.cuda.set_device(self.device)
            self.dist.device = self.device
        bf16 = cuda and torch.cuda.is_bf16_supported()
        self.dtype = parse_dtype(cfg.dtype) or (torch.bfloat16 if bf16 else torch.float32)
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout; LoRA init has its own generator (same on all ranks)

        self.base = base_record(cfg.model, model_dir, cfg.base_model)
        # The one adapter config of the run: LoRA is applied from it and it is what adapter_config.json says.
        self.adapter_config = lora_config(cfg.target_modules, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora,
                                          base_model=self.base["base_model"])  # fmt: skip
        progress = cfg.progress and self.dist.main
        if cfg.fsdp:  # each rank keeps its shards of the base and of the LoRA weights (qconvert/fsdp.py)
            self.model = load_sharded_model(model_dir, self.adapter_config, seed=cfg.seed, dtype=self.dtype,
                                            device=self.device, offload=cfg.fsdp_offload, progress=progress)  # fmt: skip
        else:
            self.model = load_model(model_dir, dtype=self.dtype, device=self.device, progress=progress)
            apply_lora(self.model, self.adapter_config, seed=cfg.seed)
        if not any(isinstance(m, NF4Linear) for m in self.model.modules()):
            self.note(f"{cfg.model} is not an NF4 checkpoint: training plain LoRA over its {self.dtype} weights "
                      "(quantize it first with `qconvert quantize` for QLoRA's memory savings)")  # fmt: skip
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_ids[0]
        load = {"fmt": cfg.format, "max_seq_len": cfg.max_seq_len, "train_on_prompt": cfg.train_on_prompt,
                "use_chat_template": cfg.chat_template}  # fmt: skip
        self.train = load_sft_jsonl(cfg.data, self.tokenizer, **load)
        self.eval: Dataset | None = None
        if cfg.eval_file:
            self.eval = load_sft_jsonl(cfg.eval_file, self.tokenizer, **load)
        elif cfg.eval_fraction:
            self.train, self.eval = split_eval(self.train, cfg.eval_fraction, cfg.seed)
        for n in self.train.notes:
            self.note(f"{cfg.data}: {n}")

        prepare_for_training(self.model, self._gradient_checkpointing(model_dir))
        if self.device.type == "cpu":  # memory that tracks what is live (qkernels/cpu_allocator.py)
            self.scope.enter_context(caching_allocator())
        self.params = lora_parameters(self.model)
        self.optimizer = PagedAdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    optim_bits=cfg.optimizer_bits, budget_bytes=cfg.optimizer_budget)  # fmt: skip
        self.micro_batch = cfg.batch_size * self.dist.world  # one micro-batch over all ranks
        self.step_batch = self.micro_batch * cfg.grad_accum
        self.lengths = [len(e.input_ids) for e in self.train.examples]
        self.per_epoch = len(epoch_batches(self.lengths, self.step_batch, cfg.seed, 0))
        self.total = cfg.steps or max(1, math.ceil(cfg.epochs * self.per_epoch))
        self.warmup = math.ceil(cfg.warmup_ratio * self.total)
        self.scheduler = LRSchedule(self.optimizer, lr_factor(cfg.schedule, self.warmup, self.total))
        self.fingerprint = {
            "data_sha256": sha256_file(cfg.data), "eval": (sha256_file(cfg.eval_file) if cfg.eval_file else cfg.eval_fraction),
            "model": str(cfg.model), "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": cfg.target_modules, "rslora": cfg.rslora, "lr": cfg.lr, "schedule": cfg.schedule,
            "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm, "weight_decay": cfg.weight_decay,
            "optimizer_bits": cfg.optimizer_bits, "seed": cfg.seed,
            # The global batch, not its split: another process count or accumulation continues the same run.
            "global_batch": cfg.batch_size * cfg.grad_accum * self.dist.world, "max_seq_len": cfg.max_seq_len,
            "train_on_prompt": cfg.train_on_prompt, "format": cfg.format, "total_steps": self.total,
            "dtype": str(self.dtype),
        }  # fmt: skip
        self.step, self.epoch, self.index, self.history = 0, 0, 0, []
        self.pressure = False  # set by an out-of-memory error: evict optimizer pages after every step
        self.eval_before = None
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _restore(self, folder: Path) -> None:
        state = ckpt.read_state(folder)
        ckpt.check_same_run(state.get("run", {}), self.fingerprint, folder)
        fsdp_checkpoint.load(folder, self.model, self.optimizer, state.get("sharded"))  # either layout, any ranks
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.index = state["step"], state["epoch"], state["index"]
        self.history, self.eval_before = state.get("history", []), state.get("eval_before")
        ckpt.load_rng(folder, self.dist.rank)  # a rank the writing run did not have keeps its seeded RNG
        written_by = state.get("world_size", state["run"].get("world_size", 1))
        if written_by != self.dist.world:
            self.note(f"{folder.name} was written by {written_by} process(es), this run has {self.dist.world}: the same "
                      "global batch, but the examples each rank takes and its dropout draws differ from that run's")  # fmt: skip
        self.echo(f"resuming from {folder} (step {self.step} of {self.total})")

    # --- the loop -----------------------------------------------------------------------------

    def _next_batch(self) -> list[int]:
        while True:
            if self._epoch_cache is None or self._epoch_cache[0] != self.epoch:
                self._epoch_cache = (self.epoch, epoch_batches(self.lengths, self.step_batch, self.cfg.seed, self.epoch))
            batches = self._epoch_cache[1]
            if self.index < len(batches):
                self.index += 1
                return batches[self.index - 1]
            self.epoch, self.index = self.epoch + 1, 0

    def _my_share(self, batch: list[int]) -> list[int]:
        per = -(-len(batch) // self.dist.world)
        return batch[self.dist.rank * per : (self.dist.rank + 1) * per]

    def _train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        step_batch = self._next_batch()
        micro = [step_batch[k : k + self.micro_batch] for k in range(0, len(step_batch), self.micro_batch)]
        # The step's token count over every rank's share: the same number on all ranks, no communication.
        n_tokens = sum(sum(1 for x in self.train.examples[i].labels[1:] if x != IGNORE) for b in micro for i in b)
        loss_sum = torch.zeros((), dtype=torch.float64)
        seen = 0
        for batch in micro:
            mine = self._my_share(batch)
            if not mine and not cfg.fsdp:
                continue
            # Under FSDP every rank runs every micro-batch: its gathers and gradient reductions are collectives.
            # A rank without examples in this one runs a batch without targets (no loss, zero gradients).
            tokens, labels = self._collate([self.train.examples[i] for i in mine])
            loss = self._forward_backward(tokens, labels, n_tokens)
            loss_sum += loss.detach().double().cpu()
            seen += sum(len(self.train.examples[i].input_ids) for i in mine)
        if cfg.fsdp:  # the gradients are reduce-scattered already (qconvert/fsdp.py): only the stats are summed
            stats = self.dist.sum_(torch.tensor([loss_sum.item(), float(seen)], dtype=torch.float64))
            loss_sum, seen = stats[0], int(stats[1].item())
        elif self.dist.world > 1:
            flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                              for p in self.params])  # fmt: skip
            stats = torch.tensor([loss_sum.item(), float(seen)], dtype=torch.float64)
            flat, stats = self.dist.sum_(flat), self.dist.sum_(stats)
            offset = 0
            for p in self.params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            loss_sum, seen = stats[0], int(stats[1].item())
        # On FSDP's sharded gradients torch computes the norm over every rank's shard: the global one.
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        for what, value in (("loss", float(loss_sum)), ("gradient norm", float(grad_norm))):
            if not math.isfinite(value):
                self._stop_non_finite(f"step {self.step + 1}: the {what} became {value}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if self.pressure:  # after an out-of-memory: optimizer pages go home between steps, activations get the room
            self.optimizer.evict()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - t0
        entry = {"step": self.step, "loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm),
                 "tokens": seen, "seconds": seconds, "trained_tokens": n_tokens, "tokens_per_s": seen / max(seconds, 1e-9),
                 "memory_bytes": _memory_bytes(self.device)}  # fmt: skip
        self.history.append(entry)
        return entry

    def _stop_non_finite(self, what: str) -> None:
        """Stop before a non-finite value reaches the weights; the checkpoints on disk stay as they are."""
        last = ckpt.newest_checkpoint(self.ckpt_root)
        kept = f"; the checkpoints so far are kept (newest: {last})" if last is not None else ""
        raise QError(f"{what}; stopped without writing {self.output}: start again with a lower --lr or --alpha"
                     f"{kept}")  # fmt: skip

    def _forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """One micro-batch. Out of memory: evict the optimizer's resident pages first and retry once,
        when no gradient has been accumulated yet in this step (a retry would count it twice)."""
        try:
            loss = self.model.loss(tokens, labels, n_tokens)
            loss.backward()
            return loss
        except torch.OutOfMemoryError:
            if self.cfg.fsdp:  # the other ranks are inside this step's collectives: a retry here would not meet them
                raise QError(f"out of memory on {self.device}: lower --batch-size or --max-seq-len, turn gradient "
                             "checkpointing on, or pass --fsdp-offload") from None  # fmt: skip
            if self.pressure or any(p.grad is not None for p in self.params):
                raise QError(f"out of memory on {self.device} even with the optimizer state evicted: lower "
                             "--batch-size or --max-seq-len, or turn gradient checkpointing on") from None  # fmt: skip
        freed = self.optimizer.evict()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.pressure = True
        self.note(f"out of memory: evicted {freed / 2**20:.0f} MiB of optimizer pages to host memory and retried; "
                  "they now stay there between steps")  # fmt: skip
        loss = self.model.loss(tokens, labels, n_tokens)
        loss.backward()
        return loss

    def _collate(self, examples: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) of `examples` on the device; none: one padding position pair without a target."""
        if not examples:
            return (torch.full((1, 2), self.pad_id, device=self.device),
                    torch.full((1, 2), IGNORE, device=self.device))  # fmt: skip
        return collate(examples, self.pad_id, self.device)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.eval is None or not len(self.eval):
            return None
        self.model.eval()
        order = sorted(range(len(self.eval)), key=lambda i: len(self.eval.examples[i].input_ids))
        mine = self._my_share(order)
        total = torch.zeros(2, dtype=torch.float64)
        bs = self.cfg.batch_size
        # Under FSDP every rank runs as many batches as the rank with the most examples (forwards are collectives).
        batches = -(-len(order) // self.dist.world) if self.cfg.fsdp else len(mine)
        for k in range(0, batches, bs):
            tokens, labels = self._collate([self.eval.examples[i] for i in mine[k : k + bs]])
            total[0] += float(self.model.loss(tokens, labels, 1))
            total[1] += count_trained(labels)
        total = self.dist.sum_(total)
        self.model.train()
        return float(total[0] / total[1])

    def save_checkpoint(self) -> Path:
        d, root = self.dist, self.ckpt_root
        tmp, final = ckpt.tmp_dir(root, self.step), ckpt.step_dir(root, self.step)
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
        ckpt.save_rng(tmp, d.rank)
        sharded = (
            fsdp_checkpoint.save(tmp, self.model, self.optimizer) if fsdp_checkpoint.is_sharded(self.model) else None
        )
        d.barrier()
        if d.main:
            if sharded is None:  # one process or DDP: the adapter and optimizer whole (a sharded run wrote dcp/)
                save_adapter_files(tmp, self._adapter())
                self.optimizer.save(tmp / "optimizer.safetensors")
            write_reports(tmp, metric_records(self.history, self.eval_before), [], plot=False)
            state = {"step": self.step, "epoch": self.epoch, "index": self.index, "total_steps": self.total,
                     "scheduler": self.scheduler.state_dict(), "history": self.history,
                     "eval_before": self.eval_before, "run": self.fingerprint, "world_size": d.world,
                     "sharded": sharded}  # fmt: skip
            ckpt.finish(tmp, final, state, self.cfg.keep_checkpoints)
        d.barrier()
        return final

    def _adapter(self):
        """The whole adapter (under FSDP gathered from the shards: a collective, every rank calls it)."""
        return lora_adapter(self.model, self.adapter_config)

    def _live_log(self, first_step: int) -> TensorBoardLog | None:
        """TensorBoard events while training, under the checkpoint folder; a resumed run hides what the
        interrupted one logged after its checkpoint (purge_step) and logs those steps again."""
        if "tensorboard" not in self.cfg.report_to or not self.dist.main:
            return None
        # Steps from the first one this run logs on are hidden from earlier runs (the checkpoint's are kept).
        log = TensorBoardLog(self.ckpt_root / TENSORBOARD_DIR, purge_step=first_step + 1 if first_step else 0)
        if first_step == 0 and self.eval_before is not None:
            log.add(metric_records([], self.eval_before)[0])
        return log

    def run(self) -> FinetuneResult:
        self._setup()
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif self.eval is not None:
            self.eval_before = self.evaluate()
        cfg, start = self.cfg, time.perf_counter()
        first_step = self.step
        bar = tqdm(total=self.total, initial=self.step, desc="finetune", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.main))  # fmt: skip
        interrupted, checkpoint = False, None
        live = self._live_log(first_step)
        try:
            with _StopRequest(self.echo) as stop:
                while self.step < self.total:
                    entry = self._train_step()
                    bar.update()
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}",
                                    tok_s=f"{entry['tokens_per_s']:.0f}", mem=_memory(self.device))  # fmt: skip
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total:
                        entry["eval_loss"] = self.evaluate()
                        if self.dist.main:  # tqdm's write prints even from a disabled bar
                            bar.write(f"step {self.step}: eval loss {entry['eval_loss']:.4f}")
                    if live is not None:
                        live.add(metric_records([entry], None)[0])
                    flag = self.dist.sum_(torch.tensor([float(stop.requested)]))
                    if flag.item() > 0 and self.step < self.total:
                        checkpoint, interrupted = self.save_checkpoint(), True
                        break
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                        checkpoint = self.save_checkpoint()
            bar.close()
            seconds = time.perf_counter() - start
            done = self.history[first_step:]
            tokens_per_s = sum(h["tokens"] for h in done) / max(seconds, 1e-9)
            result = FinetuneResult(None, self.step, self.total, self.history[-1]["loss"] if self.history else None,
                                    self.eval_before, None, seconds, tokens_per_s, interrupted, checkpoint,
                                    self.notes, self.history)  # fmt: skip
            if interrupted:
                return result
            adapter = self._adapter()  # whole on every rank, so all ranks reach the same verdict
            if not all(torch.isfinite(t).all() for pair in adapter.weights.values() for t in pair):
                self._stop_non_finite(f"after step {self.step}: the adapter weights became non-finite")
            result.eval_loss_after = self.evaluate()
            if live is not None and result.eval_loss_after is not None:
                live.add({"step": self.step, "eval_loss": result.eval_loss_after})
            if self.dist.main:
                records = metric_records(self.history, self.eval_before, result.eval_loss_after)

                def finalize(folder: Path) -> None:
                    write_reports(folder, records, cfg.report_to)
                    ran = replace(cfg, gradient_checkpointing=self.model.gradient_checkpointing)  # auto, resolved
                    write_card(folder, ran, result, self.train, self.eval, self.dist.world, self.base)

                write_adapter(self.output, adapter, force=cfg.force, finalize=finalize)
            self.dist.barrier()
            result.output = self.output
            return result
        finally:
            if live is not None:
                live.close()


def _memory_bytes(device: torch.device) -> int:
    """Peak device memory on a GPU, the process's resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    return f"{psutil.Process().memory_info().rss / 2**30:.2f}G"
