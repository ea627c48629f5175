"""The click group both CLIs use: user errors become one line on stderr and exit status 1."""

from __future__ import annotations

import errno
import sys

import click

from qformats.errors import QError


def describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {e.filename or 'output'}"
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"


class ErrorHandlingGroup(click.Group):
    """Catches QError (bad input) and OSError (files, disk) so users never see a bare traceback.

    Set QTOOLS_DEBUG=1 to get the traceback anyway.
    """

    def invoke(self, ctx: click.Context):
        import os

        if os.environ.get("QTOOLS_DEBUG"):
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except QError as e:
            _fail(str(e))
        except OSError as e:
            _fail(describe_os_error(e))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
