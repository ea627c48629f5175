"""qserve --engine vllm: vLLM's constraints checked with clear messages, the `vllm serve` command built (vllm is
not installed here, so running it is one clear line)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from test_engine import make_peft_adapter
from test_hub import _seed_repo, hub  # noqa: F401 (hub: the fake-Hub fixture)
from tiny_models import save_tiny, save_tiny_tokenizer

from qconvert.quantize import quantize_checkpoint
from qformats.errors import QError
from qserve import vllm_handoff
from qserve.cli import main as qserve_cli
from qserve.cli_serve import parse_adapter_spec
from qserve.vllm_handoff import lora_rank_flag, vllm_command


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    hf = save_tiny("smollm2", root / "fp16", dtype=torch.float16, vocab_size=320)
    save_tiny_tokenizer(root / "fp16")
    quantize_checkpoint(root / "fp16", root / "nf4", progress=False)
    make_peft_adapter(hf, root / "small", seed=1, r=8)
    make_peft_adapter(hf, root / "big", seed=2, r=20, alpha=16)
    return root


def edited(src, dst, file, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / file).read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    (dst / file).write_text(json.dumps(cfg))
    return dst


def test_command_has_the_matching_flags(artifacts):
    cmd = vllm_command(str(artifacts / "nf4"), {"small": str(artifacts / "small"), "big": str(artifacts / "big")},
                       port=9000, max_batch=16, max_model_len=512, pipeline_parallel_size=2)  # fmt: skip
    a = cmd.argv
    assert a[:3] == ["vllm", "serve", str((artifacts / "nf4").resolve())]
    joined = cmd.shell()
    for flags in ("--quantization bitsandbytes", "--load-format bitsandbytes", "--enable-lora", "--port 9000",
                  "--max-num-seqs 16", "--max-model-len 512", "--pipeline-parallel-size 2", "--max-loras 2",
                  f"--lora-modules small={(artifacts / 'small').resolve()} big={(artifacts / 'big').resolve()}",
                  "--max-lora-rank 32"):  # fmt: skip
        assert flags in joined
    plain = vllm_command(str(artifacts / "fp16"), {"small": str(artifacts / "small")}).shell()
    assert "--quantization" not in plain and "--max-lora-rank" not in plain  # rank 8 fits vLLM's default 16


def test_lora_rank_rounds_up_to_a_value_vllm_accepts():
    assert [lora_rank_flag(r) for r in (4, 16, 17, 64, 65, 300)] == [None, None, 32, 64, 128, 320]
    with pytest.raises(QError, match="up to 512"):
        lora_rank_flag(1024)


def test_constraints_are_refused_with_clear_messages(artifacts, tmp_path):
    nf4, small = str(artifacts / "nf4"), artifacts / "small"
    cases = [
        (edited(small, tmp_path / "mts", "adapter_config.json", modules_to_save=["lm_head"]), "modules_to_save"),
        (edited(small, tmp_path / "dora", "adapter_config.json", use_dora=True), "DoRA"),
        (edited(small, tmp_path / "bias", "adapter_config.json", bias="all"), "bias 'none'"),
    ]
    for adapter, message in cases:
        with pytest.raises(QError, match=message) as e:
            vllm_command(nf4, {"x": str(adapter)})
        assert "adapter 'x'" in str(e.value)
    with pytest.raises(QError, match="use --pipeline-parallel-size 2"):
        vllm_command(nf4, {}, tensor_parallel_size=2)
    bf16_storage = edited(artifacts / "nf4", tmp_path / "st", "config.json",
                          quantization_config={"bnb_4bit_quant_storage": "bfloat16"})  # fmt: skip
    with pytest.raises(QError, match="stored as uint8"):
        vllm_command(str(bf16_storage), {})
    fp32 = edited(artifacts / "nf4", tmp_path / "fp32", "config.json", dtype="float32", torch_dtype="float32")
    with pytest.raises(QError, match="float16 or bfloat16"):
        vllm_command(str(fp32), {})
    assert "--dtype bfloat16" in vllm_command(str(fp32), {}, dtype="bfloat16").shell()


def test_cli_dry_run_and_missing_vllm(artifacts):
    runner = CliRunner()
    args = ["--model", str(artifacts / "nf4"), "--adapter", str(artifacts / "big"), "--engine", "vllm"]
    result = runner.invoke(qserve_cli, [*args, "--dry-run"])  # bare `qserve --model ...` is `qserve serve`
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("vllm serve ") and f"big={(artifacts / 'big').resolve()}" in result.stdout
    result = runner.invoke(qserve_cli, ["serve", *args])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "vllm is not installed" in result.stderr
    result = runner.invoke(qserve_cli, ["serve", *args, "--tensor-parallel-size", "2", "--dry-run"])
    assert result.exit_code == 1 and result.stderr.startswith("error: --tensor-parallel-size 2")
    result = runner.invoke(qserve_cli, ["serve", *args, "--compile", "--dry-run"])  # the native engine's option
    assert result.exit_code == 1 and result.stderr == "error: --compile applies to the native engine (vLLM compiles on its own)\n"


def test_api_key_reaches_vllm_in_its_environment_only(artifacts, monkeypatch):
    """--api-key (or QSERVE_API_KEY) guards vLLM's routes too: passed as VLLM_API_KEY, never on argv or printed."""
    args = ["--model", str(artifacts / "nf4"), "--engine", "vllm", "--api-key", "s3cret-key"]
    result = CliRunner().invoke(qserve_cli, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("VLLM_API_KEY=... vllm serve ") and "s3cret-key" not in result.output
    ran = {}
    monkeypatch.setattr(vllm_handoff, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_handoff.shutil, "which", lambda name: "/usr/bin/vllm")
    monkeypatch.setattr(vllm_handoff.os, "execvpe", lambda exe, argv, env: ran.update(argv=argv, env=env))
    result = CliRunner(env={"QSERVE_API_KEY": "from-env"}).invoke(qserve_cli, args[:-2])
    assert result.exit_code == 0, result.output
    assert ran["env"]["VLLM_API_KEY"] == "from-env" and not any("from-env" in a for a in ran["argv"])


def test_native_dry_run_names_adapters_after_their_folder(artifacts):
    result = CliRunner().invoke(qserve_cli, ["--model", str(artifacts / "nf4"), "--adapter", str(artifacts / "small"),
                                             "--adapter", f"other={artifacts / 'big'}", "--max-model-len", "64",
                                             "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"models: {artifacts / 'nf4'}, small, other" in result.stderr and "dry run" in result.stdout


def test_adapter_specs():
    assert parse_adapter_spec("guanaco") == ("guanaco", "guanaco")
    assert parse_adapter_spec("timdettmers/guanaco-7b") == ("guanaco-7b", "timdettmers/guanaco-7b")
    assert parse_adapter_spec("./runs/answer/") == ("answer", "./runs/answer/")
    assert parse_adapter_spec("chat=owner/chat-lora") == ("chat", "owner/chat-lora")
    with pytest.raises(QError, match="NAME=PATH"):
        parse_adapter_spec("x=")


def test_hub_ids_with_an_empty_cache_fetch_what_the_checks_read(artifacts, request, tmp_path):
    """Base and adapter by Hub id, nothing cached: the base's config files and the adapter's two files come down
    (its ranks are read from its weights), nothing else; vLLM gets the ids."""
    fake_hub = request.getfixturevalue("hub")  # test_hub's fake Hub on 127.0.0.1, HF_HOME under tmp_path
    base = {p.name: p.read_bytes() for p in (artifacts / "nf4").iterdir() if p.is_file()}
    _seed_repo(fake_hub, "tester/tiny-nf4", base)
    lora = {p.name: p.read_bytes() for p in (artifacts / "big").iterdir()}
    _seed_repo(fake_hub, "tester/big-lora", {**lora, "training_args.bin": b"\0" * 4096, "notes/run.json": b"{}"})
    cache = tmp_path / "hf_home" / "hub"
    assert not cache.exists()
    result = CliRunner().invoke(qserve_cli, ["--model", "tester/tiny-nf4", "--adapter", "tester/big-lora",
                                             "--engine", "vllm", "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("vllm serve tester/tiny-nf4 ")
    assert "--lora-modules big-lora=tester/big-lora" in result.stdout and "--max-lora-rank 32" in result.stdout
    fetched = {repo: sorted(str(p.relative_to(snap)) for snap in (cache / f"models--tester--{repo}" / "snapshots").iterdir()
                            for p in snap.rglob("*") if p.is_file())
               for repo in ("tiny-nf4", "big-lora")}  # fmt: skip
    assert fetched["big-lora"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert fetched["tiny-nf4"] == sorted(n for n in base if n.endswith(".json"))
    assert "model.safetensors" in base  # the base's weights stayed on the Hub (vLLM downloads them)
