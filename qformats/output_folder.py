"""Where a command writes its output folder OUT: never over its own sources, built in `OUT.tmp-<pid>`.

Every command that writes a folder (quantize, import-gguf, export, finetune) builds it in a temp
folder next to OUT and renames it at the end; with `--force` the old OUT is deleted then. Two rules
live here, once for all of them:
- `check_out_apart_from_sources`: an OUT that holds a source (or lies inside one) is refused before
  anything is deleted, so `quantize p/src p --force` cannot delete `p/src`. Paths are compared
  resolved (symlinks followed), which is what the deletion would reach.
- `make_temp_folder`: creates `OUT.tmp-<pid>`, first removing the temp folders that runs killed
  with SIGKILL left next to OUT (those whose pid no longer runs; a live run's is never touched).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from qformats.errors import QError


def check_out_apart_from_sources(out: str | os.PathLike, sources: Iterable[str | os.PathLike | None]) -> None:
    """QError when OUT is a source, holds one, or lies inside one (None sources are skipped)."""
    out_real = Path(out).resolve()
    for source in sources:
        if source is None:
            continue
        src_real = Path(source).resolve()
        kind = "file" if src_real.is_file() else "folder"
        if out_real == src_real or out_real in src_real.parents:
            raise QError(f"{out}: holds the source {kind} {source}, which writing (or --force) would delete; "
                         "choose an output folder outside it")  # fmt: skip
        if src_real in out_real.parents:
            raise QError(f"{out}: lies inside the source {kind} {source}; choose an output folder outside it")


def temp_folder(out: Path) -> Path:
    """This process's temp folder for OUT."""
    return out.parent / f"{out.name}.tmp-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (one we may not signal runs too)."""
    if pid <= 0:
        return True  # not a real pid: never treat its folder as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_folders(out: Path, report: Callable[[str], None] | None = None) -> list[Path]:
    """Remove `OUT.tmp-<pid>` folders next to OUT whose process is gone; one line to `report` if any."""
    pattern = re.compile(rf"{re.escape(out.name)}\.tmp-(\d+)")
    stale = []
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return []
    for p in siblings:
        m = pattern.fullmatch(p.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and pid != os.getpid() and p.is_dir() and not p.is_symlink() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            stale.append(p)
    if stale and report is not None:
        names = ", ".join(p.name for p in stale)
        report(f"note: removed {len(stale)} temp folder{'s' * (len(stale) > 1)} left next to {out} by runs that "
               f"were killed ({names})")  # fmt: skip
    return stale


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def make_temp_folder(out: str | os.PathLike, report: Callable[[str], None] | None = _stderr) -> Path:
    """Create this process's empty `OUT.tmp-<pid>` (after removing stale ones of dead processes)."""
    out = Path(out)
    tmp = temp_folder(out)
    try:
        remove_stale_temp_folders(out, report)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise QError(f"{out}: cannot write here ({e.strerror or e})") from None
    return tmp


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless forced, and an OUT that is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QError(f"{out}: folder is not empty (use --force to replace it)")
