"""`qconvert inspect PATH`: a thin shell over `qconvert.checkpoint_info.inspect_checkpoint`."""

from __future__ import annotations

import json
import sys

import click


@click.command("inspect")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Recompute the sha256 of every file listed in qconvert.json; "
              "exit 1 on any mismatch.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect(path, verify, as_json):
    """Say what the checkpoint folder PATH is: fp16/bf16 or NF4, architecture, layers, quantized vs
    kept tensors, bits per parameter, size, and whether its qconvert.json manifest holds.

    Reads headers only (instant on any size); --verify also rereads every file to check its sha256.

    \b
    Example:
      qconvert inspect ./smollm2-nf4 --verify
    """
    from qconvert.checkpoint_info import inspect_checkpoint
    from qformats.errors import QError

    info = inspect_checkpoint(path, verify=verify)
    if verify and info.manifest == "missing":
        raise QError(f"{path}: --verify needs a qconvert.json manifest, and there is none")
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2))
    else:
        click.echo(info.describe())
    if info.manifest == "mismatch":
        click.echo(f"error: {path}: files differ from qconvert.json: " + "; ".join(info.manifest_problems), err=True)
        sys.exit(1)
