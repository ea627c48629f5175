"""`qserve`: generate with, serve and export NF4 models (base plus LoRA adapters).

Each subcommand is a thin shell over a library function; they live in `qserve/cli_*.py`.
"""

from __future__ import annotations

import click

from qserve.cli_serve import ServeByDefaultGroup  # an ErrorHandlingGroup where `qserve --model X` means serve


@click.group(cls=ServeByDefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-toolkit")
def main() -> None:
    """Run NF4 models: generate text, serve an OpenAI-compatible API, export merged models.

    `qserve --model PATH [--adapter NAME=PATH ...]` is short for `qserve serve --model PATH ...`.
    """


# Subcommands register here, one line each.
from qserve.cli_generate import generate_cmd

main.add_command(generate_cmd)
from qserve.cli_serve import serve

main.add_command(serve)
from qserve.cli_export import export_cmd

main.add_command(export_cmd)
