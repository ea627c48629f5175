"""`qconvert`: quantize, import, inspect, evaluate, fine-tune and publish checkpoints.

Each subcommand is a thin shell over a library function; they live in `qconvert/cli_*.py`.
"""

from __future__ import annotations

import click

from qserve.cli_group import ErrorHandlingGroup, console_main


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-toolkit")
def main() -> None:
    """QLoRA toolkit: NF4+DQ checkpoints, LoRA fine-tuning on the 4-bit base, Hub publishing.

    \b
    Typical flow:
      qconvert import-gguf model.gguf ./fp16        # or start from any HF checkpoint
      qconvert quantize ./fp16 ./nf4                # NF4 + double-quantized scales
      qconvert inspect ./nf4 --verify
    """


# Subcommands register here, one line each.
from qconvert.cli_quantize import quantize

main.add_command(quantize)
from qconvert.cli_inspect import inspect

main.add_command(inspect)
from qconvert.cli_push import push

main.add_command(push)
from qconvert.cli_import_gguf import import_gguf_command

main.add_command(import_gguf_command)
from qconvert.cli_eval import eval_cmd

main.add_command(eval_cmd)
from qconvert.cli_finetune import finetune_cmd

main.add_command(finetune_cmd)
from qconvert.cli_plan import plan_cmd

main.add_command(plan_cmd)


def run() -> None:
    """The `qconvert` console script."""
    console_main(main)
