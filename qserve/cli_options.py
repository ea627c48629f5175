"""The options several commands of `qconvert` and `qserve` share, each written once.

`--device`, `--dtype`, `--revision`, `--force` and `--push-to-hub`/`--private` mean the same in
every command that takes them; a command adds one with a decorator from here and never spells the
option itself. Nothing here imports torch or the Hub client: `--help` stays instant, and values are
resolved only when a command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from qformats.dtypes import DTYPE_NAMES, dtype_name
from qformats.errors import QError
from qserve.device import DEVICE_CHOICES, announce_device, resolve_device

if TYPE_CHECKING:
    from pathlib import Path

    import torch


def _resolve_device(ctx: click.Context, param: click.Parameter, value: str) -> torch.device:
    device = resolve_device(value)
    announce_device(device, value)
    return device


def device_option(fn):
    """`--device`, default `auto`; the command receives the resolved torch.device (see qserve.device)."""
    return click.option("--device", default="auto", show_default=True, callback=_resolve_device,
                        help=f"Where to compute: {DEVICE_CHOICES} (auto: CUDA when present, else CPU).")(fn)  # fmt: skip


def dtype_option(auto: str | None, *, name: str = "--dtype", what: str = "Compute dtype", default: str = "auto"):
    """`--dtype` (or `name`): one of `qformats.dtypes.DTYPE_NAMES` or an alias (bf16, fp16, fp32), or `auto`
    when `auto` says what that means for the command. The command receives the canonical name, None for auto."""
    def canonical(ctx: click.Context, param: click.Parameter, value: str) -> str | None:
        canonical_name = dtype_name(value, name)
        if canonical_name is None and not auto:
            raise QError(f"{name} auto: name one of {', '.join(DTYPE_NAMES)}")
        return canonical_name

    names = "|".join(DTYPE_NAMES)
    metavar = f"[auto|{names}]" if auto else f"[{names}]"
    meaning = f"; auto: {auto}" if auto else ""
    return click.option(name, default=default, show_default=True, metavar=metavar, callback=canonical,
                        help=f"{what}: {', '.join(DTYPE_NAMES)} (or fp32, bf16, fp16){meaning}.")  # fmt: skip


def revision_option(of: str = "--model"):
    """`--revision`: the Hub branch, tag or commit to read `of` at when it is a Hub repo id."""
    return click.option("--revision", default=None, help=f"Hub branch, tag or commit of {of} when it is a Hub repo id.")


def force_option(replaces: str = "OUT if it is not empty"):
    """`--force`: replace what the command would otherwise refuse to overwrite."""
    return click.option("--force", is_flag=True, help=f"Replace {replaces}.")


def compile_option(fn):
    """`--compile/--no-compile`: the decode step through torch.compile (`CausalLM.compile_decode`)."""
    return click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
                        help="torch.compile the decode step (a one-time compile per batch size; on CPU "
                             "the default eager fused step is faster).")(fn)  # fmt: skip


def push_to_hub_option(fn):
    """`--push-to-hub REPO_ID` and `--private` for a command that writes a folder; call `push_if_asked` at its end."""
    fn = click.option("--private", "push_private", is_flag=True, help="With --push-to-hub: create the repo private.")(fn)
    return click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID",
                        help="When done, verify the output and push it to this Hub repo, with its model card.")(fn)  # fmt: skip


def push_if_asked(out: str | Path, push_to_hub: str | None, push_private: bool = False) -> None:
    """The end of a command that took `push_to_hub_option`: publish `out` (qformats.hub_push) and print its URL."""
    if push_to_hub:
        from qformats.hub_push import push_after

        result = push_after(out, push_to_hub, private=push_private, report=lambda line: click.echo(line, err=True))
        click.echo(result.url)
