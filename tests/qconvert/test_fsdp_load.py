"""Streamed per-rank loading for FSDP2 (qconvert/fsdp_load.py), in 2 gloo processes (fsdp_load_rank.py):
each rank's shards equal those of the whole-model path byte for byte (so do the loss and gradients), and
a rank's peak resident set while loading stays below the whole model's bytes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import tiny  # noqa: F401  (a fixture, by name below)
from test_fsdp import free_port
from tiny_models import save_tiny

from qconvert.quantize import quantize_checkpoint
from qformats.safetensors_file import read_safetensors_header

RANK_SCRIPT = Path(__file__).with_name("fsdp_load_rank.py")


def run_ranks(mode: str, folder: Path, world: int = 2) -> list[str]:
    env = os.environ | {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), mode, str(folder)], env=env | {"RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(world)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    return errors


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny NF4 model of SmolLM2's kind: the output layer is the embedding table."""
    d = tmp_path_factory.mktemp("fsdp-load-tied")
    save_tiny("smollm2", d / "fp", vocab_size=321)
    quantize_checkpoint(d / "fp", d / "nf4", compute_dtype="float32", progress=False)
    return d


@pytest.mark.parametrize("model", ["tiny", "tied"])
def test_streamed_shards_equal_the_whole_model_path(model, request):
    """tiny: tensors of one row (rank 1 keeps none); tied: one table for embeddings and output, odd rows.
    (The medium model below, odd row counts in large tensors, is checked the same way after its RSS.)"""
    run_ranks("equal", request.getfixturevalue(model))


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A random NF4 Llama whose float tensors (untied 32001 x 512 embeddings and output layer, an odd row
    count: the last rank's shard is padded) make ~140 MB in fp32, so that RSS measures the load."""
    d = tmp_path_factory.mktemp("fsdp-load")
    save_tiny("llama", d / "fp", dtype=torch.float16, vocab_size=32001, hidden_size=512, intermediate_size=1536,
              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    quantize_checkpoint(d / "fp", d / "nf4", compute_dtype="float32", progress=False)
    return d


def test_rank_peak_rss_while_loading_is_below_the_whole_model(medium):
    run_ranks("memory", medium)  # then, in the same processes, the shards against the whole-model path
    for r in range(2):
        got = json.loads((medium / f"rss-{r}.json").read_text())
        # Each rank holds half of every tensor, plus a small read buffer, the whole (small) LoRA before
        # sharding, and while FSDP pads a shard of odd rows (rank 1) that shard twice: ~0.6-0.7x measured.
        assert got["peak_growth"] < 0.85 * got["whole_bytes"], got
        assert got["local_bytes"] < 0.55 * got["whole_bytes"], got


def test_non_finite_rows_of_one_rank_stop_every_rank_with_one_line(tiny, tmp_path):  # noqa: F811
    """NaN in the last row of the embedding table: rank 1 reads it and names the tensor; rank 0, whose rows
    are clean, stops too (told by an all-reduce) instead of waiting in the first all-gather."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny / "nf4", bad / "nf4")
    info = read_safetensors_header(bad / "nf4" / "model.safetensors").tensors["model.embed_tokens.weight"]
    with open(info.file, "r+b") as f:
        f.seek(info.end - info.dtype.itemsize)
        f.write(torch.tensor([float("nan")], dtype=info.dtype).view(torch.uint8).numpy().tobytes())
    run_ranks("bad", bad)
    said = [(bad / f"error-{r}.txt").read_text() for r in range(2)]
    assert "another rank found bad data" in said[0], said
    assert "'model.embed_tokens.weight' has non-finite values" in said[1], said
