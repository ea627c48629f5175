"""`python -m qconvert ...` is the `qconvert` command (qserve export runs `push` this way)."""

from qconvert.cli import run

run()
