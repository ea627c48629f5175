"""`NF4Linear`: a frozen linear layer whose weight stays NF4 + double-quantized scales, exactly as stored.

The buffers are the checkpoint tensors themselves (never a full-precision copy of the base), and the
state dict uses the bitsandbytes key names: `weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`, plus
`bias` when the layer has one (kept in the compute dtype). The forward pass is the single op
`qkernels.ops.nf4_linear`, which picks Triton on CUDA and the torch path on CPU; it computes in
the dtype of its input, so the compute dtype is whatever the activations are.
"""

from __future__ import annotations

import torch
from torch import nn

from qformats.nf4 import NF4Weight
from qkernels.ops import nf4_linear

_BUFFERS = ("weight", "weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map")


class NF4Linear(nn.Module):
    """`y = x @ dequantize(W).T + bias` with W held as NF4; W is frozen (no gradient), x gets one."""

    def __init__(self, w: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(w.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {list(w.shape)}")
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight", w.packed)
        self.register_buffer("weight_absmax", w.absmax)
        self.register_buffer("weight_quant_map", w.quant_map)
        self.register_buffer("weight_nested_absmax", w.nested_absmax)
        self.register_buffer("weight_nested_quant_map", w.nested_quant_map)
        self.offset, self.blocksize, self.nested_blocksize = w.offset, w.blocksize, w.nested_blocksize
        self.weight_dtype = w.dtype  # the dtype the weight dequantizes to (that of the source)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def nf4_weight(self) -> NF4Weight:
        """The weight as an `NF4Weight` (views of the buffers, no copy)."""
        return NF4Weight(packed=self.weight, absmax=self.weight_absmax, quant_map=self.weight_quant_map,
                         shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                         blocksize=self.blocksize, nested_absmax=self.weight_nested_absmax,
                         nested_quant_map=self.weight_nested_quant_map, offset=self.offset,
                         nested_blocksize=self.nested_blocksize)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nf4_linear(x, self.nf4_weight, bias)

    def extra_repr(self) -> str:
        dq = "double-quant" if self.weight_nested_absmax is not None else "fp32 scales"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, {dq}")  # fmt: skip

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The checkpoint layout: `weight.absmax`, ... and the quant-state JSON, not our attribute names.
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
        for attr, t in zip(_BUFFERS, (w.packed, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map)):
            self._buffers[attr] = t
        self.offset = w.offset
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias.data.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
