"""`--device`: the one resolver of the value every computing command takes (the option: `qserve.cli_options`).

`auto` (the default) is CUDA when `torch.cuda.is_available()`, else the CPU; `cpu`, `cuda` and
`cuda:N` are checked against this machine. A bad value is one `QError` line (the CLIs' error
group prints it as `error: ...`). The option resolves while the command line is parsed, so the
choice is known before anything is loaded, and is printed then as one stderr line
(`device: cuda:0 (NVIDIA H100 80GB HBM3; auto)`) whenever it is a GPU or stderr is a terminal.
A CPU run whose stderr goes to a pipe or a file prints nothing: the CPU was the only default
before GPUs became it, and scripts and tests that read stderr there see what they saw before
(an error is still the one line on it).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from qformats.errors import QError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


def resolve_device(spec: str | torch.device) -> torch.device:
    """`auto` / `cpu` / `cuda` / `cuda:N` (or a torch.device) -> torch.device; QError when unknown or absent here.

    Bare `cuda` stays index-less ("the current CUDA device"): under torchrun each process then
    takes its own local rank.
    """
    import torch  # here, not at import: `--help` must not load torch

    text = str(spec).strip()
    m = _SPEC.match(text)
    if m is None:
        raise QError(f"--device {text!r}: expected {DEVICE_CHOICES}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise QError(f"--device {text}: no CUDA device is available here (use --device cpu, or auto)")
    count = torch.cuda.device_count()
    if m.group(2) is not None and int(m.group(2)) >= count:
        last = f"..cuda:{count - 1}" if count > 1 else ""
        raise QError(f"--device {text}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                     f"(cuda:0{last})")  # fmt: skip
    return torch.device(text)


def describe_device(device: torch.device, spec: str = "") -> str:
    """One line naming the device (and the card), e.g. `device: cuda:0 (NVIDIA H100 80GB HBM3; auto)`."""
    import torch

    auto = str(spec).strip() == "auto"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"device: cuda:{index} ({torch.cuda.get_device_name(index)}{'; auto' if auto else ''})"
    return "device: cpu (auto: no CUDA device here)" if auto else "device: cpu"


def announce_device(device: torch.device, spec: str = "", stream: TextIO | None = None) -> None:
    """Print `describe_device` to stderr when the device is a GPU or stderr is a terminal (see the module doc)."""
    stream = stream or sys.stderr
    if device.type != "cpu" or stream.isatty():
        print(describe_device(device, spec), file=stream, flush=True)


def device_memory(device: torch.device, processes: int = 1) -> int:
    """Bytes one process can plan on: a GPU's total memory, or on CPU the memory the system has available now
    shared by the `processes` processes of this host, plus what this process already holds (its model)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
        held = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, KeyError, ValueError, IndexError):  # not Linux: the physical memory, all of it
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(processes, 1)
    return available // max(processes, 1) + held
