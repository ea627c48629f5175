"""`--device`: one option and one resolver for every computing command; auto is CUDA when present, else CPU.

No GPU here: the CPU branch runs for real; the CUDA branch monkeypatches `torch.cuda` where the answer
is only a choice of device string (nothing is launched on it).
"""

from __future__ import annotations

import io

import pytest
import torch
from click.testing import CliRunner

from qconvert.cli import main as qconvert_main
from qformats.errors import QError
from qserve.cli import main as qserve_main
from qserve.cli_options import device_option
from qserve.device import announce_device, describe_device, resolve_device

# Every command that computes, with the arguments it needs to parse.
COMMANDS = [
    (qserve_main, ["generate", "--model", "m", "--prompt", "p"]),
    (qserve_main, ["serve", "--model", "m"]),
    (qserve_main, ["export", "--model", "m", "--out", "o"]),
    (qconvert_main, ["eval", "--model", "m", "--text", "t"]),
    (qconvert_main, ["quantize", "src", "out"]),
    (qconvert_main, ["finetune", "m", "d.jsonl", "out"]),
]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda says two cards: resolve_device's CUDA branch, which only picks a device string."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"Fake GPU {i}")


def test_auto_is_cpu_without_cuda_and_cpu_is_cpu():
    assert not torch.cuda.is_available()  # this test's premise: a machine without a GPU
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(QError, match=rf"^--device {spec}: no CUDA device is available here"):
            resolve_device(spec)


def test_auto_is_cuda_when_present(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")  # index-less: torchrun ranks take their own
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(QError, match=r"^--device cuda:2: this machine has 2 CUDA devices \(cuda:0\.\.cuda:1\)$"):
        resolve_device("cuda:2")
    assert describe_device(resolve_device("auto"), "auto") == "device: cuda:0 (Fake GPU 0; auto)"
    assert describe_device(resolve_device("cuda:1"), "cuda:1") == "device: cuda:1 (Fake GPU 1)"


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda0", "mps", "meta", "", "cpu:0"])
def test_bad_values_are_one_clear_line(spec):
    with pytest.raises(QError) as e:
        resolve_device(spec)
    assert str(e.value) == f"--device {spec!r}: expected auto, cpu, cuda or cuda:N"


def test_the_line_is_printed_for_a_gpu_or_a_terminal(two_gpus, monkeypatch):
    pipe, terminal = io.StringIO(), _Terminal()
    announce_device(torch.device("cuda"), "auto", pipe)
    announce_device(torch.device("cpu"), "auto", terminal)
    announce_device(torch.device("cpu"), "cpu", terminal)
    assert pipe.getvalue() == "device: cuda:0 (Fake GPU 0; auto)\n"
    assert terminal.getvalue() == "device: cpu (auto: no CUDA device here)\ndevice: cpu\n"
    quiet = io.StringIO()
    announce_device(torch.device("cpu"), "auto", quiet)  # a CPU run into a pipe: stderr as before
    assert quiet.getvalue() == ""


def test_every_computing_command_shares_the_one_option():
    shared = device_option(lambda device: None).__click_params__[0]
    for group, args in COMMANDS:
        param = next(p for p in group.commands[args[0]].params if p.name == "device")
        assert (param.default, param.callback, param.help) == ("auto", shared.callback, shared.help), args[0]


@pytest.mark.parametrize("group,args", COMMANDS, ids=[args[0] for _, args in COMMANDS])
def test_every_command_refuses_a_bad_device_in_one_line(group, args):
    r = CliRunner().invoke(group, [*args, "--device", "tpu:0"])
    assert r.exit_code == 1, r.output
    assert r.stderr == "error: --device 'tpu:0': expected auto, cpu, cuda or cuda:N\n"
    r = CliRunner().invoke(group, [*args, "--device", "cuda:0"])
    assert r.exit_code == 1 and r.stderr.startswith("error: --device cuda:0: no CUDA device is available here")


def test_the_command_gets_the_resolved_device(two_gpus):
    import click

    seen = []

    @click.command()
    @device_option
    def cmd(device):
        seen.append(device)

    runner = CliRunner()
    for args, want in (([], torch.device("cuda")), (["--device", "cuda:1"], torch.device("cuda", 1)),
                       (["--device", "cpu"], torch.device("cpu"))):  # fmt: skip
        r = runner.invoke(cmd, args)
        assert r.exit_code == 0, r.output
        assert seen[-1] == want
    assert "[default: auto]" in runner.invoke(cmd, ["--help"]).output
