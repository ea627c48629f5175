"""The public compute surface: every op the toolkit computes with, and where each one runs.

Each op is a `Backends` table naming its torch reference (the definition tests hold the others to),
its CPU implementation and its CUDA one; the device of its first tensor picks the entry. A backend
whose kernels do not take a given input (its module's `supports`) computes it the reference's way
itself. The NF4 ops are also registered as torch.library custom ops (for autograd and torch.compile):

- `nf4_linear(x, w, bias)`: `x @ dequantize(w).T + bias`, never keeping a dequantized copy of W.
- `dequantize(w, dtype)`: the whole weight, bit-identical to `qformats.nf4.dequantize_nf4`.
- `batched_lora_add_(y, x, lora_a, lora_b, idx, scale, rank)`: `y[t] += scale[s] * (x[t] @ A[s].T)
  @ B[s].T` in place with `s = idx[t]` (< 0: no adapter), A/B stacked per adapter (punica BGMV).

Plain tables: `quantize_nf4(weight, blocksize, double_quant)` (on CPU the fused C++ quantizer of
`qkernels.cpu_quantize`, byte-identical to the reference `qformats.nf4.quantize_nf4`), `linear16`,
`linear_fp32`, and the seeded-dropout LoRA products `dropout_apply`, `dropout_add_`, `lora_down`,
`lora_grad_a`, `lora_up_add_` (reference: `qkernels.lora_dropout`; CPU: `qkernels.cpu`).
CPU only, `decode_attention` and `add_rms_norm_`: the fused ops of a decode step (cpu_decode.cpp),
whose reference is the model's unfused step (qserve/model.py, `Decoder.decode_fused`), which also
calls the NF4 linears of one input in one kernel call (`qkernels.cpu.linear_many_args`, through
`qserve.nf4_linear.LinearsOfOneInput`).

CUDA entries are Triton kernels (`qkernels.triton_nf4`, `qkernels.triton_batched_lora`), imported on
first use, so CPU code never touches Triton. Outputs are in x's dtype (batched LoRA: y's).

torch.compile traces the ops through their fake implementations. In eager mode without autograd,
the public functions call the implementation directly: the custom-op dispatcher costs tens of
microseconds per call, which is a large share of a decode step spread over 200 small linears.
Autograd: a backward is registered for x and bias (W is frozen), so x that
requires grad is fine; it dequantizes W once per backward. A training loop that wants its own
memory trade-offs can wrap `dequantize` / `nf4_linear` in an autograd.Function of its own.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qformats.errors import QError
from qformats.nf4 import NF4Weight, dequantize_nf4
from qformats.nf4 import quantize_nf4 as _quantize_nf4_reference
from qkernels import cpu, cpu_quantize, lora_dropout
from qkernels.nf4_args import kernel_args

_LIB = "qkernels"


@dataclass(frozen=True)
class Backends:
    """One op's implementations. Called, it runs the one for the device of its first argument."""

    reference: Callable
    cpu: Callable | None = None
    cuda: str | None = None  # "module:function", imported on first use

    def on(self, device: torch.device) -> Callable:
        if device.type == "cpu" and self.cpu is not None:
            return self.cpu
        if device.type == "cuda" and self.cuda is not None:
            return _import(self.cuda)
        return self.reference

    def __call__(self, first: torch.Tensor, *args, **kwargs):
        return self.on(first.device)(first, *args, **kwargs)


@functools.cache
def _import(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _weight(packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
            out_features, in_features, dtype) -> NF4Weight:  # fmt: skip
    return NF4Weight(packed=packed, absmax=absmax, quant_map=quant_map, shape=(out_features, in_features),
                     dtype=dtype, blocksize=blocksize, nested_absmax=nested_absmax,
                     nested_quant_map=nested_quant_map, offset=offset if nested_absmax is not None else None,
                     nested_blocksize=nested_blocksize)  # fmt: skip


def _linear_reference(x, w: NF4Weight, bias) -> torch.Tensor:
    return F.linear(x, dequantize_nf4(w, x.dtype), bias)


def _quantize_reference(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                        threads: int | None = None) -> NF4Weight:  # fmt: skip
    return _quantize_nf4_reference(weight, blocksize=blocksize, double_quant=double_quant)


def _linear16_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype))


_NF4_LINEAR = Backends(reference=_linear_reference, cpu=cpu.linear, cuda="qkernels.triton_nf4:linear")
_DEQUANTIZE = Backends(reference=dequantize_nf4, cpu=cpu.dequantize, cuda="qkernels.triton_nf4:dequantize")


def _linear_impl(x, w: NF4Weight, bias) -> torch.Tensor:
    return _NF4_LINEAR.on(x.device)(x, w, bias)


def _dequantize_impl(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return _DEQUANTIZE.on(w.packed.device)(w, dtype)


# ---- nf4_linear -------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::nf4_linear", mutates_args=())
def _nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
    quant_map: torch.Tensor, nested_quant_map: torch.Tensor | None, offset: float, blocksize: int,
    nested_blocksize: int, out_features: int, in_features: int, bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    w = _weight(packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
                out_features, in_features, x.dtype)  # fmt: skip
    return _linear_impl(x, w, bias)


@_nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
      out_features, in_features, bias):  # fmt: skip
    return x.new_empty(*x.shape[:-1], out_features)


def _linear_setup(ctx, inputs, output):
    # packed, absmax, nested_absmax, quant_map, nested_quant_map: frozen, so no version check
    ctx.weight_tensors = inputs[1:6]
    ctx.weight_meta = inputs[6:11]
    ctx.has_bias = inputs[11] is not None


def _linear_backward(ctx, grad):
    gx = grad @ _dequantize(*ctx.weight_tensors, *ctx.weight_meta, grad.dtype) if ctx.needs_input_grad[0] else None
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[11] else None
    return (gx,) + (None,) * 10 + (gb,)


_nf4_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for an NF4 weight W of shape [out, in], computed in x's dtype."""
    _check_x(x, w)
    if _needs_op(x, bias):
        return _nf4_linear(x, *kernel_args(w), bias)
    return _linear_impl(x, w, bias)


def _check_x(x: torch.Tensor, w: NF4Weight) -> None:
    if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
        raise QError(f"x has {x.shape[-1]} features, the NF4 weight {list(w.shape)} expects {w.shape[-1]}")


def _needs_op(*tensors: torch.Tensor | None) -> bool:
    """Go through the registered op when tracing or when autograd must record it."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- dequantize -------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::dequantize", mutates_args=())
def _dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None, quant_map: torch.Tensor,
    nested_quant_map: torch.Tensor | None, offset: float, blocksize: int, nested_blocksize: int,
    out_features: int, in_features: int, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    w = _weight(packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
                out_features, in_features, dtype)  # fmt: skip
    return _dequantize_impl(w, dtype)


@_dequantize.register_fake
def _(packed, absmax, nested_absmax, quant_map, nested_quant_map, offset, blocksize, nested_blocksize,
      out_features, in_features, dtype):  # fmt: skip
    return packed.new_empty(out_features, in_features, dtype=dtype)


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full weight in `dtype` (default: the dtype it was quantized from)."""
    dtype = dtype or w.dtype
    if len(w.shape) != 2:  # the ops are for linear weights; other shapes take the direct path
        return _dequantize_impl(w, dtype)
    if torch.compiler.is_compiling():
        return _dequantize(*kernel_args(w), dtype)
    return _dequantize_impl(w, dtype)


# ---- batched_lora_add_ ------------------------------------------------------------------------


def batched_lora_reference_(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                            idx: torch.Tensor, scale: torch.Tensor | None = None,
                            rank: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The torch definition of batched LoRA, one adapter at a time: fp32 products and sums, y rounded
    once (y + delta). Slow (a host sync per call); the serving CPU path is `MultiLoRALinear`'s own."""
    for s in idx.unique().tolist():
        if s < 0:
            continue
        rows = (idx == s).nonzero().squeeze(1)
        r = int(rank[s]) if rank is not None else lora_a.shape[1]
        h = x[rows].float() @ lora_a[s, :r].float().t()
        if scale is not None:
            h = h * scale[s].float()
        y[rows] = (y[rows].float() + h @ lora_b[s, :, :r].float().t()).to(y.dtype)
    return y


_BATCHED_LORA_ADD = Backends(reference=batched_lora_reference_, cuda="qkernels.triton_batched_lora:add_")


def _batched_lora_impl(y, x, lora_a, lora_b, idx, scale, rank) -> None:
    _BATCHED_LORA_ADD(y, x, lora_a, lora_b, idx, scale, rank)


@torch.library.custom_op(f"{_LIB}::batched_lora_add_", mutates_args=("y",))
def _batched_lora_add(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, idx: torch.Tensor,
                      scale: torch.Tensor | None, rank: torch.Tensor | None) -> None:  # fmt: skip
    _batched_lora_impl(y, x, lora_a, lora_b, idx, scale, rank)


@_batched_lora_add.register_fake
def _(y, x, lora_a, lora_b, idx, scale, rank):
    return None


def batched_lora_add_(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, idx: torch.Tensor,
                      scale: torch.Tensor | None = None, rank: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`y[t] += scale[s] * (x[t] @ A[s].T) @ B[s].T` in place, `s = idx[t]`; returns y. No autograd.

    x [T, in], y [T, out], lora_a [n, r_max, in], lora_b [n, out, r_max] (zero-padded past each
    adapter's rank), idx int32 [T] (< 0: the row gets nothing), scale [n] (None: 1), rank int32 [n]
    (None: r_max; given, the padding is never read). fp32 accumulation, y rounded once.
    """
    n, r_max, k = lora_a.shape
    if (x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[1] != k or idx.shape != (x.shape[0],)
            or lora_b.shape != (n, y.shape[1], r_max) or idx.dtype != torch.int32):  # fmt: skip
        raise QError(f"batched LoRA: x {list(x.shape)}, y {list(y.shape)}, idx {list(idx.shape)} {idx.dtype}, "
                     f"A {list(lora_a.shape)}, B {list(lora_b.shape)} do not fit: expected x [T, in], y [T, out], "
                     f"int32 idx [T], A [n, r, in], B [n, out, r]")  # fmt: skip
    if torch.compiler.is_compiling():
        _batched_lora_add(y, x, lora_a, lora_b, idx, scale, rank)
    else:
        _batched_lora_impl(y, x, lora_a, lora_b, idx, scale, rank)
    return y


# ---- the rest: plain tables ---------------------------------------------------------------------

_LINEAR16 = Backends(reference=_linear16_reference, cpu=cpu.linear16)


def linear16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.T` for a frozen fp16/bf16 weight w [N, K] and x in a wider dtype, computed and returned in x's dtype.

    CPU, fp32 x, nothing to record for autograd: `qkernels.cpu.linear16` (w widened in registers,
    fp32 sums). Elsewhere the torch reference `F.linear(x, w.to(x.dtype))`.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _linear16_reference(x, w)
    # Traced by torch.compile: the C++ GEMV as an opaque op where it has a fake (decode_ops_available) and
    # takes these rows; otherwise the reference (widening all of w, every call).
    if torch.compiler.is_compiling() and not (_cpu_fakes and x.is_cpu and x.numel() <= cpu.CPU_FUSED_MAX_M * w.shape[1]):
        return _linear16_reference(x, w)
    return _LINEAR16(x, w)


# `linear_fp32(x, w)`: `x @ w.T` for fp32 matrices without autograd (oneDNN on CPU where torch has it).
linear_fp32 = Backends(reference=F.linear, cpu=cpu.linear_fp32)

# `quantize_nf4(weight, blocksize=64, double_quant=True, threads=None)`: NF4 + double quant of any
# float tensor; `threads` caps the CPU kernel's threads (the output does not depend on them).
quantize_nf4 = Backends(reference=_quantize_reference, cpu=cpu_quantize.quantize_nf4_cpu)

# Seeded LoRA dropout (qkernels/lora_dropout.py): the mask is a hash of (seed, index), never stored.
dropout_apply = Backends(reference=lora_dropout.dropout_apply, cpu=cpu.dropout_apply)
dropout_add_ = Backends(reference=lora_dropout.dropout_add_, cpu=cpu.dropout_add_)
lora_down = Backends(reference=lora_dropout.lora_down, cpu=cpu.lora_down)
lora_grad_a = Backends(reference=lora_dropout.lora_grad_a, cpu=cpu.lora_grad_a)
lora_up_add_ = Backends(reference=lora_dropout.lora_up_add_, cpu=cpu.lora_up_add_)

# ---- the fused ops of a decode step (cpu_decode.cpp); their reference is the model's unfused step -------


def decode_ops_available(device: torch.device) -> bool:
    """Whether `decode_attention` and `add_rms_norm_` run here: CPU, with the C++ extension built (then their
    fake implementations, and linear16's, are registered, so torch.compile traces them as opaque ops)."""
    if device.type != "cpu" or not cpu.extension_available():
        return False
    if not _cpu_fakes:
        torch.library.register_fake("qkernels_cpu::decode_attention")(lambda q, *args: torch.empty_like(q))
        torch.library.register_fake("qkernels_cpu::add_rms_norm_")(lambda x, *args: torch.empty_like(x))
        torch.library.register_fake("qkernels_cpu::linear16")(lambda x, w, grain: x.new_empty(x.shape[0], w.shape[0]))
        _cpu_fakes.append(True)
    return True


_cpu_fakes: list[bool] = []  # [True] once the fakes above are registered


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope_table: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                     kv_len: int, window: int = 0) -> torch.Tensor:  # fmt: skip
    """One query per row: rope on q [B, H*D] and k [B, KV*D] (cos, sin = rope_table[positions[b]] halves,
    [max_pos, D]), k and v written into the fp32 caches [slots, KV, S, D] at (rows[b], positions[b]), and
    attention over cache positions 0..positions[b] (of the first kv_len; the last `window` if > 0); y [B, H*D]."""
    return torch.ops.qkernels_cpu.decode_attention(q, k, v, rope_table, k_cache, v_cache, rows, positions, kv_len,
                                                   window)  # fmt: skip


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x += delta` in place (if given), then RMSNorm(x) * weight, fp32 [..., D]: a residual add and the next norm."""
    return torch.ops.qkernels_cpu.add_rms_norm_(x, delta, weight, eps)
