"""GPU benchmark of the NF4 Triton kernels: check each against the reference, then time it.

    python bench/gpu.py                 # on a CUDA machine: checks, then the timing table
    python bench/gpu.py --tune          # also sweep the fused kernel's tiles for M <= 16
    python bench/gpu.py --dry-run       # anywhere: the same code path under TRITON_INTERPRET=1, tiny shapes

On a machine without CUDA (and without --dry-run) it exits 2 with one line.

Method: every kernel is first checked on fresh random data against `qformats.nf4` (dequantize
bit-identical; matmuls within one rounding of the output dtype). Times are CUDA-event medians of
--runs calls, each call on a different copy of the weight and x, with copies totalling more than
twice the L2 cache, so weights come from HBM as in a real decode step. Achieved GB/s counts the
bytes a kernel must move (packed weight + scale codes + x + y); it is compared with a
device-to-device copy (read + write) measured in the same run. The baseline is torch bf16
`F.linear` on the dequantized weight (cuBLAS), with the same rotation. Output: markdown rows for
bench/RESULTS.md, with the date and the card.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # [out, in]: Llama-3-8B and 70B linears
ROWS = (1, 4, 16, 64, 512, 4096)
DRY_SHAPES = [(40, 96), (33, 130)]
DRY_ROWS = (1, 5, 20)


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
                a = torch.randn(16, k, device=device, generator=g) / 10
                b = (torch.randn(n, 16, device=device, generator=g) / 10).to(dtype)
                xa = F.linear(x.float(), a)
                base, lora = x.float() @ wref.t(), 0.5 * xa @ b.float().t()
                ref = base + lora
                # Two roundings to dtype at most (dequant+mm: matmul, then the LoRA addmm_), each
                # relative to the terms summed; plus fp32 accumulation error.
                size = base.abs() + lora.abs()
                bound = 2 * size * torch.finfo(dtype).eps + (x.float().abs() @ w_abs) * 2**-18 + 1e-3
                for name, fn in (("fused", triton_nf4.fused_matmul), ("dequant+mm", triton_nf4.dequant_matmul)):
                    if name == "fused" and m > 64:
                        continue
                    err = (fn(x, w, None, xa, b, 0.5).float() - ref).abs()
                    ok = bool((err <= bound).all())
                    lines.append(f"{name} {n}x{k} M={m} bs{blocksize} dq={dq} +lora: "
                                 f"max err {err.max().item():.3g} {'ok' if ok else 'FAIL'}")  # fmt: skip
    return lines


class Timer:
    """CUDA events on a GPU; perf_counter (after a sync) for --dry-run on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median_us(self, fn, runs: int) -> float:
        for _ in range(3):
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


def nf4_bytes(w, m: int, k: int, n: int, x_bytes: int = 2) -> int:
    scales = w.absmax.numel() * w.absmax.element_size()
    return w.packed.numel() + scales + m * k * x_bytes + m * n * x_bytes


def bench(shapes, rows, device: torch.device, runs: int, tune: bool, out=print) -> None:
    from qformats.nf4 import quantize_nf4

    timer = Timer(device)
    cache = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1 << 16
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (TRITON_INTERPRET dry run)"
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

        t_ours = time_it(triton_nf4.linear)
        t_bf16 = timer.median_us(lambda next_x=next_x: F.linear(next_x(), next_wbf()), runs)
        t_fused = time_it(triton_nf4.fused_matmul) if m <= 512 else None
        t_deq = time_it(triton_nf4.dequant_matmul)
        path = "fused" if m <= triton_nf4.FUSED_MAX_M else "dequant+mm"
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


def main() -> int:
    ap = argparse.ArgumentParser(description="Check and time the NF4 Triton kernels on a CUDA GPU.")
    ap.add_argument("--runs", type=int, default=50, help="timed calls per measurement (median)")
    ap.add_argument("--tune", action="store_true", help="also sweep the fused kernel's configs for M = 1 and 16")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: run checks and timing code under TRITON_INTERPRET=1 on tiny shapes")  # fmt: skip
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x28672 (default: the four Llama shapes)")
    ap.add_argument("--rows", default=None, help="comma-separated M values (default 1,4,16,64,512,4096)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by qkernels.triton_nf4)
        device, shapes, rows, runs = torch.device("cpu"), DRY_SHAPES, DRY_ROWS, 2
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA device here; run it on a GPU machine (or use --dry-run)", file=sys.stderr)
            return 2
        device, shapes, rows, runs = torch.device("cuda"), SHAPES, ROWS, args.runs
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.rows:
        rows = tuple(int(r) for r in args.rows.split(","))
    lines = check_kernels(shapes[:2] if not args.dry_run else shapes, (1, 16, 64) if not args.dry_run else rows,
                          device)  # fmt: skip
    for line in lines:
        print(line)
    failed = [line for line in lines if not line.endswith("ok")]
    if failed:
        print(f"{len(failed)} checks failed: no timings", file=sys.stderr)
        return 1
    bench(shapes, rows, device, runs, args.tune)
    return 0


if __name__ == "__main__":
    sys.exit(main())
