"""The options `qconvert` and `qserve` commands share (`qserve.cli_options`) and the one dtype-name table
(`qformats.dtypes`): the same option object in every command, the same parser, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

from qconvert.cli import main as qconvert_main
from qformats.dtypes import DTYPE_NAMES, dtype_name, known_dtype, parse_dtype
from qformats.errors import QError
from qserve.cli import main as qserve_main
from qserve.cli_options import dtype_option, force_option, push_to_hub_option, revision_option

# Every command taking a dtype: its group, the arguments it needs to parse, and the option's name.
DTYPE_COMMANDS = [
    (qserve_main, ["generate", "--model", "m", "--prompt", "p"], "--dtype"),
    (qserve_main, ["serve", "--model", "m"], "--dtype"),
    (qserve_main, ["export", "--model", "m", "--out", "o"], "--dtype"),
    (qconvert_main, ["eval", "--model", "m", "--text", "t"], "--dtype"),
    (qconvert_main, ["finetune", "m", "d.jsonl", "out"], "--dtype"),
    (qconvert_main, ["import-gguf", "f.gguf", "out"], "--dtype"),
    (qconvert_main, ["quantize", "src", "out"], "--compute-dtype"),
]


def _param(group, command: str, name: str) -> click.Parameter:
    return next(p for p in group.commands[command].params if p.name == name)


def test_dtype_names_and_aliases():
    assert DTYPE_NAMES == ("float32", "bfloat16", "float16")
    for alias, name in [("bf16", "bfloat16"), ("FP16", "float16"), ("fp32", "float32"), ("half", "float16"),
                        ("torch.bfloat16", "bfloat16"), (torch.float16, "float16"), ("float32", "float32")]:  # fmt: skip
        assert dtype_name(alias) == name
        assert parse_dtype(alias) == getattr(torch, name)
    assert dtype_name(None) is None and dtype_name("auto") is None and parse_dtype("auto") is None
    with pytest.raises(QError, match=r"^--dtype 'int8' is not supported: use auto, float32, bfloat16 or float16"):
        parse_dtype("int8", "--dtype")
    # What a config states: lenient (an unknown name is no dtype, not an error).
    assert known_dtype("bfloat16") == torch.bfloat16 and known_dtype("float64") is None and known_dtype(None) is None


@pytest.mark.parametrize("group,args,flag", DTYPE_COMMANDS, ids=[a[0] for _, a, _ in DTYPE_COMMANDS])
def test_every_command_refuses_a_bad_dtype_in_one_line(group, args, flag):
    r = CliRunner().invoke(group, [*args, flag, "int8"])
    assert r.exit_code == 1, r.output
    assert r.stderr == (f"error: {flag} 'int8' is not supported: use auto, float32, bfloat16 or float16 "
                        "(or fp32, bf16, fp16)\n")  # fmt: skip
    help_text = CliRunner().invoke(group, [args[0], "--help"]).output
    assert "float32, bfloat16, float16 (or fp32, bf16, fp16)" in " ".join(help_text.split())


def test_the_command_gets_the_canonical_dtype_name():
    seen = []

    @click.command()
    @dtype_option(auto="whatever the checkpoint says")
    def cmd(dtype):
        seen.append(dtype)

    runner = CliRunner()
    for args, want in (([], None), (["--dtype", "bf16"], "bfloat16"), (["--dtype", "float16"], "float16"),
                       (["--dtype", "auto"], None)):  # fmt: skip
        assert runner.invoke(cmd, args).exit_code == 0
        assert seen[-1] == want
    assert "auto: whatever the checkpoint says" in " ".join(runner.invoke(cmd, ["--help"]).output.split())


def test_a_dtype_without_auto_refuses_auto():
    r = CliRunner().invoke(qconvert_main, ["import-gguf", "f.gguf", "out", "--dtype", "auto"])
    assert r.exit_code == 1 and r.stderr == "error: --dtype auto: name one of float32, bfloat16, float16\n"
    assert _param(qconvert_main, "import-gguf", "dtype").default == "float16"


def test_revision_force_and_push_are_one_option_each():
    revision = revision_option()(lambda revision: None).__click_params__[0]
    push = push_to_hub_option(lambda push_to_hub, push_private: None).__click_params__
    for group, command in [(qserve_main, "generate"), (qserve_main, "serve"), (qserve_main, "export"),
                           (qconvert_main, "eval")]:  # fmt: skip
        assert _param(group, command, "revision").help == revision.help, command
    assert "of SRC" in _param(qconvert_main, "quantize", "revision").help
    for group, command in [(qserve_main, "export"), (qconvert_main, "quantize"), (qconvert_main, "finetune")]:
        for shared in push:
            assert _param(group, command, shared.name).help == shared.help, command
    force = force_option()(lambda force: None).__click_params__[0]
    for group, command in [(qserve_main, "export"), (qconvert_main, "quantize"), (qconvert_main, "import-gguf")]:
        assert _param(group, command, "force").help == force.help, command
    assert _param(qconvert_main, "finetune", "force").help == "Replace OUT and earlier checkpoints if they exist."


def test_help_imports_neither_torch_nor_the_hub_client():
    code = ("import sys; from click.testing import CliRunner; from qconvert.cli import main as q; "
            "from qserve.cli import main as s\n"
            "for group in (q, s):\n"
            "    for name in group.commands:\n"
            "        assert CliRunner().invoke(group, [name, '--help']).exit_code == 0, name\n"
            "print(sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
