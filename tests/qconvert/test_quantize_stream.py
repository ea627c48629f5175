"""`qconvert quantize`'s streaming writer (qconvert/quantize_stream.py): headers known before data,
one write pass, a pipeline; output byte for byte what the tensor-at-a-time writer makes; non-finite
source tensors refused; kill -9 leaves no OUT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_quantize import assert_fails, run_cli, tiny_llama

from qconvert.quantize import plan_tensors, quantize_checkpoint
from qformats.checkpoint import iter_checkpoint_tensors, open_checkpoint
from qformats.manifest import sha256_file, verify_manifest
from qformats.nf4 import quantize_nf4 as reference
from qformats.sharded_writer import ShardedWriter, parse_size
from qkernels import cpu, cpu_quantize

ROOT = Path(__file__).resolve().parents[2]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def tensor_at_a_time(src: Path, out: Path, shard_size: int, double_quant: bool = True) -> None:
    """The weights as the writer before the streaming one made them (5d9419b): each tensor
    quantized by the torch reference and handed to `ShardedWriter.add`, which learns the header
    as it goes and prefixes it when a shard closes."""
    kinds, _ = plan_tensors(open_checkpoint(src), [])
    with ShardedWriter(out, shard_size=shard_size) as writer:
        for name, tensor in iter_checkpoint_tensors(src):
            group = reference(tensor, double_quant=double_quant).to_tensors(name) if kinds[name] == "nf4" else None
            writer.add(group or {name: tensor})
        writer.finish_shards()
        writer.commit()


@pytest.mark.parametrize("shard_size", ["40KB", "5GB"], ids=["many-shards", "one-shard"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipelined_equals_sequential_equals_tensor_at_a_time(tmp_path, shard_size, dtype):
    """The pipeline's whole folder equals the single-threaded run's byte for byte, and its weight
    files and index equal the old writer's; the quant states' lengths vary across the weights, so
    the scan's offsets decided every header entry after the first."""
    src = tiny_llama(tmp_path / "src", hidden=72, intermediate=100, vocab=333, dtype=dtype, layers=3,
                     max_shard_size="60KB")  # fmt: skip
    summary = quantize_checkpoint(src, tmp_path / "piped", progress=False, shard_size=shard_size)
    quantize_checkpoint(src, tmp_path / "seq", progress=False, shard_size=shard_size, pipelined=False)
    piped = folder_bytes(tmp_path / "piped")
    assert piped == folder_bytes(tmp_path / "seq")
    assert (len(summary.shards) > 3) == (shard_size == "40KB")

    tensor_at_a_time(src, tmp_path / "old", parse_size(shard_size))
    old = folder_bytes(tmp_path / "old")
    assert old.keys() == {k for k in piped if k.endswith((".safetensors", ".index.json"))}
    for name, data in old.items():
        assert piped[name] == data, f"{name} differs from the tensor-at-a-time writer's"
    states = [t for n, t in iter_checkpoint_tensors(tmp_path / "piped") if n.endswith("bitsandbytes__nf4")]
    assert len({t.numel() for t in states}) > 1, "every quant state has one length: the scan was not exercised"

    manifest = json.loads(piped["qconvert.json"])
    assert manifest["files"] == {n: sha256_file(tmp_path / "piped" / n) for n in manifest["files"]}
    assert manifest["source"]["files"] == {p.name: sha256_file(p) for p in src.iterdir()
                                           if p.name in manifest["source"]["files"]}  # fmt: skip
    verify_manifest(tmp_path / "piped")
    code, text, err = run_cli("inspect", tmp_path / "piped", "--verify")
    assert code == 0 and "verified" in text, err


@pytest.mark.parametrize("case", ["no-double-quant", "no-extension"])
def test_other_paths_equal_the_tensor_at_a_time_writer(tmp_path, monkeypatch, case):
    """Without double quantization (no offsets to scan for), and with the C++ extension unavailable
    (the scan runs the torch reference to learn each offset)."""
    src = tiny_llama(tmp_path / "src", hidden=72, intermediate=100, vocab=333, layers=2)
    if case == "no-extension":
        monkeypatch.setattr(cpu, "extension_available", lambda: False)
    quantize_checkpoint(src, tmp_path / "piped", progress=False, shard_size="30KB",
                        double_quant=case != "no-double-quant")  # fmt: skip
    tensor_at_a_time(src, tmp_path / "old", parse_size("30KB"), double_quant=case != "no-double-quant")
    piped = folder_bytes(tmp_path / "piped")
    for name, data in folder_bytes(tmp_path / "old").items():
        assert piped[name] == data, f"{name} differs from the tensor-at-a-time writer's"


def test_kernel_capped_between_one_and_all_threads_keeps_the_bytes(tmp_path, monkeypatch):
    """More torch threads than the reader and writer leave (the kernel capped between one and all,
    split into small tasks) and weights whose offsets' means split by thread count (>32768 blocks),
    the scan in its own thread: the pipelined multi-shard run equals the single-threaded one and the
    tensor-at-a-time writer (the reference at torch's thread count), byte for byte."""
    src = tiny_llama(tmp_path / "src", hidden=512, intermediate=4160, vocab=64, layers=1, max_shard_size="3MB")
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        monkeypatch.setattr(cpu_quantize, "PARALLEL_MIN_ELEMENTS", 4096)
        summary = quantize_checkpoint(src, tmp_path / "piped", progress=False, shard_size="2MB")
        quantize_checkpoint(src, tmp_path / "seq", progress=False, shard_size="2MB", pipelined=False)
        tensor_at_a_time(src, tmp_path / "old", parse_size("2MB"))
    finally:
        torch.set_num_threads(saved)
    assert len(summary.shards) > 2
    piped = folder_bytes(tmp_path / "piped")
    assert piped == folder_bytes(tmp_path / "seq")
    for name, data in folder_bytes(tmp_path / "old").items():
        assert piped[name] == data, f"{name} differs from the tensor-at-a-time writer's"


def test_a_weight_larger_than_every_kept_chunk_and_empty_tensors(tmp_path):
    """Kept tensors larger than the read buffers pass through in several chunks; a 0-element kept
    tensor writes nothing; the output equals the sequential run's."""
    src = tiny_llama(tmp_path / "src", hidden=64, intermediate=96, vocab=4001)  # embeddings >> largest linear
    tensors = load_file(src / "model.safetensors")
    tensors["model.extra_empty"] = torch.empty(0, 3, dtype=torch.float16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    quantize_checkpoint(src, tmp_path / "piped", progress=False)
    quantize_checkpoint(src, tmp_path / "seq", progress=False, pipelined=False)
    assert folder_bytes(tmp_path / "piped") == folder_bytes(tmp_path / "seq")
    got = dict(iter_checkpoint_tensors(tmp_path / "piped"))
    assert torch.equal(got["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert got["model.extra_empty"].shape == (0, 3)


def test_tensors_at_offsets_unaligned_to_their_dtype(tmp_path):
    """A 3-byte tensor first in the file leaves every fp16 tensor after it at an odd offset, where
    the source cannot be mapped as fp16 in place (it is copied): same bytes as the old writer."""
    src = tiny_llama(tmp_path / "src", hidden=64, intermediate=96, vocab=101, layers=2)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    with ShardedWriter(tmp_path / "odd", shard_size=parse_size("5GB")) as writer:
        writer.add({"model.odd_flags": torch.tensor([1, 2, 3], dtype=torch.uint8)})
        for name, tensor in tensors.items():
            writer.add({name: tensor})
        writer.finish_shards()
        writer.commit()
    (tmp_path / "odd" / "model.safetensors").rename(src / "model.safetensors")
    infos = open_checkpoint(src).tensors
    assert infos["model.embed_tokens.weight"].start % 2 == 1
    quantize_checkpoint(src, tmp_path / "piped", progress=False)
    quantize_checkpoint(src, tmp_path / "seq", progress=False, pipelined=False)
    tensor_at_a_time(src, tmp_path / "old", parse_size("5GB"))
    piped = folder_bytes(tmp_path / "piped")
    assert piped == folder_bytes(tmp_path / "seq")
    for name, data in folder_bytes(tmp_path / "old").items():
        assert piped[name] == data, f"{name} differs from the tensor-at-a-time writer's"
    verify_manifest(tmp_path / "piped")


# ---------------------------------------------------------------- non-finite source tensors (issue 13, defect 4)


def _poison(src: Path, name: str, value: float, count: int = 100) -> None:
    tensors = load_file(src / "model.safetensors")
    flat = tensors[name].view(-1)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:count]] = value
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("name", "value"),
    [("model.layers.1.self_attn.q_proj.weight", float("nan")), ("model.layers.0.mlp.down_proj.weight", float("inf")),
     ("model.embed_tokens.weight", float("-inf")), ("model.norm.weight", float("nan"))],
    ids=["nan-linear", "inf-linear", "inf-embedding", "nan-norm"],
)  # fmt: skip
def test_nonfinite_source_tensor_is_refused_by_name(tmp_path, name, value):
    src = tiny_llama(tmp_path / "src", hidden=64, intermediate=96, vocab=97)
    _poison(src, name, value, count=1 if "norm" in name else 100)
    assert_fails([src], f"tensor '{name}' has non-finite values", tmp_path / "out")


def test_allow_nonfinite_quantizes_anyway(tmp_path):
    src = tiny_llama(tmp_path / "src", hidden=64, intermediate=96, vocab=97)
    name = "model.layers.1.self_attn.q_proj.weight"
    _poison(src, name, float("nan"))
    code, _, err = run_cli("quantize", src, tmp_path / "out", "--quiet", "--allow-nonfinite")
    assert code == 0, err
    got = dict(iter_checkpoint_tensors(tmp_path / "out"))
    want = reference(load_file(src / "model.safetensors")[name]).to_tensors(name)
    for key, tensor in want.items():
        assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert json.loads(bytes(got[f"{name}.quant_state.bitsandbytes__nf4"].tolist()))["nested_offset"] != 0.0


# ---------------------------------------------------------------- kill -9 mid-run


def test_kill_9_mid_write_leaves_no_out(tmp_path):
    """SIGKILL while the first shard is being written (its header and some data on disk): OUT never
    appears; only the temp folder of the dead process remains."""
    src = tiny_llama(tmp_path / "src", hidden=512, intermediate=1536, layers=8, vocab=1001)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from qconvert.cli import main; main(sys.argv[1:])", "quantize", str(src), str(out), "--quiet",
                             "--shard-size", "20MB"], env=env, stderr=subprocess.PIPE)  # fmt: skip
    shard = out.parent / f"{out.name}.tmp-{proc.pid}" / "shard-00001.safetensors"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if shard.is_file() and shard.stat().st_size > 0:
            os.kill(proc.pid, signal.SIGSTOP)
            break
        time.sleep(0.0005)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    written = shard.stat().st_size
    header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    entries = json.loads(shard.read_bytes()[8:header])
    planned = header + max(e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__")
    assert 0 < written < planned, "killed with the shard complete: not mid-write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


def test_cli_hashes_the_source_before_torch_is_imported(tmp_path):
    """`qconvert quantize` on a sharded local folder starts the sha256 of its shards, index and
    config.json before anything imports torch (SRC's eager callback), and the manifest records
    exactly `sha256_file` of every source file (shards, index, config, tokenizer files)."""
    src = tiny_llama(tmp_path / "src", hidden=72, intermediate=100, vocab=333, layers=3, max_shard_size="60KB")
    out = tmp_path / "out"
    probe = ("import sys\n"
             "import qformats.manifest as m\n"
             "init = m.BackgroundSha256.__init__\n"
             "def spy(self, paths, *a, **k):\n"
             "    paths = list(paths)\n"
             "    print('hashing', 'torch' in sys.modules, sorted(p.name for p in paths), file=sys.stderr)\n"
             "    init(self, paths, *a, **k)\n"
             "m.BackgroundSha256.__init__ = spy\n"
             "from qconvert.cli import main\n"
             "main(sys.argv[1:])\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", probe, "quantize", str(src), str(out), "--quiet"], check=False, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("hashing")]
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1
    assert line == f"hashing False {sorted([*shards, 'config.json', 'model.safetensors.index.json'])}"
    manifest = json.loads((out / "qconvert.json").read_text())
    assert manifest["source"]["files"] == {n: sha256_file(src / n) for n in manifest["source"]["files"]}
    assert set(shards) | {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(
        manifest["source"]["files"]
    )


def test_console_script_skips_finalization_only_after_success(tmp_path):
    """The `qconvert` console script ends a successful quantize with os._exit (Python's finalization
    after torch takes ~0.5 s): every output byte is already on disk (the folder equals an in-process
    run's, the manifest verifies) and stdout is flushed. A failed run still exits normally, with
    one line and status 1."""
    src = tiny_llama(tmp_path / "src", hidden=72, intermediate=100, vocab=333, layers=2)
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('finalized', file=sys.stderr))\n"
             "from qconvert.cli import run\n"
             "sys.argv[0] = 'qconvert'\n"
             "run()\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def console(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe, *argv], check=False, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    ok = console("quantize", str(src), str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "finalized" not in ok.stderr
    assert ok.stdout.startswith("quantized ") and ok.stdout.endswith("\n")
    verify_manifest(tmp_path / "out")
    quantize_checkpoint(src, tmp_path / "in-process", progress=False)
    weights = lambda folder: {k: v for k, v in folder_bytes(folder).items() if k.endswith(".safetensors")}
    assert weights(tmp_path / "out") == weights(tmp_path / "in-process")

    bad = console("quantize", str(tmp_path / "missing"), str(tmp_path / "out2"))
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-2:] == [bad.stderr.splitlines()[-2], "finalized"]
    assert bad.stderr.splitlines()[-2].startswith("error: ")
    assert not (tmp_path / "out2").exists()


def test_pipeline_threads_scheduled_late_still_finish(tmp_path, monkeypatch):
    """The scan and reader threads iterate the plan and the source, never the queues the main loop
    reads: on a loaded machine a thread may first run after the main loop has begun (here each starts
    0.3 s late). A reader that found the main loop's queue in its place waited on itself forever
    (seen with 500MB shards of a 1.5B model while other jobs ran)."""
    from qconvert import quantize_stream

    thread = quantize_stream._Pipe.thread

    def late(self, fn, name):
        return thread(self, lambda: (time.sleep(0.3), fn()), name)

    monkeypatch.setattr(quantize_stream._Pipe, "thread", late)
    src = tiny_llama(tmp_path / "src", hidden=72, intermediate=100, vocab=333, layers=2, max_shard_size="60KB")
    done = []
    runner = threading.Thread(target=lambda: done.append(
        quantize_checkpoint(src, tmp_path / "out", progress=False, shard_size="40KB")), daemon=True)  # fmt: skip
    runner.start()
    runner.join(timeout=120)
    assert done, "the pipeline deadlocked"
    quantize_checkpoint(src, tmp_path / "seq", progress=False, shard_size="40KB", pipelined=False)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "seq")
