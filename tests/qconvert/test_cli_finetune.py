"""`qconvert finetune`'s flags are FinetuneConfig's fields: every field has its flag and help, and the command
line becomes the config the library function receives (defaults equal, values converted)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

import qconvert.finetune
from qconvert.cli import main as qconvert_main
from qconvert.finetune_config import FinetuneConfig


class _Captured(Exception):
    pass


def _config(monkeypatch, *args: str) -> FinetuneConfig:
    """The FinetuneConfig `qconvert finetune m d.jsonl out ARGS` hands to `finetune` (which is not run)."""
    seen = []

    def fake_finetune(cfg, echo):
        seen.append(cfg)
        raise _Captured

    monkeypatch.setattr(qconvert.finetune, "finetune", fake_finetune)
    r = CliRunner().invoke(qconvert_main, ["finetune", "m", "d.jsonl", "out", *args])
    assert isinstance(r.exception, _Captured), r.output
    return seen[0]


def test_every_setting_has_a_flag_with_help():
    params = {p.name: p for p in qconvert_main.commands["finetune"].params}
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in ("model", "data", "output"):  # MODEL DATA OUT
            assert params[{"output": "out"}.get(f.name, f.name)].param_type_name == "argument"
            continue
        assert f.name in params, f"FinetuneConfig.{f.name} has no flag"
        assert params[f.name].help, f"--{f.name} has no help"
    help_text = CliRunner().invoke(qconvert_main, ["finetune", "--help"]).output
    for flag in ("--rank", "-r", "--no-chat-template", "--gradient-checkpointing", "--quiet", "--target-modules",
                 "--optimizer-bits", "--report-to", "--fsdp", "--fsdp-offload", "--push-to-hub", "--dtype", "--device", "--force"):  # fmt: skip
        assert flag in help_text


def test_defaults_are_the_configs(monkeypatch):
    cfg = _config(monkeypatch)
    want = FinetuneConfig(model="m", data="d.jsonl", output="out")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name == "device":
            assert getattr(cfg, f.name) == torch.device("cpu")  # resolved from auto on a machine without CUDA
        else:
            assert getattr(cfg, f.name) == getattr(want, f.name), f.name


def test_command_line_values_become_settings(monkeypatch):
    cfg = _config(monkeypatch, "-r", "8", "--target-modules", "q_proj, v_proj", "--optimizer-bits", "8",
                  "--optimizer-budget", "2GB", "--no-chat-template", "--gradient-checkpointing", "off", "--quiet",
                  "--report-to", "tensorboard", "--dtype", "bf16", "--format", "alpaca", "--steps", "3", "--force")  # fmt: skip
    assert (cfg.rank, cfg.target_modules, cfg.optimizer_bits, cfg.optimizer_budget) == (8, ["q_proj", "v_proj"], 8, 2 * 10**9)
    assert (cfg.chat_template, cfg.gradient_checkpointing, cfg.progress) == (False, False, False)
    assert (cfg.report_to, cfg.dtype, cfg.format, cfg.steps, cfg.force) == (["tensorboard"], "bfloat16", "alpaca", 3, True)
    assert _config(monkeypatch, "--target-modules", r".*\.(q|v)_proj").target_modules == r".*\.(q|v)_proj"


def test_gradient_checkpointing_auto_on_off(monkeypatch):
    assert _config(monkeypatch).gradient_checkpointing is None  # auto: the memory plan decides
    assert _config(monkeypatch, "--gradient-checkpointing", "on").gradient_checkpointing is True
    assert _config(monkeypatch, "--gradient-checkpointing", "auto").gradient_checkpointing is None


@pytest.mark.parametrize("args", [["--schedule", "steep"], ["--format", "csv"], ["--optimizer-bits", "4"],
                                  ["--gradient-checkpointing", "maybe"]])
def test_choices_are_checked_while_parsing(args):
    r = CliRunner().invoke(qconvert_main, ["finetune", "m", "d.jsonl", "out", *args])
    assert r.exit_code == 2 and "Invalid value for" in r.output


RUN_UNDER_TORCHRUN = ("--fsdp shards the model over processes: run it under torchrun with 2 or more, e.g. "
                      "`torchrun --nproc-per-node 2 $(which qconvert) finetune ... --fsdp`")  # fmt: skip


@pytest.mark.parametrize(("args", "world", "message"), [
    (["--fsdp"], None, RUN_UNDER_TORCHRUN),
    (["--fsdp"], "1", RUN_UNDER_TORCHRUN),
    (["--fsdp-offload"], "2", "--fsdp-offload offloads FSDP's shards: pass --fsdp too"),
    (["--fsdp", "--fsdp-offload", "--optimizer-budget", "1GB"], "2",
     "--optimizer-budget: with --fsdp-offload the optimizer state stays in host memory"),
])  # fmt: skip
def test_fsdp_refusals_are_one_line_before_loading(monkeypatch, tmp_path, args, world, message):
    """Refused before anything is read: MODEL and DATA do not even exist, and no process group is joined."""
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    r = CliRunner().invoke(qconvert_main, ["finetune", str(tmp_path / "no-model"), str(tmp_path / "no.jsonl"),
                                           str(tmp_path / "out"), *args])  # fmt: skip
    assert r.exit_code == 1 and r.output.startswith(f"error: {message}") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "out").exists()
