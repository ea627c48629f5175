"""CPU microbenchmark of the NF4 linear on the SmolLM2-135M shapes, against F.linear on the dequantized weight.

    .venv/bin/python bench/cpu_kernels.py [--threads N] [--rows 1,8,64,256] [--explore] [--training] [--decode]

Columns (microseconds, median of --runs calls; with --threads 1 the thread's CPU time, which
leaves out the time a busy machine gives to other processes, else wall-clock):
  fp32 hot / cold   F.linear on the fp32 weight; "cold" rotates over copies totalling > 2x the L3
                    cache, as in a real decode step where 30 layers of weights cannot stay cached.
  bf16 hot          F.linear with bf16 x and the bf16 weight.
  nf4 hot / cold    qkernels.ops.nf4_linear (the path it picks for that M), fp32 x; cold rotates
                    over copies of the packed weight totalling > 2x L3.
  --explore adds the alternatives that lost: "torch-LUT" (the pure-torch fallback: byte->pair
  table dequantize into scratch + MKL) and "inductor" (a torch.compile'd dequant-GEMV).
The speedups are fp32 / nf4 measured in the same run. Absolute figures on a shared machine are noisy.

--training times the matmuls of a QLoRA step instead (bench/finetune.py's batch, 4 x 256 tokens):
`cpu.linear_fp32` (oneDNN) against `F.linear` (MKL) on the fp32 forward shapes and a 341-row chunk
of the 49152-wide output layer, and the fused LoRA-dropout products (r=16, p=0.05) against the
masked copy + torch matmul they replace.

--decode times every call of a SmolLM2-135M decode step at batch 1 and 8 (--rows) with weights
cold (rotated, as a step streams them from DRAM): the NF4 linears, and the 16-bit output layer (`ops.linear16`). Per call: the bytes it must
read, our time and GB/s, that GB/s as a share of the memory-copy bandwidth measured in the same run
with the same clock (read + write bytes of a 256 MiB copy, as bench/decode.py counts them), and torch's F.linear on the same
shape with the weight in fp32 (4 bytes a weight) and with x and the weight in bf16 (2 bytes), each
with its own GB/s. Also the fixed cost of a call that does no work, and the per-step totals.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from qformats.nf4 import dequantize_nf4, quantize_nf4
from qkernels import cpu, ops
from qkernels.nf4_args import kernel_args

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down of SmolLM2-135M
CACHE_BYTES = 64 << 20  # rotate over more than this (2x a 32 MiB L3)


CLOCK = time.perf_counter  # main() switches to the thread's CPU time when running one thread


def median_us(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return statistics.median(times) * 1e6


def rotating(make, nbytes: int):
    """A call that uses a different copy of the operands each time, so they come from DRAM."""
    copies = [make() for _ in range(max(2, CACHE_BYTES // nbytes + 1))]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_copy


def inductor_gemv():
    """The torch.compile candidate: dequantize in the reduction loop, scales decoded outside."""

    def gemv(x, packed, scales, qmap):
        m, n_blocks, half = x.shape[0], packed.shape[1], packed.shape[2]
        xe = x.view(m, 1, n_blocks, half, 2)
        hi, lo = qmap[(packed >> 4).int()], qmap[(packed & 15).int()]
        return ((xe[..., 0] * hi + xe[..., 1] * lo).sum(-1) * scales).sum(-1)

    torch._dynamo.config.recompile_limit = 64  # one static compile per (shape, M); never fall back to eager
    return torch.compile(gemv, dynamic=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="1,8,64,256", help="comma-separated M values")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--explore", action="store_true", help="also time the torch-LUT fallback and inductor")
    ap.add_argument("--training", action="store_true", help="time the training step's matmuls instead")
    ap.add_argument("--decode", action="store_true", help="time a decode step's calls, GB/s against memory copy")
    ap.add_argument("--parallel-min-weights", type=int, default=cpu.PARALLEL_MIN_WEIGHTS,
                    help="weights from which a call splits over threads (qkernels.cpu.PARALLEL_MIN_WEIGHTS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu.PARALLEL_MIN_WEIGHTS = args.parallel_min_weights
    global CLOCK
    if args.threads == 1:
        # One thread does all the work, so its CPU time is the cost of the call without the time
        # the OS gave to other processes (the figures stay comparable on a shared machine).
        CLOCK = time.thread_time
    if not cpu.extension_available():
        print(f"note: C++ kernels unavailable ({cpu._ext_state.get('error')}); timing the torch fallback")
    clock = "thread CPU time" if args.threads == 1 else "wall clock"
    print(f"torch {torch.__version__}, {args.threads} threads ({clock}), {time.strftime('%Y-%m-%d')}\n")
    if args.training:
        return training_matmuls(args.runs)
    if args.decode:
        return decode_calls([int(r) for r in args.rows.split(",")], args.runs)
    head = "| N x K | M | fp32 hot | fp32 cold | bf16 hot | nf4 hot | nf4 cold | hot speedup | cold speedup |"
    if args.explore:
        head += " torch-LUT hot | inductor hot |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    compiled = inductor_gemv() if args.explore else None
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = quantize_nf4(torch.randn(n, k, generator=g))
        for m in (int(r) for r in args.rows.split(",")):
            print(bench_row(w, torch.randn(m, k, generator=g), args.runs, compiled), flush=True)
    print(decode_step(args.runs))
    print(f"\ncustom-op dispatch overhead per call: {dispatch_overhead_us(args.runs):.1f} us "
          "(why ops.py calls the implementation directly in eager mode)")  # fmt: skip
    return 0


def bench_row(w, x, runs: int, compiled) -> str:
    """One markdown row: the baselines and ours on the same shape, hot and cold."""
    n, k = w.shape
    w32 = dequantize_nf4(w, torch.float32)
    w16, x16 = w32.bfloat16(), x.bfloat16()
    cold32 = rotating(lambda: w32.clone(), w32.numel() * 4)
    cold4 = rotating(lambda: replace(w, packed=w.packed.clone(), absmax=w.absmax.clone()), w.packed.numel())
    t32 = median_us(lambda: F.linear(x, w32), runs)
    t32c = median_us(lambda: F.linear(x, cold32()), runs)
    t16 = median_us(lambda: F.linear(x16, w16), runs)
    t4 = median_us(lambda: ops.nf4_linear(x, w), runs)
    t4c = median_us(lambda: ops.nf4_linear(x, cold4()), runs)
    row = (f"| {n}x{k} | {x.shape[0]} | {t32:.0f} | {t32c:.0f} | {t16:.0f} | {t4:.0f} | {t4c:.0f} | "
           f"{t32 / t4:.2f}x | {t32c / t4c:.2f}x |")  # fmt: skip
    if compiled is not None:
        row += f" {explore_lut(x, w, runs):.0f} | {explore_inductor(compiled, x, w, runs):.0f} |"
    return row


def explore_lut(x, w, runs: int) -> float:
    def lut_path():
        out = cpu._scratch_buffer(w.numel)
        cpu._dequantize_rows_torch(w, 0, w.shape[0], out)
        return F.linear(x, out.view(w.shape))

    return median_us(lut_path, runs)


def explore_inductor(compiled, x, w, runs: int) -> float:
    n, k = w.shape
    w32 = ops.dequantize(w, torch.float32)  # only to check the result below
    args = (x, w.packed.view(n, k // w.blocksize, w.blocksize // 2),
            cpu._absmax_slice(w, 0, w.absmax.numel()).view(n, k // w.blocksize), w.quant_map)  # fmt: skip
    t = time.perf_counter()
    y = compiled(*args)
    compile_s = time.perf_counter() - t
    torch.testing.assert_close(y, F.linear(x, w32), rtol=1e-4, atol=1e-3)
    print(f"  (inductor compile for M={x.shape[0]}: {compile_s:.1f} s)", file=sys.stderr)
    return median_us(lambda: compiled(*args), max(5, runs // 10))


def decode_step(runs: int) -> str:
    """All 210 linears of SmolLM2-135M's 30 layers at M=1, as one decode step sees them (each weight
    read once per token, so from DRAM): NF4 vs the fp32 weights. lm_head (tied, unquantized) is
    the same for both and not included."""
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    g = torch.Generator().manual_seed(1)
    proto = {s: quantize_nf4(torch.randn(*s, generator=g)) for s in set(layer)}
    nf4 = [replace(proto[s], packed=proto[s].packed.clone(), absmax=proto[s].absmax.clone())
           for _ in range(30) for s in layer]  # fmt: skip
    fp32 = [dequantize_nf4(w, torch.float32) for w in nf4]
    xs = {k: torch.randn(1, k, generator=g) for k in (576, 1536)}
    t4 = median_us(lambda: [ops.nf4_linear(xs[w.shape[1]], w) for w in nf4], max(5, runs // 5))
    t32 = median_us(lambda: [F.linear(xs[w.shape[1]], w) for w in fp32], max(5, runs // 5))
    return (f"\nSmolLM2-135M decode step, 210 linears at M=1 (excl. lm_head): nf4 {t4 / 1e3:.1f} ms, "
            f"fp32 F.linear {t32 / 1e3:.1f} ms ({t32 / t4:.2f}x)")  # fmt: skip


DECODE_CALLS = {"q, o": [(576, 576)], "k, v": [(192, 576)], "gate, up": [(1536, 576)], "down": [(576, 1536)],
                "q+k+v (3 calls)": [(576, 576), (192, 576), (192, 576)]}
OUTPUT_LAYER = (49152, 576)  # SmolLM2's tied embedding


def nf4_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in (w.packed, w.absmax, w.nested_absmax) if t is not None)


def decode_calls(rows: list[int], runs: int) -> int:
    copy = copy_gbs()
    print(f"memory copy: {copy:.1f} GB/s (read + write bytes of a 256 MiB copy, same clock)\n")
    print(fixed_cost(runs))
    print("\n| call | M | MB read | ours us | ours GB/s (of copy) | fp32 F.linear us (GB/s) | bf16 F.linear us (GB/s) |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(4)
    for name, shapes in DECODE_CALLS.items():
        ws = [quantize_nf4(torch.randn(*s, generator=g)) for s in shapes]
        nbytes = sum(map(nf4_bytes, ws))
        ours = nf4_call(ws)
        for m in rows:
            print(decode_row(name, m, shapes, nbytes, ours, copy, runs), flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.randn(*OUTPUT_LAYER, generator=g).to(dtype)
        name = f"output layer {dtype}".replace("torch.", "")
        for m in rows:
            print(decode_row(name, m, [OUTPUT_LAYER], w.numel() * 2, linear16_call(w), copy, max(5, runs // 10)),
                  flush=True)  # fmt: skip
    return 0


def copy_gbs() -> float:
    """(read + write bytes) / time of a 256 MiB copy, timed with the clock of the calls (bench/decode.py's
    figure is wall time, which a loaded machine stretches while a thread's CPU time does not)."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_us(lambda: dst.copy_(src), 5) / 1e3


def nf4_call(ws: list):
    """Our calls on cold copies of the weights: one nf4_linear each."""
    cold = rotating(lambda: [replace(w, packed=w.packed.clone(), absmax=w.absmax.clone()) for w in ws],
                    sum(map(nf4_bytes, ws)))  # fmt: skip
    return lambda x: [ops.nf4_linear(x, w) for w in cold()]


def linear16_call(w: torch.Tensor):
    cold = rotating(lambda: w.clone(), w.numel() * 2)
    return lambda x: ops.linear16(x, cold())


def decode_row(name: str, m: int, shapes, nbytes: int, ours, copy: float, runs: int) -> str:
    """Ours against torch's fp32 and bf16 F.linear on the same shapes, every weight cold."""
    k = shapes[0][1]
    x = torch.randn(m, k)
    fp32 = rotating(lambda: [torch.randn(*s) for s in shapes], sum(n * kk * 4 for n, kk in shapes))
    bf16 = rotating(lambda: [torch.randn(*s).bfloat16() for s in shapes], sum(n * kk * 2 for n, kk in shapes))
    t_ours = median_us(lambda: ours(x), runs)
    t32 = median_us(lambda: [F.linear(x, w) for w in fp32()], runs)
    x16 = x.bfloat16()
    t16 = median_us(lambda: [F.linear(x16, w) for w in bf16()], runs)
    gbs = nbytes / t_ours / 1e3
    weights = sum(n * kk for n, kk in shapes)
    return (f"| {name} | {m} | {nbytes / 1e6:.3f} | {t_ours:.1f} | {gbs:.1f} ({gbs / copy:.0%}) | "
            f"{t32:.1f} ({weights * 4 / t32 / 1e3:.1f}) | {t16:.1f} ({weights * 2 / t16 / 1e3:.1f}) |")  # fmt: skip


def fixed_cost(runs: int) -> str:
    """What a call costs when it does (almost) no work: an 8 x 64 weight, one row of x."""
    w = quantize_nf4(torch.randn(8, 64))
    x, args = torch.randn(1, 64), kernel_args(w)
    raw = median_us(lambda: torch.ops.qkernels_cpu.gemm(x, *args, cpu.PARALLEL_MIN_WEIGHTS), runs * 20)
    one = median_us(lambda: ops.nf4_linear(x, w), runs * 20)
    return f"fixed cost of a call (8 x 64 weight, M=1): C++ op alone {raw:.1f} us, ops.nf4_linear {one:.1f} us"


def training_matmuls(runs: int) -> int:
    from qkernels.cpu_allocator import caching_allocator

    caching_allocator().__enter__()  # as in training, for the rest of this run: no page faults on every fresh output
    g = torch.Generator().manual_seed(2)
    print("| matmul | torch us | ours us | speedup |")
    print("|---|---|---|---|")
    for m, k, n in [(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (1024, 576, 192), (341, 576, 49152)]:
        print(forward_row(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), runs), flush=True)
    for k in (576, 1536):
        for row in lora_rows(*(torch.randn(*s, generator=g) for s in ((1024, k), (16, k), (1024, 16), (1024, k))), runs):
            print(row, flush=True)
    return 0


def forward_row(x: torch.Tensor, w: torch.Tensor, runs: int) -> str:
    t_mkl = median_us(lambda: F.linear(x, w), max(5, runs // 5))
    t_ours = median_us(lambda: cpu.linear_fp32(x, w), max(5, runs // 5))
    shape = f"{x.shape[0]} x {x.shape[1]} -> {w.shape[0]}"
    return f"| forward {shape} | {t_mkl:.0f} (MKL) | {t_ours:.0f} (oneDNN) | {t_mkl / t_ours:.2f}x |"


def lora_rows(x: torch.Tensor, a: torch.Tensor, gu: torch.Tensor, y: torch.Tensor, runs: int) -> list[str]:
    seed, p = 12345, 0.05
    pairs = [("LoRA down: dropout(x) @ A.T", lambda: ops.dropout_apply(x, seed, p) @ a.t(),
              lambda: ops.lora_down(x, a, seed, p, 1.0)),
             ("LoRA grad A: gu.T @ dropout(x)", lambda: gu.t() @ ops.dropout_apply(x, seed, p),
              lambda: ops.lora_grad_a(gu, x, seed, p, 1.0)),
             ("LoRA dx: y += dropout(gu @ A)", lambda: ops.dropout_add_(y, gu @ a, seed, p),
              lambda: ops.lora_up_add_(y, gu, a, seed, p))]  # fmt: skip
    out = []
    for name, unfused, fused in pairs:
        t0, t1 = median_us(unfused, runs), median_us(fused, runs)
        what = f"{name}, {x.shape[0]} x {x.shape[1]}, r={a.shape[0]}"
        out.append(f"| {what} | {t0:.0f} (masked copy + MKL) | {t1:.0f} (fused C++) | {t0 / t1:.2f}x |")
    return out


def dispatch_overhead_us(runs: int) -> float:
    w = quantize_nf4(torch.randn(64, 64))
    x = torch.randn(1, 64)
    through_op = median_us(lambda: torch.ops.qkernels.nf4_linear(x, *kernel_args(w), None), runs * 10)
    direct = median_us(lambda: ops.nf4_linear(x, w), runs * 10)
    return through_op - direct


if __name__ == "__main__":
    sys.exit(main())
