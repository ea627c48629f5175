"""`qconvert plan`: the memory model against three published peaks, its invariants, its errors, the CLI.

The published figures and the settings behind them (docs/memory-plan.md names the sources):
- Answer.AI, Llama-2-70B, FSDP + CPU offload on 2 GPUs, batch 2 x 2048, r=64 on q/k/v/gate/up/down,
  gradient checkpointing, bf16 autocast over fp32 weights (so fp32 hidden states), full logits:
  14.92 GiB per GPU, measured with torch.cuda.max_memory_allocated (tensors only).
- The QLoRA paper, Guanaco 65B on one 48 GB GPU: batch 4 x (16 + 512), r=64 on every linear, LoRA
  in bf16, paged AdamW 32-bit, checkpointing, full logits: the whole card (context included).
- torchtune, Llama-3.1-8B QLoRA on one GPU, batch 2 x 2048, r=8 on q/v/output and the MLP, bf16
  LoRA, chunked cross-entropy, activation checkpointing: 7.4 GiB peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from qconvert.cli import main
from qconvert.memory_plan import GiB, Settings, Trainer, cheapest_fit, needs_checkpointing, plan
from qformats.errors import QError

CONFIGS = Path(__file__).parents[1] / "data" / "model_configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def within(predicted: float, published: float, tolerance: float = 0.20) -> bool:
    return abs(predicted - published) <= tolerance * published


def test_answerai_llama2_70b_fsdp_offload_two_gpus():
    s = Settings(seq_len=2048, batch_size=2, rank=64, gpus=2, fsdp=True, fsdp_offload=True,
                 target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
                 trainer=Trainer(chunked_loss=False, residual_bytes=4))  # fmt: skip
    gpu = plan(config("llama-2-70b"), s).devices[0]
    assert within(gpu.allocated / GiB, 14.92), gpu.allocated / GiB
    assert not any("4-bit base" in k for k in gpu.terms)  # offloaded: the shards live on the host


def test_qlora_paper_guanaco_65b_on_one_48gb_gpu():
    s = Settings(seq_len=16 + 512, batch_size=4, rank=64, trainer=Trainer(lora_bytes=2, chunked_loss=False))
    gpu = plan(config("llama-65b"), s).devices[0]
    assert gpu.total <= 48 * GiB and within(gpu.total / GiB, 48), gpu.total / GiB


def test_torchtune_llama31_8b_qlora():
    s = Settings(seq_len=2048, batch_size=2, rank=8,
                 target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 trainer=Trainer(lora_bytes=2))  # fmt: skip
    gpu = plan(config("llama-3.1-8b"), s).devices[0]
    assert within(gpu.allocated / GiB, 7.4), gpu.allocated / GiB


# Peak RSS measured by bench/memory_plan.py on this project's CPU (docs/memory-plan.md): model, seq, batch,
# rank, processes, checkpointing, measured MB. The plan must stay within 15% of each.
MEASURED_CPU = [
    ("smollm2-135m", 256, 4, 16, 1, True, 1063), ("smollm2-135m", 256, 4, 16, 1, False, 1953),
    ("smollm2-135m", 512, 4, 64, 1, True, 1504), ("smollm2-135m", 256, 4, 16, 2, True, 1085),
    ("smollm2-135m", 256, 4, 64, 2, False, 2219),
    ("llama-0.5b-random", 256, 2, 16, 1, True, 1541), ("llama-0.5b-random", 256, 2, 16, 2, True, 1573),
    ("llama-0.5b-random", 512, 2, 64, 1, False, 3754), ("llama-1.2b-random", 128, 2, 16, 1, True, 2164),
    ("llama-1.2b-random", 256, 2, 64, 1, True, 3004),
]  # fmt: skip


@pytest.mark.parametrize("model,seq,batch,rank,procs,ckpt,measured_mb", MEASURED_CPU)
def test_cpu_plan_within_15_percent_of_measured_peak_rss(model, seq, batch, rank, procs, ckpt, measured_mb):
    s = Settings(seq_len=seq, batch_size=batch, rank=rank, gpus=procs, gradient_checkpointing=ckpt, device="cpu")
    predicted_mb = plan(config(model), s).devices[0].total / 2**20
    assert within(predicted_mb, measured_mb, 0.15), (predicted_mb, measured_mb)


# `qconvert finetune --fsdp` under torchrun with 2 processes (bench/memory_plan.py --fsdp): model, seq, batch per
# process, rank, checkpointing, the largest rank's peak MB.
MEASURED_CPU_FSDP = [
    ("smollm2-135m", 256, 4, 16, True, 1190), ("smollm2-135m", 512, 2, 64, False, 2412),
    ("llama-0.5b-random", 256, 2, 16, True, 1652), ("llama-0.5b-random", 512, 1, 64, True, 2012),
    ("llama-1.2b-random", 128, 1, 16, True, 2295),
]  # fmt: skip


@pytest.mark.parametrize("model,seq,batch,rank,ckpt,measured_mb", MEASURED_CPU_FSDP)
def test_cpu_fsdp_plan_within_15_percent_of_measured_peak_rss(model, seq, batch, rank, ckpt, measured_mb):
    s = Settings(seq_len=seq, batch_size=batch, rank=rank, gpus=2, fsdp=True, gradient_checkpointing=ckpt, device="cpu")
    predicted_mb = plan(config(model), s).devices[0].total / 2**20
    assert within(predicted_mb, measured_mb, 0.15), (predicted_mb, measured_mb)


@pytest.mark.parametrize("s", [Settings(), Settings(device="cpu", gradient_checkpointing=False),
                               Settings(gpus=4, fsdp=True, fsdp_offload=True), Settings(gpus=2, optimizer_bits=8)])  # fmt: skip
def test_breakdown_sums_to_total(s):
    p = plan(config("llama-3.1-8b"), s)
    for b, j in zip(p.devices, p.to_json()["devices"]):
        assert all(v >= 0 for v in b.terms.values())
        assert b.total == sum(b.terms.values()) == j["total_bytes"]
        assert b.allocated <= b.total


@pytest.mark.parametrize("field,values", [("seq_len", [128, 512, 2048]), ("batch_size", [1, 2, 8]),
                                          ("rank", [8, 16, 64, 128])])  # fmt: skip
@pytest.mark.parametrize("base", [Settings(), Settings(device="cpu", gradient_checkpointing=False),
                                  Settings(gpus=2, fsdp=True, fsdp_offload=True)])  # fmt: skip
def test_more_tokens_or_rank_never_less_memory(field, values, base):
    totals = [plan(config("llama-2-70b"), replace(base, **{field: v})).devices[0].total for v in values]
    assert totals == sorted(totals) and totals[0] < totals[-1]


@pytest.mark.parametrize("offload", [False, True])
def test_more_gpus_with_fsdp_never_more_per_device(offload):
    totals = [plan(config("llama-2-70b"), Settings(gpus=n, fsdp=True, fsdp_offload=offload)).devices[-1 if offload else 0].total
              for n in (1, 2, 4, 8)]  # fmt: skip
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]


def test_checkpointing_and_8bit_state_lower_the_peak():
    c = config("llama-3.1-8b")
    assert plan(c, Settings(gradient_checkpointing=True)).devices[0].total < plan(c, Settings(gradient_checkpointing=False)).devices[0].total
    assert plan(c, Settings(optimizer_bits=8)).devices[0].total < plan(c, Settings(optimizer_bits=32)).devices[0].total


def test_cheapest_fit_is_found_and_fits():
    s = Settings(seq_len=2048, batch_size=2, gpus=2, gpu_memory=24 * GiB)
    assert plan(config("llama-2-70b"), s).fits is False
    change, fixed = cheapest_fit(config("llama-2-70b"), s)
    assert "--fsdp" in change and fixed.fits
    assert cheapest_fit(config("llama-2-70b"), replace(s, gpu_memory=1 << 20)) is None


@pytest.mark.parametrize("bad,match", [
    (Settings(seq_len=0), "--seq-len"), (Settings(batch_size=-1), "--batch-size"), (Settings(rank=0), "--rank"),
    (Settings(gpus=0), "--gpus"), (Settings(optimizer_bits=16), "--optimizer-bits"),
    (Settings(fsdp_offload=True), "--fsdp-offload needs --fsdp"), (Settings(target_modules=("lm_head",)), "lm_head"),
])  # fmt: skip
def test_bad_settings_name_the_option(bad, match):
    with pytest.raises(QError, match=match):
        plan(config("llama-3.1-8b"), bad)


def _folder(tmp_path: Path, cfg: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_cli_prints_breakdown_and_verdict(tmp_path):
    model = _folder(tmp_path, config("llama-2-70b"))
    args = ["plan", str(model), "--seq-len", "2048", "--batch-size", "2", "--gpus", "2", "--gpu-memory", "24GiB"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "4-bit base" in r.output and "does not fit" in r.output and "cheapest change that fits: " in r.output
    r = CliRunner().invoke(main, [*args, "--fsdp", "--fsdp-offload", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["fits"] is True and out["cheapest_fit"] is None
    assert {d["device"] for d in out["devices"]} == {"cuda", "cpu (host, per process)"}


@pytest.mark.parametrize("edit,args,match", [
    ({"model_type": "gpt2"}, [], "model_type 'gpt2' is not supported"),
    ({}, ["--rank", "0"], "--rank must be at least 1"),
    ({}, ["--gpu-memory", "lots"], "cannot read size 'lots'"),
    ({}, ["--fsdp-offload"], "--fsdp-offload needs --fsdp"),
])  # fmt: skip
def test_cli_errors_are_one_line(tmp_path, edit, args, match):
    model = _folder(tmp_path, {**config("llama-3.1-8b"), **edit})
    r = CliRunner().invoke(main, ["plan", str(model), *args])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.output


def test_cli_missing_config_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["plan", str(tmp_path)])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "config.json" in r.output


def test_plan_help_imports_no_torch():
    code = "import sys, qconvert.cli_plan, qconvert.memory_plan; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gradient_checkpointing_auto_is_on_only_when_the_run_would_not_fit_without_it():
    """`qconvert finetune --gradient-checkpointing auto` (the default) asks the plan, with checkpointing off."""
    cfg, s = config("llama-3.1-8b"), Settings(seq_len=2048, batch_size=2, rank=8, device="cuda")
    without = plan(cfg, replace(s, gradient_checkpointing=False)).devices[0].total
    with_it = plan(cfg, replace(s, gradient_checkpointing=True)).devices[0].total
    assert with_it < without
    assert needs_checkpointing(cfg, s, available=without) is False  # fits exactly: no recompute
    assert needs_checkpointing(cfg, s, available=without - 1) is True
    assert needs_checkpointing(cfg, replace(s, gradient_checkpointing=True), available=80 * GiB) is False  # the
    # setting asked about is always "without"


def test_the_decoder_linears_are_the_lora_layers():
    from qconvert import memory_plan
    from qserve.lora import ALL_LINEAR

    assert memory_plan.ALL_LINEAR == tuple(ALL_LINEAR)
