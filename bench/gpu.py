"""The one GPU check: every Triton kernel against the reference, then the GEMV/GEMM, batched-LoRA and decode tables.

    python bench/gpu.py                 # on a CUDA machine: checks, then the tables (a few minutes on one GPU)
    python bench/gpu.py --section nf4   # only the NF4 checks and table (or: lora, decode)
    python bench/gpu.py --tune          # also sweep the fused kernel's tiles for M <= 16
    python bench/gpu.py --dry-run       # anywhere: the same code under TRITON_INTERPRET=1, on the CPU, tiny shapes

Without CUDA (and without --dry-run) it exits 2 with one line. It prints the machine, shapes and peer
settings first; table rows are ready for bench/RESULTS.md. Decode: see bench/gpu_decode.py (in
--dry-run our NF4 linears take the C++ CPU kernels there: only the kernel tables run Triton).

Method: every kernel is first checked on fresh random data against `qformats.nf4` (dequantize
bit-identical; matmuls within one rounding of the output dtype). Times are CUDA-event medians of
--runs calls, each call on a different copy of the weight and x, with copies totalling more than
twice the L2 cache, so weights come from HBM as in a real decode step. Achieved GB/s counts the
bytes a kernel must move (packed weight + scale codes + x + y); it is compared with a
device-to-device copy (read + write) measured in the same run. The baseline is torch bf16
`F.linear` on the dequantized weight (cuBLAS), with the same rotation. Output: markdown rows for
bench/RESULTS.md, with the date and the card.

Batched LoRA: the LoRA term alone (y += each row's adapter term, in place), T rows spread
round-robin over n adapters, the Triton gather kernels (`MultiLoRALinear.add_gathered`) vs the
torch path `MultiLoRALinear` takes on CPU (two matmuls over the stacked adapters present with a
rank mask; plain matmuls when every row shares one adapter). Checked first against an fp64
product on fresh random data (adapters of mixed ranks, rows with none); timed with copies of the
adapters totalling > 2x L2, as above.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

# [out, in]: Llama-3-8B q/o_proj, down_proj, gate/up_proj; Llama-3-70B down_proj
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
ROWS = (1, 16, 512)
DRY_SHAPES = [(33, 130)]  # odd: a partial last block, and rows that straddle blocks
DRY_ROWS = (1, 5, 20)
LORA_SHAPES = [(4096, 4096), (14336, 4096)]  # [out, in]: the 4096 -> 4096 and 4096 -> 14336 linears
LORA_ROWS, LORA_ADAPTERS, LORA_RANKS = (1, 16, 64), (1, 4, 16), (16, 64)
DRY_LORA_SHAPES, DRY_LORA_ROWS, DRY_LORA_ADAPTERS, DRY_LORA_RANKS = [(40, 96)], (1, 5), (1, 3), (16,)


def check_kernels(shapes, rows, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Every kernel against the torch reference on fresh random data; one line per check."""
    from qformats.nf4 import dequantize_nf4, quantize_nf4
    from qkernels import triton_nf4

    lines = []
    g = torch.Generator(device=device).manual_seed(int(time.time()))
    for n, k in shapes:
        for blocksize, dq in ((64, True), (128, False)):
            w = quantize_nf4(torch.randn(n, k, device=device, generator=g, dtype=dtype), blocksize, dq)
            for out_dtype in (torch.float16, torch.bfloat16):
                ok = torch.equal(triton_nf4.dequantize(w, out_dtype), dequantize_nf4(w, out_dtype))
                lines.append(f"dequantize {n}x{k} bs{blocksize} dq={dq} -> {out_dtype}: {'ok' if ok else 'FAIL'}")
            wref = dequantize_nf4(w, dtype).float()
            w_abs = wref.abs().t()
            for m in rows:
                x = torch.randn(m, k, device=device, generator=g).to(dtype)
                ref = x.float() @ wref.t()
                # Two roundings to dtype at most (cuBLAS may reduce split-K partial sums in bf16),
                # relative to the result; plus fp32 accumulation error.
                bound = 2 * ref.abs() * torch.finfo(dtype).eps + (x.float().abs() @ w_abs) * 2**-18 + 1e-3
                for name, fn in (("fused", triton_nf4.fused_matmul), ("dequant+mm", triton_nf4.dequant_matmul)):
                    if name == "fused" and m > 64:
                        continue
                    err = (fn(x, w).float() - ref).abs()
                    ok = bool((err <= bound).all())
                    lines.append(f"{name} {n}x{k} M={m} bs{blocksize} dq={dq}: "
                                 f"max err {err.max().item():.3g} {'ok' if ok else 'FAIL'}")  # fmt: skip
    return lines


class Timer:
    """CUDA events on a GPU; perf_counter (after a sync) for --dry-run on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median_us(self, fn, runs: int) -> float:
        for _ in range(3 if self.cuda else 1):
            fn()
        times = []
        for _ in range(runs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)


def rotation(make, nbytes: int, cache_bytes: int):
    """Copies of an operand totalling > 2x the cache, handed out round-robin."""
    copies = [make() for _ in range(max(2, 2 * cache_bytes // max(nbytes, 1) + 1))]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_copy


def copy_bandwidth(timer: Timer, device: torch.device, nbytes: int, runs: int) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer.median_us(lambda: dst.copy_(src), runs)
    return 2 * nbytes / us / 1e3


def nf4_linear_op(device: torch.device):
    """The NF4 linear that serving calls: `qkernels.ops.nf4_linear` on a GPU (it launches the Triton kernels);
    in --dry-run the Triton function it launches there, since ops sends CPU tensors to the C++ kernels."""
    if device.type == "cuda":
        from qkernels.ops import nf4_linear

        return nf4_linear
    from qkernels import triton_nf4

    return triton_nf4.linear


def nf4_bytes(w, m: int, k: int, n: int, x_bytes: int = 2) -> int:
    scales = w.absmax.numel() * w.absmax.element_size()
    return w.packed.numel() + scales + m * k * x_bytes + m * n * x_bytes


def bench(shapes, rows, device: torch.device, runs: int, tune: bool, out=print) -> None:
    from qformats.nf4 import quantize_nf4

    timer = Timer(device)
    cache, card = l2_bytes(device), card_name(device)
    copy_gbs = copy_bandwidth(timer, device, max(1 << 20, 8 * cache), runs)
    date = time.strftime("%Y-%m-%d")
    out(f"\n{date}, {card}, torch {torch.__version__}; device-to-device copy: {copy_gbs:.0f} GB/s\n")
    out("| date | card | N x K | M | path | nf4 us | bf16 F.linear us | speedup | nf4 GB/s | % of copy |"
        " fused us | dequant+mm us |")  # fmt: skip
    out("|---|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        bench_shape(quantize_nf4(torch.randn(n, k, device=device, generator=g, dtype=torch.bfloat16)), rows, timer,
                    cache, runs, tune, f"| {date} | {card} ", copy_gbs, out)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_shape(w, rows, timer: Timer, cache: int, runs: int, tune: bool, prefix: str, copy_gbs: float, out) -> None:
    """The rows of one weight shape: ours (the path `linear` picks, and both paths) vs bf16 cuBLAS."""
    from qformats.nf4 import dequantize_nf4
    from qkernels import triton_nf4

    n, k = w.shape
    device = w.packed.device
    wbf = dequantize_nf4(w, torch.bfloat16)
    next_w = rotation(lambda: replace(w, packed=w.packed.clone(), absmax=w.absmax.clone()), w.packed.numel(), cache)
    next_wbf = rotation(wbf.clone, wbf.numel() * 2, cache)
    del wbf
    for m in rows:
        next_x = rotation(lambda m=m: torch.randn(m, k, device=device, dtype=torch.bfloat16), m * k * 2, cache)

        def time_it(fn, next_x=next_x):
            return timer.median_us(lambda: fn(next_x(), next_w()), runs)

        t_ours = time_it(nf4_linear_op(device))
        t_bf16 = timer.median_us(lambda next_x=next_x: F.linear(next_x(), next_wbf()), runs)
        t_fused = time_it(triton_nf4.fused_matmul) if m <= 512 else None
        t_deq = time_it(triton_nf4.dequant_matmul)
        path = "fused" if m <= triton_nf4.TRITON_FUSED_MAX_M else "dequant+mm"
        gbs = nf4_bytes(w, m, k, n) / t_ours / 1e3
        fused = f"{t_fused:.1f}" if t_fused is not None else "-"
        out(f"{prefix}| {n}x{k} | {m} | {path} | {t_ours:.1f} | {t_bf16:.1f} | {t_bf16 / t_ours:.2f}x "
            f"| {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {fused} | {t_deq:.1f} |")  # fmt: skip
    if tune:
        tune_fused(timer, w, next_w, k, device, runs, out)


def tune_fused(timer: Timer, w, next_w, k: int, device: torch.device, runs: int, out) -> None:
    """The fused kernel's tile/split-K sweep for decode rows; prints the best config per M."""
    from qkernels import triton_nf4

    for m in (1, 16):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        best = None
        configs = [({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, warps)
                   for bn in (32, 64, 128) for bk in (128, 256) for split in (1, 2, 4, 8) for warps in (4, 8)]  # fmt: skip
        for cfg, warps in configs:

            def call(cfg=cfg, warps=warps, x=x):
                return triton_nf4.fused_matmul(x, next_w(), config=cfg, num_warps=warps)

            t = timer.median_us(call, max(5, runs // 4))
            if best is None or t < best[0]:
                best = (t, cfg, warps)
        default = triton_nf4.fused_config(m, w.shape[0], k, device)
        out(f"  tune {w.shape[0]}x{k} M={m}: best {best[0]:.1f} us with {best[1]} num_warps={best[2]}; "
            f"default {default}")  # fmt: skip


def lora_layers(rows, n_out: int, n_in: int, ranks, device: torch.device, dtype: torch.dtype, g):
    """Two MultiLoRALinear over the same random adapters (ids 1..n): the gathered one and the torch one."""
    from qserve.lora import MultiLoRALinear

    base = torch.nn.Linear(n_in, n_out, bias=False, device="meta")  # never called: only the LoRA term runs
    gathered, torch_path = MultiLoRALinear(base, rows, gather=True), MultiLoRALinear(base, rows)
    for aid, r in enumerate(ranks, start=1):
        a = torch.randn(r, n_in, device=device, generator=g) / n_in**0.5
        b = torch.randn(n_out, r, device=device, generator=g) / r**0.5
        gathered.add_adapter(aid, a.to(dtype), b.to(dtype))
    for aid, (a, b) in gathered.adapters.items():  # views of the gathered stack: the same weights
        torch_path.add_adapter(aid, a, b)
    return gathered, torch_path


def check_batched_lora(shapes, device: torch.device) -> list[str]:
    """The Triton path and the torch path against an fp64 product: mixed ranks, rows with no adapter."""
    from qserve.lora import RowAdapters

    lines = []
    g = torch.Generator(device=device).manual_seed(int(time.time()))
    for n, k in shapes:
        for dtype in (torch.bfloat16, torch.float16):
            rows = RowAdapters()
            ranks = (16, 64, 8)
            gathered, torch_path = lora_layers(rows, n, k, ranks, device, dtype, g)
            for t in (1, 5, 20) if device.type == "cpu" else (1, 16, 64):
                ids = [i % (len(ranks) + 1) for i in range(1, t + 1)]  # 0: no adapter
                x = torch.randn(t, k, device=device, generator=g).to(dtype)
                y0 = torch.randn(t, n, device=device, generator=g).to(dtype)
                ref, size = y0.double(), y0.double().abs()
                for i, aid in enumerate(ids):
                    if aid:
                        a, b = (w.double() for w in gathered.adapters[aid])
                        ref[i] += (a @ x[i].double()) @ b.t()
                        size[i] += (a.abs() @ x[i].double().abs()) @ b.abs().t()
                eps = torch.finfo(dtype).eps
                rows.set(ids, device)
                with torch.no_grad():
                    ours, theirs = gathered.add_gathered(x, y0.clone()), torch_path.add_lora(x, y0.clone())
                errs = [(y.double() - ref).abs() for y in (ours, theirs)]
                rows.clear()
                # Triton: y rounded once, fp32 sums. Torch path: h, h B^T and the sum each rounded.
                ok = bool((errs[0] <= eps * ref.abs() + size * 2**-18 + 1e-6).all()
                          and (errs[1] <= 4 * eps * size + 1e-6).all())  # fmt: skip
                lines.append(f"batched lora {k}->{n} T={t} ranks {ranks} {dtype}: triton max err "
                             f"{errs[0].max().item():.3g}, torch path {errs[1].max().item():.3g} "
                             f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    return lines


def time_lora_paths(timer: Timer, pairs, t: int, n: int, k: int, device: torch.device, runs: int):
    """Median us of the LoRA term of t rows: the Triton path, then the torch path, layers taken in turn."""
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16)
    y = torch.zeros(t, n, device=device, dtype=torch.bfloat16)
    turn = {"i": 0}

    def pair():
        turn["i"] = (turn["i"] + 1) % len(pairs)
        return pairs[turn["i"]]

    with torch.no_grad():
        for gathered, torch_path in pairs:  # each layer's torch-path stack is built once, as in serving
            gathered.add_gathered(x, y)
            torch_path.add_lora(x, y)
        return (timer.median_us(lambda: pair()[0].add_gathered(x, y), runs),
                timer.median_us(lambda: pair()[1].add_lora(x, y), runs))  # fmt: skip


def bench_batched_lora(shapes, rows_list, adapters_list, ranks, device: torch.device, runs: int, out=print) -> None:
    """The timing table of the LoRA term: Triton gather kernels vs the torch path, bf16."""
    from qserve.lora import RowAdapters

    timer = Timer(device)
    cache, card = l2_bytes(device), card_name(device)
    date = time.strftime("%Y-%m-%d")
    out(f"\nBatched LoRA term, bf16: {date}, {card}, torch {torch.__version__}\n")
    out("| date | card | in -> out | T rows | adapters | rank | triton us | torch path us | speedup |")
    out("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        for rank in ranks:
            for n_adapters in adapters_list:
                rows = RowAdapters()
                nbytes = 2 * n_adapters * rank * (n + k) * 2  # the gathered stack + the torch path's stack
                pairs = [lora_layers(rows, n, k, (rank,) * n_adapters, device, torch.bfloat16, g)
                         for _ in range(min(512, max(2, 2 * cache // nbytes + 1)))]  # fmt: skip
                for t in rows_list:
                    rows.set([1 + i % n_adapters for i in range(t)], device)
                    t_triton, t_torch = time_lora_paths(timer, pairs, t, n, k, device, runs)
                    rows.clear()
                    out(f"| {date} | {card} | {k} -> {n} | {t} | {n_adapters} | {rank} | {t_triton:.1f} "
                        f"| {t_torch:.1f} | {t_torch / t_triton:.2f}x |")  # fmt: skip
                del pairs
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (TRITON_INTERPRET dry run)"


def l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1 << 16


def machine(device: torch.device) -> str:
    """The card (or CPU) and the software the figures depend on, in one line."""
    import platform

    import triton

    soft = f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"
    if device.type != "cuda":
        return f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (dry run); {soft}"
    p = torch.cuda.get_device_properties(device)
    return (f"machine: {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
            f"L2 {p.L2_cache_size / 2**20:.0f} MiB), CUDA {torch.version.cuda}; {soft}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description="Check and time the Triton kernels and decoding on a CUDA GPU.")
    ap.add_argument("--runs", type=int, default=50, help="timed calls per measurement (median)")
    ap.add_argument("--tune", action="store_true", help="also sweep the fused kernel's configs for M = 1 and 16")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: run checks and timing code under TRITON_INTERPRET=1 on tiny shapes")  # fmt: skip
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x28672 (default: the four Llama shapes)")
    ap.add_argument("--rows", default=None, help="comma-separated M values (default 1,16,512)")
    ap.add_argument("--section", choices=("all", "nf4", "lora", "decode"), default="all",
                    help="nf4: the NF4 kernels; lora: the batched-LoRA kernels (--shapes/--rows are nf4's); "
                         "decode: tokens/s of whole models")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlora-gpu-bench"), help="where decode models are made once")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode: tokens per timed generate (default 128)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by qkernels.triton_nf4)
        device, shapes, rows, runs = torch.device("cpu"), DRY_SHAPES, DRY_ROWS, 1
        lora = (DRY_LORA_SHAPES, DRY_LORA_ROWS, DRY_LORA_ADAPTERS, DRY_LORA_RANKS)
        work, new_tokens = args.work / "dry-run", args.new_tokens or 8
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA device here; run it on a GPU machine (or use --dry-run)", file=sys.stderr)
            return 2
        device, shapes, rows, runs = torch.device("cuda"), SHAPES, ROWS, args.runs
        lora = (LORA_SHAPES, LORA_ROWS, LORA_ADAPTERS, LORA_RANKS)
        work, new_tokens = args.work, args.new_tokens or 128
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.rows:
        rows = tuple(int(r) for r in args.rows.split(","))
    sections = {"nf4", "lora", "decode"} if args.section == "all" else {args.section}
    print(machine(device))
    if "nf4" in sections:
        print(f"NF4 shapes [out x in]: {', '.join(f'{n}x{k}' for n, k in shapes)}; M = {', '.join(map(str, rows))}; "
              f"{runs} timed runs each, operands rotated through > 2x L2; peer: torch bf16 F.linear (cuBLAS)")  # fmt: skip
    lines = []
    if "nf4" in sections:
        lines += check_kernels(shapes[:2] if not args.dry_run else shapes, (1, 16, 64) if not args.dry_run else rows,
                               device)  # fmt: skip
    if "lora" in sections:
        lines += check_batched_lora(lora[0], device)
    for line in lines:
        print(line)
    failed = [line for line in lines if not line.endswith("ok")]
    if failed:
        print(f"{len(failed)} checks failed: no timings", file=sys.stderr)
        return 1
    if "nf4" in sections:
        bench(shapes, rows, device, runs, args.tune)
    if "lora" in sections:
        bench_batched_lora(*lora, device, runs)
    if "decode" in sections:
        from gpu_decode import bench_decode  # bench/ is on sys.path when this file runs as a script

        bench_decode(work, device, card_name(device), new_tokens, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
