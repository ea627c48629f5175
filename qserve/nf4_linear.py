"""`NF4Linear`: a frozen linear layer whose weight stays NF4 + double-quantized scales, exactly as stored.

The buffers are the checkpoint tensors themselves (never a full-precision copy of the base), and the
state dict uses the bitsandbytes key names: `weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`, plus
`bias` when the layer has one (kept in the compute dtype). The forward pass is the single op
`qkernels.ops.nf4_linear`, which picks Triton on CUDA and the torch path on CPU; it computes in
the dtype of its input, so the compute dtype is whatever the activations are.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from qformats.nf4 import NF4Weight
from qkernels import cpu
from qkernels.ops import nf4_linear

# The weight's tensors, registered as buffers under these names so that `.to()`, `named_buffers()`
# and memory counts see them; `nf4_weight` holds the same tensors and is what the forward uses.
_BUFFERS = {"weight": "packed", "weight_absmax": "absmax", "weight_quant_map": "quant_map",
            "weight_nested_absmax": "nested_absmax", "weight_nested_quant_map": "nested_quant_map"}  # fmt: skip


class NF4Linear(nn.Module):
    """`y = x @ dequantize(W).T + bias` with W held as NF4; W is frozen (no gradient), x gets one."""

    def __init__(self, w: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(w.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {list(w.shape)}")
        self.out_features, self.in_features = w.shape
        self._hold(w)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _hold(self, w: NF4Weight) -> None:
        self.nf4_weight = w  # the weight as stored (its dtype: the one it dequantizes to)
        for name, field in _BUFFERS.items():
            self._buffers[name] = getattr(w, field)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # moves the buffers; the weight then takes the moved tensors
        self.sync_weight()
        return self

    def hold_as_parameters(self) -> None:
        """Register the weight's tensors as frozen parameters instead of buffers (same names, same state
        dict), since FSDP2 shards parameters only (qconvert/fsdp.py); the forward then re-reads them each
        call, as FSDP swaps the local shards for the all-gathered tensors around each use."""
        for name in _BUFFERS:
            t = self._buffers.pop(name, None)
            if t is not None:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        self.register_forward_pre_hook(lambda module, args: module.sync_weight())

    def sync_weight(self) -> None:
        """Point `nf4_weight` at the tensors registered now: the buffers, or under FSDP2 the frozen
        parameters they became (qconvert/fsdp.py), which FSDP swaps for all-gathered ones around each use."""
        held = self._parameters if "weight" in self._parameters else self._buffers
        self.nf4_weight = replace(self.nf4_weight, **{field: held.get(name) for name, field in _BUFFERS.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nf4_linear(x, self.nf4_weight, bias)

    def extra_repr(self) -> str:
        dq = "double-quant" if self.nf4_weight.double_quant else "fp32 scales"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.nf4_weight.blocksize}, {dq}")  # fmt: skip

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The checkpoint layout: `weight.absmax`, ... and the quant-state JSON, not our attribute names.
        if "weight" in self._parameters:  # under FSDP2: the shards held now, not the last forward's freed gathers
            self.sync_weight()
        for key, t in self.nf4_weight.to_tensors(prefix + "weight").items():
            destination[key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        tensors = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if not tensors:
            missing_keys.append(prefix + "weight")
            return
        w = NF4Weight.from_tensors(prefix + "weight", tensors)
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {list(w.shape)}, expected "
                              f"{[self.out_features, self.in_features]}")  # fmt: skip
            return
        self._hold(w)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias.data.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")


class LinearsOfOneInput:
    """Linears that take the same input, called every decode step (a layer's q/k/v, gate/up, or one
    alone): `[m(x) for m in modules]` without module hooks, the same values. Plain `NF4Linear`s go to
    the C++ kernel in one call whose arguments are built once here (`qkernels.cpu.linear_many_args`);
    anything else (a LoRA wrapper, a float linear), or more rows than the fused kernel takes, runs
    each module's own forward. `checks`: (holder, key, object) triples that hold while what was
    prepared is still what the model holds (a wrapper or a new weight installed since breaks one)."""

    def __init__(self, parent: nn.Module, names: list[str]):
        self.modules = [parent._modules[n] for n in names]
        self.checks: list[tuple[dict, str, object]] = [(parent._modules, n, m) for n, m in zip(names, self.modules)]
        self.biases = [m._parameters.get("bias") for m in self.modules]
        self.args = None
        if all(type(m) is NF4Linear for m in self.modules) and not torch.compiler.is_compiling():
            self.args = cpu.linear_many_args([m.nf4_weight for m in self.modules])
            self.checks += [(m.__dict__, "nf4_weight", m.nf4_weight) for m in self.modules]
            self.checks += [(m._parameters, "bias", b) for m, b in zip(self.modules, self.biases)]

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The linears of fp32 x [B, in] (B rows of one token each)."""
        if self.args is not None and x.shape[0] <= cpu.CPU_FUSED_MAX_M and not torch.compiler.is_compiling():
            ys = cpu.linear_many_prepared(x, self.args)
            for y, b in zip(ys, self.biases):
                if b is not None:
                    y.add_(b)
            return ys
        return [m.forward(x) for m in self.modules]
