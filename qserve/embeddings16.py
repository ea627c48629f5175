"""Embeddings and output layer held in the 16 bits they were stored in, for fp32 decoding on CPU.

The loader casts every float tensor to the compute dtype, so on CPU a checkpoint's fp16 or bf16
embedding becomes fp32: SmolLM2's tied 49152 x 576 matrix is then 113 MB, read in full by the
output layer for every decoded token, more than all its NF4 linears together. `hold_embeddings_16bit`
puts the weight back into the 16-bit dtype it converts to exactly (checked element by element, so
nothing is rounded; an fp32 checkpoint stays fp32): half the bytes per token and half the memory.
The embedding lookup widens its rows to the compute dtype; the output layer is `Linear16`
(`qkernels.ops.linear16`: fp32 products and sums, so logits differ only in the order of the sums).
"""

from __future__ import annotations

import torch
from torch import nn

from qkernels.ops import linear16
from qserve.model import CausalLM

_EXACT_DTYPES = (torch.float16, torch.bfloat16)


class Linear16(nn.Module):
    """A frozen bias-free linear layer whose weight is fp16 or bf16; computes in the dtype of its input."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear16(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight {self.weight.dtype}"


def exact_16bit(w: torch.Tensor) -> torch.Tensor | None:
    """w in the first 16-bit dtype that holds every element exactly, or None."""
    for dtype in _EXACT_DTYPES:
        w16 = w.to(dtype)
        # Row blocks: widening the whole copy back would briefly hold another fp32 table (113 MB for SmolLM2).
        if all(torch.equal(a.to(w.dtype), b) for a, b in zip(w16.split(4096), w.split(4096))):
            return w16
    return None


def hold_embeddings_16bit(model: CausalLM) -> bool:
    """Store the embedding and (bias-free, frozen) output layer weights of an fp32 CPU model in 16 bits
    where that is exact; True if anything changed. Tied weights stay one tensor."""
    emb, head = model.model.embed_tokens, model.lm_head
    if emb.weight.device.type != "cpu" or emb.weight.dtype != torch.float32 or emb.weight.requires_grad:
        return False
    tied = head.weight is emb.weight
    changed = False
    w16 = exact_16bit(emb.weight.detach())
    if w16 is not None:
        emb.weight = nn.Parameter(w16, requires_grad=False)
        changed = True
    if tied:
        if w16 is not None:
            model.lm_head = Linear16(emb.weight)
    elif type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        h16 = exact_16bit(head.weight.detach())
        if h16 is not None:
            model.lm_head = Linear16(nn.Parameter(h16, requires_grad=False))
            changed = True
    return changed
