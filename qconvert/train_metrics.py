"""Training metrics people can watch and compare: JSONL always, TensorBoard on request, a loss curve for the card.

One record per optimizer step: step, loss, learning rate, grad norm, tokens/s, memory, and eval loss
at the steps where it was measured (the eval loss before training is a record of its own at step 0).
The records are derived from the run's history, which checkpoints carry, so a resumed run writes each
step once. Files in OUT (checkpoints keep `metrics.jsonl` too):
- `metrics.jsonl`: the records, one JSON object a line;
- `runs/`: TensorBoard event files (`--report-to tensorboard`, through the `tensorboard` package);
  while training they also go live to `<checkpoint dir>/runs` (`tensorboard --logdir` on it);
- `loss.png`: train and eval loss against step (matplotlib), shown by the adapter's model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from qformats.errors import QError
from qformats.model_card import LOSS_CURVE, METRICS_FILE

TENSORBOARD_DIR = "runs"
REPORTERS = ("tensorboard",)
# record key -> TensorBoard tag (the names transformers' Trainer uses, so runs compare side by side)
_TAGS = {"loss": "train/loss", "eval_loss": "eval/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_s", "memory_bytes": "train/memory_bytes"}  # fmt: skip


def check_report_to(report_to: list[str]) -> None:
    """Each `--report-to` names a known reporter whose package is installed."""
    for name in report_to:
        if name not in REPORTERS:
            raise QError(f"--report-to {name!r}: choose one of {', '.join(REPORTERS)}")
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise QError("--report-to tensorboard needs the tensorboard package: "
                         "pip install 'qlora-toolkit[tensorboard]'") from None  # fmt: skip


def metric_records(history: list[dict], eval_before: float | None, eval_after: float | None = None) -> list[dict]:
    """The records of a run from its history entries (see the module doc)."""
    records = [{"step": 0, "eval_loss": eval_before}] if eval_before is not None else []
    keys = ("step", "loss", "eval_loss", "lr", "grad_norm", "tokens", "seconds", "tokens_per_s", "memory_bytes")
    for entry in history:
        record = {k: entry[k] for k in keys if entry.get(k) is not None}
        record.setdefault("tokens_per_s", entry["tokens"] / max(entry["seconds"], 1e-9))
        records.append(record)
    if eval_after is not None and records:
        records[-1]["eval_loss"] = eval_after
    return records


def write_metrics_jsonl(folder: Path, records: list[dict]) -> Path:
    path = Path(folder) / METRICS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class TensorBoardLog:
    """Event files under `logdir`. `purge_step`: TensorBoard hides what an earlier, interrupted run logged
    from that step on (a resumed run logs those steps again)."""

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def add(self, record: dict) -> None:
        for key, tag in _TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["step"])

    def close(self) -> None:
        self.writer.close()


def write_tensorboard(logdir: Path, records: list[dict]) -> None:
    log = TensorBoardLog(logdir)
    for record in records:
        log.add(record)
    log.close()


def plot_loss_curve(path: Path, records: list[dict]) -> bool:
    """Draw train and eval loss against step into `path` (PNG); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version string: the same run gives the same bytes
    plt.close(fig)
    return True


def write_reports(folder: Path, records: list[dict], report_to: list[str], plot: bool = True) -> None:
    """Everything a finished run (or a checkpoint) keeps about its metrics: see the module doc."""
    write_metrics_jsonl(folder, records)
    if "tensorboard" in report_to:
        write_tensorboard(Path(folder) / TENSORBOARD_DIR, records)
    if plot:
        plot_loss_curve(Path(folder) / LOSS_CURVE, records)
