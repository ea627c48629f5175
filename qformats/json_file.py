"""A JSON object read from a file: the one place that turns a file that is missing, unreadable, not
JSON or not an object into a QError naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qformats.errors import QError


def read_json_object(path: str | os.PathLike) -> dict:
    """The file's JSON object; QError naming the file when it cannot be read, is not JSON or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise QError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise QError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise QError(f"{path}: expected a JSON object")
    return data
