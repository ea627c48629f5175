"""The CPU path for NF4 compute: a fused C++ dequant-GEMM for decode, dequantize + BLAS for the rest.

Regimes (measured by bench/cpu_kernels.py on the SmolLM2 shapes):
- `M <= CPU_FUSED_MAX_M` rows of x (decode), AVX2, K % 32 == 0: `qkernels_cpu.gemm` (cpu_nf4.cpp)
  reads each packed byte once, decodes nibbles in registers (AVX-512, rows of whole blocks: one
  vpermps from the 16 code values times the block scale; otherwise four vpshufb byte-plane
  lookups), undoes double quantization on the fly and accumulates in fp32. Nothing the size of the
  weight is ever written, so decode reads 0.5 bytes per weight instead of fp32's 4.
- more rows (prefill, training): the weight is dequantized chunk by chunk into a reusable fp32
  scratch buffer and multiplied (oneDNN for a whole weight, MKL for the chunks of one over 16 MiB).

The C++ files (these kernels; cpu_quantize.cpp, the fused NF4 quantizer behind
qkernels/cpu_quantize.py; cpu_caching_allocator.cpp, the training allocator behind
qkernels/cpu_allocator.py; cpu_lora_dropout.cpp, the seeded LoRA dropout behind
qkernels/lora_dropout.py) are compiled into one extension, once per machine and torch version, with
`torch.utils.cpp_extension` (gcc) into
`$TORCH_EXTENSIONS_DIR/qkernels/` (default `~/.cache/torch_extensions/qkernels/`). Without a
compiler, or with `QKERNELS_CPU_EXT=0`, a pure-torch path runs instead: a 256-entry byte ->
(high, low) value table dequantizes chunks into the same scratch buffer. Every dequantized weight
is bit-identical to `qformats.nf4.dequantize_nf4` in fp32; results differ from the reference only
by fp32 summation order (and, for bf16/fp16 x, by not rounding W to x's dtype before the matmul:
the product is computed in fp32, then rounded once).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qformats.nf4 import NF4Weight, dequantize_absmax, valid_blocksize
from qkernels import lora_dropout
from qkernels.nf4_args import kernel_args

CPU_FUSED_MAX_M = 16  # rows of x up to which the fused kernel beats dequantize + MKL (bench/cpu_kernels.py)
# Weights per thread task in the C++ kernels (32 KiB of NF4 codes): a decode step's GEMVs are
# memory-bound, so splitting even SmolLM2-135M's small linears over the cores pays on an idle machine
# (bench/decode.py, bench/cpu_kernels.py --decode --parallel-min-weights). The cost: on an
# oversubscribed machine a fork waits for every thread to be scheduled. Set 0 to always split.
PARALLEL_MIN_WEIGHTS = 1 << 16
_CHUNK_ELEMS = 1 << 22  # scratch buffer cap: 16 MiB of fp32 weight per chunk
_SOURCES = [Path(__file__).with_name(f) for f in ("cpu_nf4.cpp", "cpu_nf4_avx512.cpp", "cpu_linear16.cpp",
                                                  "cpu_quantize.cpp", "cpu_caching_allocator.cpp",
                                                  "cpu_lora_dropout.cpp", "cpu_decode.cpp",
                                                  "cpu_decode_stack.cpp")]  # fmt: skip
# Hashed with the sources: a new header is a new build.
_HEADERS = [Path(__file__).with_name(f) for f in ("cpu_nf4.h", "cpu_decode.h")]
# The fused kernel's fast loop needs AVX2 and K % 32 == 0; its portable fallback is element by
# element, slower than dequantize + BLAS, so other CPUs and shapes take that path instead.
_SIMD = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")

_ext_lock = threading.Lock()
_ext_state: dict[str, object] = {}  # "ok": bool, "error": str
_scratch = threading.local()


def _build_flags() -> list[str]:
    # AVX2+FMA code when torch itself runs AVX2 kernels here (AVX-512 where it runs those: the NF4
    # decode kernel's 16-entry lookup is then one vpermps); otherwise the portable scalar code.
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return ["-O3", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
                "-ffp-contract=off", "-fopenmp"]  # fmt: skip
    if cap == "AVX2":
        return ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
    return ["-O3", "-ffp-contract=off", "-fopenmp"]


def extension_available() -> bool:
    """Load (building once if needed) the C++ kernels; False, with one warning, if that fails."""
    if "ok" in _ext_state:
        return bool(_ext_state["ok"])
    with _ext_lock:
        if "ok" in _ext_state:
            return bool(_ext_state["ok"])
        if os.environ.get("QKERNELS_CPU_EXT", "1") == "0":
            _ext_state.update(ok=False, error="disabled by QKERNELS_CPU_EXT=0")
            return False
        try:
            _load_extension()
            _ext_state["ok"] = True
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:  # no compiler, a build error
            _ext_state.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0])
            warnings.warn(f"qkernels: the NF4 CPU kernels could not be built ({_ext_state['error']}); "
                          "using the slower pure-torch path", stacklevel=3)  # fmt: skip
    return bool(_ext_state["ok"])


def _load_extension() -> None:
    flags = _build_flags()
    sources = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    key = hashlib.sha256(sources + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()
    name = f"qkernels_cpu_{key[:12]}"  # a new name for every source/flags/torch: never a stale .so
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build_dir = root / "qkernels" / name
    so = build_dir / f"{name}.so"
    if so.exists():
        torch.ops.load_library(str(so))
        return
    # Imported only to build: it imports setuptools, a third of a second of every command's start.
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    print("qkernels: compiling the NF4 CPU kernels (once per machine, about a minute)...", file=sys.stderr)
    cpp_extension.load(name, [str(p) for p in _SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       build_directory=str(build_dir), is_python_module=False)  # fmt: skip


def supports(w: NF4Weight) -> bool:
    """Whether the C++ kernels take this weight (they divide by shifts: power-of-two blocksizes), with
    the extension built; otherwise the pure-torch path of this module runs."""
    nested_pow2 = w.nested_blocksize > 0 and w.nested_blocksize & (w.nested_blocksize - 1) == 0
    return valid_blocksize(w.blocksize) and nested_pow2 and extension_available()


def _scratch_buffer(numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer reused across calls (a fresh 10 MB allocation page-faults every time)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, writable in and outside inference mode
            buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def _pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    """[256, 2] fp32: the (high nibble, low nibble) values of every byte."""
    b = torch.arange(256, device=quant_map.device)
    return torch.stack([quant_map[b >> 4], quant_map[b & 15]], dim=1)


def _dequantize_rows_torch(w: NF4Weight, row0: int, rows: int, out: torch.Tensor) -> None:
    """The pure-torch fallback of the C++ `dequantize`: rows [row0, row0+rows) as fp32 into out."""
    K, bs = w.shape[1], w.blocksize
    start, stop = row0 * K, (row0 + rows) * K
    b0, b1 = start // bs, -(-stop // bs)
    lo, hi = b0 * bs, min(b1 * bs, w.numel)  # the whole blocks that cover the rows
    pairs = _pair_table(w.quant_map)[w.packed.reshape(-1)[lo // 2 : -(-hi // 2)].long()].reshape(-1)
    vals = F.pad(pairs[lo % 2 : lo % 2 + hi - lo], (0, (b1 - b0) * bs - (hi - lo))).view(b1 - b0, bs)
    vals = vals * _absmax_slice(w, b0, b1).unsqueeze(1)
    out.reshape(-1)[: stop - start].copy_(vals.reshape(-1)[start - lo : stop - lo])


def _absmax_slice(w: NF4Weight, b0: int, b1: int) -> torch.Tensor:
    """fp32 scales of blocks [b0, b1), decoded by the reference (from a nested-block boundary)."""
    if not w.double_quant:
        return w.absmax[b0:b1].float()
    a0 = b0 - b0 % w.nested_blocksize
    sub = replace(w, absmax=w.absmax[a0:b1], nested_absmax=w.nested_absmax[a0 // w.nested_blocksize :])
    return dequantize_absmax(sub)[b0 - a0 :]


def dequantize_rows(w: NF4Weight, row0: int, rows: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [row0, row0+rows) of W as fp32, written into `out` (>= rows*K elements); returns [rows, K]."""
    K = w.shape[1]
    if supports(w):
        torch.ops.qkernels_cpu.dequantize(*kernel_args(w)[:8], K, row0, rows, out, PARALLEL_MIN_WEIGHTS)
    else:
        _dequantize_rows_torch(w, row0, rows, out)
    return out.reshape(-1)[: rows * K].view(rows, K)


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole weight, bit-identical to `qformats.nf4.dequantize_nf4(w, dtype)`."""
    n = w.numel
    K = w.shape[-1] if len(w.shape) > 1 else n
    rows = n // K
    out = torch.empty(n, dtype=torch.float32)
    dequantize_rows(replace(w, shape=(rows, K)), 0, rows, out)
    return out.view(w.shape).to(dtype or w.dtype)


@functools.cache
def _onednn_linear_works() -> bool:
    """Probed on first use (not at import: serving and the CLIs import this module)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [], "").eq(3).all())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.T` for x [M, K], w [N, K] (no autograd); anything but fp32 CPU matrices goes to `F.linear`.

    Through oneDNN where torch has it: it runs the wide output layer and the gate/up projections of
    training faster than torch's MKL sgemm (which `F.linear` calls) and the other shapes about as
    fast (bench/cpu_kernels.py --training; figures in bench/RESULTS.md).
    """
    fp32_cpu = x.is_cpu and w.is_cpu and x.dtype == w.dtype == torch.float32
    if fp32_cpu and x.dim() == 2 and x.shape[0] > CPU_FUSED_MAX_M and _onednn_linear_works():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), None, "none", [], "")
    return F.linear(x, w)


def _dequant_matmul(xf: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """fp32 x [M, K] @ W.T through a scratch buffer of at most _CHUNK_ELEMS weights."""
    N, K = w.shape
    return _chunked_matmul(xf, N, K, lambda n0, r, buf: dequantize_rows(w, n0, r, buf))


def _chunked_matmul(xf: torch.Tensor, N: int, K: int, rows_fp32) -> torch.Tensor:
    """fp32 x [M, K] @ W.T for a W [N, K] that `rows_fp32(n0, r, buf)` writes as fp32 rows into buf."""
    rows = max(1, _CHUNK_ELEMS // K)
    if rows >= N:
        return linear_fp32(xf, rows_fp32(0, N, _scratch_buffer(N * K)))
    yt = torch.empty(N, xf.shape[0], dtype=torch.float32)  # y transposed: each chunk is contiguous rows
    buf = _scratch_buffer(rows * K)
    for n0 in range(0, N, rows):
        r = min(rows, N - n0)
        torch.mm(rows_fp32(n0, r, buf), xf.t(), out=yt[n0 : n0 + r])
    return yt.t().contiguous()


def linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` in fp32, returned in x's dtype.

    No autograd here (the C++ ops have none, and the scratch buffer is reused): `qkernels.ops`
    calls this only when nothing needs a gradient, or from inside its custom op, below autograd.
    A decode step makes ~200 of these calls, so the Python here is kept to the minimum.
    """
    N, K = w.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if M <= CPU_FUSED_MAX_M and K % 32 == 0 and _SIMD and supports(w):
        y = torch.ops.qkernels_cpu.gemm.default(x2, *kernel_args(w), PARALLEL_MIN_WEIGHTS)
    else:
        y = _dequant_matmul(x2.float(), w)
    if bias is not None:
        y.add_(bias)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])


def linear_many_args(ws: list[NF4Weight]) -> tuple | None:
    """The arguments of the C++ `gemm_many` (less the thread grain) for weights that share their
    input x (a decode layer's q/k/v, gate/up): one parallel region and one dispatch where `linear`
    makes several, each output equal to `linear`'s bit for bit. None where the kernel does not take
    them all alike. Built once by a caller that runs the same weights every step (qserve's fused
    decode), then `linear_many_prepared` each step."""
    w0 = ws[0]
    K = w0.shape[1]
    if not (K % 32 == 0 and _SIMD and all(w.shape[1] == K and w.blocksize == w0.blocksize
                                          and w.nested_blocksize == w0.nested_blocksize and supports(w)
                                          for w in ws)):  # fmt: skip
        return None
    args = [kernel_args(w) for w in ws]  # (packed, absmax, nested_absmax, quant_map, nested_map, offset, ...)
    return (*([a[i] for a in args] for i in range(6)), w0.blocksize, w0.nested_blocksize, [w.shape[0] for w in ws], K)


def linear_many_prepared(x: torch.Tensor, args: tuple) -> list[torch.Tensor]:
    """`[linear(x, w) for w in ws]` given `args = linear_many_args(ws)`, without autograd: fp32 x [M, K],
    0 < M <= CPU_FUSED_MAX_M."""
    return torch.ops.qkernels_cpu.gemm_many.default(x, *args, PARALLEL_MIN_WEIGHTS)


def decode_stack(weights: list[list[NF4Weight]], biases: list[list[torch.Tensor | None]], norms: list[torch.Tensor],
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], windows: list[int],
                 rope_table: torch.Tensor, heads: int, eps: float) -> object | None:  # fmt: skip
    """A whole decode step in one parallel region (cpu_decode_stack.cpp), built once: per layer the
    weights q, k, v, o, gate, up, down and their biases; norms: the first layer's input norm, then per
    layer its post-attention norm and the norm after it; fp32 caches [slots, kv_heads, positions,
    head_dim]. Its `run(x, rows, positions, kv_len)` returns what `Decoder.decode_fused`'s per-layer
    calls return, bit for bit. None where it does not apply: a build without AVX-512, weights the
    AVX-512 kernel does not take alike (blocksizes under 32 or differing, rows not of whole blocks)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not all(len(ws) == 7 for ws in weights):
        return None
    w0 = weights[0][0]
    if not (w0.blocksize >= 32 and all(w.blocksize == w0.blocksize and w.nested_blocksize == w0.nested_blocksize
                                       and w.shape[1] % w.blocksize == 0 and supports(w)
                                       for ws in weights for w in ws)):  # fmt: skip
        return None
    args = [kernel_args(w) for ws in weights for w in ws]
    lists = [[a[i] for a in args] for i in range(6)]  # packed, absmax, nested_absmax, quant_map, nested_map, offset
    shapes = [n for a in args for n in a[8:10]]
    return torch.classes.qkernels_cpu.DecodeStack(*lists, [b for bs in biases for b in bs], shapes, w0.blocksize,
                                                  w0.nested_blocksize, norms, k_caches, v_caches, windows, rope_table,
                                                  heads, eps, PARALLEL_MIN_WEIGHTS)  # fmt: skip


def linear16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 `x @ w.T` for fp32 x [..., K] and a 16-bit (fp16/bf16) w [N, K], without an fp32 copy of w.

    Up to CPU_FUSED_MAX_M rows: the C++ GEMV (cpu_linear16.cpp) widens each weight in registers, so a
    decode step reads 2 bytes per weight; more rows: w widened chunk by chunk into the scratch
    buffer and multiplied by BLAS. Equal to `x @ w.float().T` up to the order of the fp32 sums.
    """
    if x.dtype != torch.float32 or w.dtype not in (torch.float16, torch.bfloat16):
        return F.linear(x, w.to(x.dtype))  # the reference
    N, K = w.shape
    x2 = x.reshape(-1, K).float()
    if x2.shape[0] <= CPU_FUSED_MAX_M and extension_available():
        y = torch.ops.qkernels_cpu.linear16.default(x2, w.contiguous(), PARALLEL_MIN_WEIGHTS)
    else:
        y = _chunked_matmul(x2, N, K, lambda n0, r, buf: buf[: r * K].view(r, K).copy_(w[n0 : n0 + r]))
    return y.view(*x.shape[:-1], N)


# ---- seeded LoRA dropout (cpu_lora_dropout.cpp); otherwise the reference of qkernels.lora_dropout ----


def _dropout_supports(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.dtype.is_floating_point and extension_available()


def _lora_supports(*ts: torch.Tensor, rank: int) -> bool:
    """The fused LoRA products: fp32 matrices, ranks 8, 16, .., 64, built where AVX2 is."""
    return (rank % 8 == 0 and rank <= 64 and all(t.dtype == torch.float32 and t.dim() == 2 and _dropout_supports(t)
                                                 for t in ts) and hasattr(torch.ops.qkernels_cpu, "lora_down"))  # fmt: skip


def dropout_apply(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    if _dropout_supports(x):
        return torch.ops.qkernels_cpu.dropout_apply(x, seed, lora_dropout.threshold(p))
    return lora_dropout.dropout_apply(x, seed, p)


def dropout_add_(y: torch.Tensor, t: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    if _dropout_supports(y) and _dropout_supports(t) and y.dtype == t.dtype and y.shape == t.shape:
        torch.ops.qkernels_cpu.dropout_add_(y, t, seed, lora_dropout.threshold(p))
        return y
    return lora_dropout.dropout_add_(y, t, seed, p)


def lora_down(x: torch.Tensor, a: torch.Tensor, seed: int, p: float, factor: float) -> torch.Tensor:
    if _lora_supports(x, a, rank=a.shape[0]):
        return torch.ops.qkernels_cpu.lora_down(x, a, seed, lora_dropout.threshold(p), factor)
    return lora_dropout.lora_down(x, a, seed, p, factor, drop=dropout_apply)


def lora_grad_a(gu: torch.Tensor, x: torch.Tensor, seed: int, p: float, factor: float) -> torch.Tensor:
    if _lora_supports(gu, x, rank=gu.shape[1]):
        return torch.ops.qkernels_cpu.lora_grad_a(gu, x, seed, lora_dropout.threshold(p), factor)
    return lora_dropout.lora_grad_a(gu, x, seed, p, factor, drop=dropout_apply)


def lora_up_add_(y: torch.Tensor, gu: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    if p != 0 and _lora_supports(y, gu, a, rank=a.shape[0]):  # p=0: the reference's addmm_ is faster
        torch.ops.qkernels_cpu.lora_up_add_(y, gu, a, seed, lora_dropout.threshold(p))
        return y
    return lora_dropout.lora_up_add_(y, gu, a, seed, p, drop_add=dropout_add_)
