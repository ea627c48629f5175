"""LoRA training on the frozen base: `LoRALinear`, `apply_lora` from an `AdapterConfig`, PEFT-named state.

`LoRALinear` wraps an `NF4Linear` (QLoRA) or a plain `nn.Linear` (LoRA on a float base):

    y = base(x) + scale * lora_B(lora_A(dropout(x)))

with PEFT's initialisation (A Kaiming-uniform, B zero) and scaling (alpha / r, or alpha / sqrt(r)
with rsLoRA). Its two autograd functions (`_LoRAInput`, `_FrozenBaseAddLoRA`) save no base
weight: the packed 4-bit weight is already in memory, the backward pass dequantizes it again
(`qkernels.ops.dequantize`, Triton on CUDA) for the input gradient, and the weight gets no
gradient. So training holds no full-precision copy of any base weight, and no dropout mask: the
dropped elements are a hash of (seed, index), recomputed where the backward needs them.

Parameter names are PEFT's: `<module>.lora_A.weight`, `<module>.lora_B.weight`, so the adapter
file keys are `base_model.model.` + the parameter name. The LoRA path computes in the LoRA
weights' dtype (fp32 for training) and casts back to the activations' dtype, as PEFT does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qformats.errors import QError
from qformats.peft_adapter import AdapterConfig, target_matches
from qkernels.lora_dropout import draw_seed
from qkernels.ops import dequantize, lora_down, lora_grad_a, lora_up_add_
from qserve.nf4_linear import NF4Linear
from qserve.recompute_stash import current_stash

# The decoder's linear layers, the QLoRA paper's "all linear layers" (lm_head excluded, as PEFT's all-linear).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base_input_grad(base: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """d(base(x))/dx: the frozen weight again (NF4: dequantized anew, one layer at a time)."""
    if isinstance(base, NF4Linear):
        return grad @ dequantize(base.nf4_weight, grad.dtype)
    return grad @ base.weight.to(grad.dtype)


@dataclass(frozen=True)
class _Dropout:
    """One forward's dropout on a LoRA input: which elements drop is a function of (seed, index)
    (qkernels/lora_dropout.py), so no mask is stored and the backward recomputes it."""

    seed: int
    p: float


class _LoRAInput(torch.autograd.Function):
    """`v = factor * dropout(x) @ A.T`, factor = scale / (1 - p): the `[tokens, r]` bottleneck.

    Saves x and A only. Its dx is added by `_FrozenBaseAddLoRA`'s backward, into the base's dx buffer
    (one pass, no separate full-size gradient for autograd to sum). `kept`: v as the forward of a
    checkpointed layer computed it, handed to that layer's recompute (qserve/recompute_stash.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, factor: float, drop: _Dropout | None,
                kept: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        x2 = x.reshape(-1, x.shape[-1])
        ctx.factor, ctx.drop = factor, drop
        ctx.save_for_backward(x, a)  # in the recompute too: torch matches saved tensors by order
        if kept is not None:
            return kept.clone()
        return lora_down(x2, a, *(drop.seed, drop.p) if drop else (0, 0.0), factor)

    @staticmethod
    def backward(ctx, gv: torch.Tensor):
        x, _ = ctx.saved_tensors
        ga = None
        if ctx.needs_input_grad[1]:
            drop = (ctx.drop.seed, ctx.drop.p) if ctx.drop else (0, 0.0)
            ga = lora_grad_a(gv.contiguous(), x.reshape(-1, x.shape[-1]), *drop, ctx.factor)
        return None, ga, None, None, None


class _FrozenBaseAddLoRA(torch.autograd.Function):
    """`base(x) + v @ B.T` with the base weight frozen: the LoRA product is added into the base output
    in place; the backward dequantizes the base weight again for dx (no full-precision copy kept) and
    adds the LoRA branch's dx, `dropout(factor * (dy @ B) @ A)`, into the same buffer.

    Nothing goes through save_for_backward (v, A, B, all small, are held on ctx): in a checkpointed
    layer's recompute, torch stops once the last saved tensor is recomputed, which is then the last
    `_LoRAInput` of the layer, so down_proj's base matmul is never recomputed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: nn.Module,
                factor: float, drop: _Dropout | None) -> torch.Tensor:  # fmt: skip
        y = base(x)  # autograd is off inside forward: the plain kernel path, no graph
        lora_up_add_(y.view(-1, y.shape[-1]), v, b.t(), 0, 0.0)  # y += v @ B.T (no dropout: addmm_)
        ctx.base, ctx.v, ctx.a, ctx.b, ctx.factor, ctx.drop = base, v.detach(), a.detach(), b.detach(), factor, drop
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        need = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        gl = g.to(ctx.b.dtype)
        gv = gl @ ctx.b if need[0] or need[1] else None
        gb = gl.t() @ ctx.v if need[3] else None
        gx = None
        if need[0]:
            gx = _base_input_grad(ctx.base, g)
            drop = (ctx.drop.seed, ctx.drop.p) if ctx.drop else (0, 0.0)
            lora_up_add_(gx, gv * ctx.factor, ctx.a, *drop)
            gx = gx.view(*grad.shape[:-1], -1)
        return gx, gv if need[1] else None, None, gb, None, None, None


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (PEFT's `lora.Linear` semantics)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):  # fmt: skip
        super().__init__()
        if not isinstance(base, (NF4Linear, nn.Linear)):
            raise QError(f"LoRA applies to linear layers, not {type(base).__name__}")
        if r < 1:
            raise QError(f"LoRA rank must be at least 1, not {r}")
        self.base = base.requires_grad_(False)  # frozen, as PEFT freezes it: only the adapter trains
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters(generator)
        self.dropout = float(dropout)  # on the LoRA input, in training mode only (nn.Dropout's semantics)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A Kaiming-uniform (drawn from `generator`), B zero. A no-op on the meta
        device, where a loader that fills the base later calls it again once A and B are real."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.base.parameters()):
            raise QError("LoRALinear trains only the adapter: freeze its base (base.requires_grad_(False))")
        drop = _Dropout(draw_seed(), p) if p > 0 else None  # the CPU generator: no device sync
        factor = self.scaling / (1 - p)  # inverted dropout's scale, on the small bottleneck
        a, b = self.lora_A.weight, self.lora_B.weight
        # In a checkpointed layer on CPU, v goes from the forward to the recompute (13 MB for SmolLM2 at
        # r=16; the step measured ~5% faster); on GPU recomputing it costs little and memory counts more.
        stash = current_stash() if x.is_cpu else None
        kept = stash.take() if stash is not None else None
        if kept is not None and kept[0] != (drop.seed if drop else None):
            kept = None  # not this module's (cannot happen when the recompute replays the forward)
        v = _LoRAInput.apply(x, a, factor, drop, kept[1] if kept else None)  # first: see _FrozenBaseAddLoRA
        if stash is not None:
            stash.keep((drop.seed if drop else None, v.detach()))
        return _FrozenBaseAddLoRA.apply(x, v, a, b, self.base, factor, drop)

    def delta_weight(self) -> torch.Tensor:
        """`scale * B @ A` [out, in] in fp32: what merging adds to the base weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(self.base, NF4Linear):
            return dequantize(self.base.nf4_weight, dtype)
        return self.base.weight.detach().to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, base={type(self.base).__name__}"


def _targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    wrapped = lora_modules(model)
    inside = tuple(f"{n}." for n in wrapped)  # a LoRALinear's own base / lora_A / lora_B
    for n in wrapped:
        if target_matches(n, targets):
            raise QError(f"{n} already has a LoRA adapter")
    names = [n for n, m in model.named_modules() if isinstance(m, (NF4Linear, nn.Linear)) and n != "lm_head"
             and not n.startswith(inside) and target_matches(n, targets)]  # fmt: skip
    if not names:
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        raise QError(f"target modules {shown!r} match no linear layer of the model "
                     f"(its linears are named like {_example_linear(model)})")  # fmt: skip
    return names


def _example_linear(model: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if isinstance(m, (NF4Linear, nn.Linear))), "?")


def lora_config(target_modules: list[str] | str | None = None, r: int = 64, alpha: float = 16, dropout: float = 0.0,
                use_rslora: bool = False, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                base_model: str | None = None) -> AdapterConfig:  # fmt: skip
    """The adapter config of these LoRA settings: what `apply_lora` builds and adapter_config.json says.

    target_modules: None or "all-linear" for every decoder linear, a list of names/suffixes, or a regex
    (PEFT's rules)."""
    targets = ALL_LINEAR if target_modules in (None, "all-linear") else target_modules
    return AdapterConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_rslora=use_rslora,
                         base_model_name_or_path=base_model, rank_pattern=rank_pattern or {},
                         alpha_pattern=alpha_pattern or {})  # fmt: skip


def apply_lora(model: nn.Module, config: AdapterConfig, seed: int | None = None) -> list[str]:
    """Wrap the linears `config` targets in `LoRALinear` (its ranks, alphas, dropout), in place; returns
    their names. Every other parameter is frozen; only lora_A/lora_B train."""
    names = _targets(model, config.target_modules)
    generator = torch.Generator(_device_of(model)).manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, child = split_name(name)
        owner = model.get_submodule(parent) if parent else model
        lora = LoRALinear(getattr(owner, child), config.rank_of(name), config.alpha_of(name), config.lora_dropout,
                          config.use_rslora, generator=generator)  # fmt: skip
        setattr(owner, child, lora)
    return names


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA weights, in a fixed order (module order, A then B)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child
