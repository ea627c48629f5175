"""The README and docs/ stay true: every relative link names a file that exists, every file path in
backticks exists, and the README's Python entry points import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_paths_exist(page: Path):
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" not in target and not (page.parent / target).exists():
            missing.append(target)
    # Repository paths named in backticks: `qserve/engine.py`, `tests/qserve/test_server.py`, `bench/gpu.py`.
    for path in re.findall(r"`((?:qformats|qkernels|qserve|qconvert|bench|tests|docs)/[\w./-]+\.(?:py|cpp|md|hex|jsonl))`", text):
        if "*" not in path and not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_readme_python_entry_points_import():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert blocks, "README.md has no Python entry points block"
    run = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 180
