"""The click group both CLIs use: user errors become one line on stderr and exit status 1."""

from __future__ import annotations

import errno
import os
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


_skip_finalization = False


def skip_finalization() -> None:
    """Called by a command that has closed every file it wrote and leaves no thread or process that
    must outlive it: the console script then ends it with os._exit once it succeeds. Python's
    finalization after importing torch (its thousands of module objects, C++ destructors) takes
    about half a second, a sixth of quantizing a 1B model."""
    global _skip_finalization
    _skip_finalization = True


def console_main(group: click.Group) -> None:
    """The console scripts' entry: `group` in click's standalone mode (which always ends in
    SystemExit), then, for a command that allowed it and succeeded, exit without finalization."""
    try:
        group.main()
    except SystemExit as e:
        if _skip_finalization and e.code in (None, 0):
            code = 0
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):  # a closed pipe (`| head`): what it held is lost either way
                    code = 1 if stream is sys.stdout else code
            os._exit(code)
        raise
