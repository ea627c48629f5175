"""LoRA dropout from a seed, the torch reference: element i of a flat tensor is dropped when a hash
of (seed, i) falls below p (to 1/2^32), so no mask is stored: the forward drops from x, the backward
recomputes the same decisions where it needs them. The hash runs here in torch int64 arithmetic;
the fused C++ kernels (qkernels.cpu, cpu_lora_dropout.cpp) compute it bit for bit in one pass.

The three LoRA products that read a dropped tensor (`lora_down`, `lora_grad_a`, `lora_up_add_`) are
here the masked tensor and a torch matmul; callers reach them through qkernels.ops, whose CPU entry
computes the mask in registers where it reads x (same mask, results within fp32 summation order).

The seed comes from torch's global RNG (`draw_seed`), so gradient checkpointing's recompute, which
restores the RNG state, draws the same seed and drops the same elements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_M32 = 0xFFFFFFFF


def draw_seed(device: torch.device | str = "cpu") -> int:
    """A 63-bit seed from torch's global RNG (the device's generator)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device).item())


def threshold(p: float) -> int:
    """Hashes below this are dropped: round(p * 2^32)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), not {p}")
    return round(p * 2**32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32 without int64 overflow: the constant in 16-bit halves
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _lowbias32_int(x: int) -> int:
    return int(_lowbias32(torch.tensor(x & _M32, dtype=torch.int64)))


def keep_mask(numel: int, seed: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The flat bool keep-mask of `numel` elements (the reference both paths follow)."""
    s1 = _lowbias32_int((seed & _M32) ^ 0x9E3779B9)  # two keys that every bit of the seed reaches
    s2 = _lowbias32_int((seed >> 32) + s1)
    i = torch.arange(numel, dtype=torch.int64, device=device)
    return _lowbias32(_lowbias32((i + s1) & _M32) ^ s2) >= threshold(p)


def dropout_apply(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x with the dropped elements zeroed (no 1/(1-p) scaling: the caller folds it in)."""
    return torch.where(keep_mask(x.numel(), seed, p, x.device).view(x.shape), x, 0.0)


def dropout_add_(y: torch.Tensor, t: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """y += t on the kept elements, in place; returns y."""
    return y.add_(torch.where(keep_mask(t.numel(), seed, p, t.device).view(t.shape), t, 0.0).to(y.dtype))


def lora_down(x: torch.Tensor, a: torch.Tensor, seed: int, p: float, factor: float,
              drop: Callable = dropout_apply) -> torch.Tensor:  # fmt: skip
    """`factor * dropout(x) @ A.T` for x [tokens, in], A [r, in]: the LoRA bottleneck [tokens, r]."""
    return ((drop(x, seed, p) if p else x).to(a.dtype) @ a.t()).mul_(factor)


def lora_grad_a(gu: torch.Tensor, x: torch.Tensor, seed: int, p: float, factor: float,
                drop: Callable = dropout_apply) -> torch.Tensor:  # fmt: skip
    """`factor * gu.T @ dropout(x)` [r, in]: the gradient of A from the bottleneck's gradient gu [tokens, r]."""
    return (gu * factor).t() @ (drop(x, seed, p) if p else x).to(gu.dtype)


def lora_up_add_(y: torch.Tensor, gu: torch.Tensor, a: torch.Tensor, seed: int, p: float,
                 drop_add: Callable = dropout_add_) -> torch.Tensor:  # fmt: skip
    """`y += dropout(gu @ A)` in place (the LoRA branch's input gradient into the base's); returns y.

    With p=0, the plain `y += gu @ A` (the product in gu's dtype, then cast to y's, as PEFT orders it).
    """
    if p == 0:  # no mask to apply: MKL's addmm_ beats the C++ kernel (bench/cpu_kernels.py --training)
        return y.addmm_(gu, a) if y.dtype == gu.dtype == a.dtype else y.add_((gu @ a).to(y.dtype))
    return drop_add(y, (gu @ a).to(y.dtype), seed, p)
