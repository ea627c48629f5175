"""What a fine-tuned adapter folder says about itself: the qconvert.json manifest and the README.md card.

The manifest's `training` section holds the hyperparameters, data and losses; `qformats.model_card`
renders the card from it (the same card `qconvert push` publishes), so there is one card format.
"""

from __future__ import annotations

import json
from pathlib import Path

from qconvert.sft_data import Dataset
from qformats.lineage import model_origin, portable_name, repo_id_of
from qformats.manifest import MANIFEST_FILE, build_manifest, sha256_file
from qformats.model_card import read_artifact, render_card


def base_record(model: str | Path, model_dir: Path, base_model: str | None = None) -> dict:
    """How the adapter names its base (qconvert.json's `source`, adapter_config's `base_model_name_or_path`).

    The Hub id: `base_model` as given, the model's own when it came from the Hub, or the one its local
    folder's lineage leads to; else the folder's name. A local NF4 base's quantization_config is kept,
    so the card can say how to rebuild it from the Hub original; the license found on the way too."""
    hub_base = repo_id_of(str(model)) or repo_id_of(str(model_dir))
    origin, license_ = model_origin(model_dir)
    record: dict = {"base_model": portable_name(model_dir, base_model or hub_base or origin),
                    "path": portable_name(model, hub_base)}  # fmt: skip
    if license_:
        record["license"] = license_
    if hub_base is None and (model_dir / "config.json").is_file():
        qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes":
            record["base_quantization"] = qc
    return record


def training_facts(cfg, result, train: Dataset, held_out: Dataset | None, world: int) -> dict:
    """The `training` section: what was trained on, how, and how it went."""
    last = result.history[-10:]
    examples_seen = result.steps * cfg.grad_accum * cfg.batch_size * world
    facts = {
        "data": f"{Path(cfg.data).name} ({len(train)} examples, {train.format} format, {train.n_tokens:,} tokens)",
        "eval data": (f"{Path(held_out.path).name} ({len(held_out)} examples)" if held_out is not None else None),
        "loss on": "the whole sequence" if cfg.train_on_prompt else "responses only",
        "steps": result.steps,
        "epochs": round(examples_seen / max(1, len(train)), 2),
        "batch": f"{cfg.batch_size} per process x {cfg.grad_accum} accumulation x {world} processes",
        "sharding": ("FSDP2" + (" with CPU offload" if cfg.fsdp_offload else "")) if cfg.fsdp else None,
        "max seq len": cfg.max_seq_len,
        "learning rate": cfg.lr,
        "schedule": f"{cfg.schedule}, {cfg.warmup_ratio:.0%} warmup",
        "optimizer": f"paged AdamW, {cfg.optimizer_bits}-bit state, weight decay {cfg.weight_decay}",
        "max grad norm": cfg.max_grad_norm,
        "gradient checkpointing": cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "final train loss": round(sum(h["loss"] for h in last) / len(last), 4) if last else None,
        "eval loss before": _round(result.eval_loss_before),
        "eval loss after": _round(result.eval_loss_after),
        "training time": f"{result.seconds:.0f} s ({result.tokens_per_s:.0f} tokens/s)",
    }
    return {k: v for k, v in facts.items() if v is not None}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def write_card(folder: Path, cfg, result, train: Dataset, held_out: Dataset | None, world: int = 1,
               base: dict | None = None) -> None:
    """Write qconvert.json (with sha256 of the adapter files) and README.md into the adapter folder.

    `base` names the base model (Hub id or folder name, see finetune's `_base_record`); sources are named
    by file name only: what is published holds no local path."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    params = {k: getattr(cfg, k) for k in ("rank", "alpha", "dropout", "target_modules", "rslora", "lr", "schedule",
                                           "warmup_ratio", "max_grad_norm", "weight_decay", "optimizer_bits",
                                           "batch_size", "grad_accum", "max_seq_len", "train_on_prompt", "seed")}  # fmt: skip
    sources = {Path(p).name: sha256_file(Path(p)) for p in (cfg.data, cfg.eval_file) if p}
    source = (base or {"base_model": Path(cfg.model).name}) | {"data": Path(cfg.data).name}
    manifest = build_manifest(params, source, sources, {}, files)
    manifest["training"] = training_facts(cfg, result, train, held_out, world)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    name = Path(cfg.output).name
    (folder / "README.md").write_text(render_card(read_artifact(folder), repo_id=name))
