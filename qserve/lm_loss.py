"""The causal LM loss with the output layer and cross-entropy fused and chunked (`CausalLM.loss` uses it).

A full `[B, T, vocab]` logits tensor is the largest activation of a small model's training step
(SmolLM2: 4 x 256 x 49152 fp32 = 200 MB, kept for backward along with its softmax). Here only
positions that carry a label are projected at all (with response-only training most tokens are
prompt), and they are projected `chunk` rows at a time: each chunk's logits give its loss and,
right away, the gradient with respect to the hidden states; only that `[N, hidden]` gradient is
kept for the backward pass. Same FLOPs as the unfused version, a fraction of the memory.
The output weight is frozen in LoRA training (tied to the embeddings in SmolLM2), so it gets
no gradient; a trainable or LoRA-wrapped lm_head takes the plain path instead.
"""

from __future__ import annotations

import torch

from qkernels.ops import linear_fp32

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)
CHUNK_BYTES = 64 << 20  # fp32 logits of one chunk: SmolLM2's 49152-token vocabulary -> 341 rows


class LinearCrossEntropy(torch.autograd.Function):
    """`scale * sum_i CE(h_i @ W.T, t_i)` for a frozen W, gradient for h computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                chunk: int) -> torch.Tensor:  # fmt: skip
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i : i + chunk], targets[i : i + chunk]
            logits = linear_fp32(hc, weight).float()  # oneDNN on CPU, F.linear elsewhere
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_grad:
                # d CE / d logits = softmax - onehot, computed in place on the chunk's logits.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[rows[: len(tc)], tc] -= 1.0
                grad_h[i : i + chunk] = (probs.mul_(scale)).to(h.dtype) @ weight
        if need_grad:
            ctx.save_for_backward(grad_h)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                         chunk: int | None = None) -> torch.Tensor:  # fmt: skip
    """`scale * sum_i CE(h_i @ W.T, t_i)` for a frozen W; `chunk` rows of logits exist at a time (default: 64 MiB)."""
    chunk = chunk or max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    return LinearCrossEntropy.apply(h, weight, targets, scale, chunk)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: the targets of positions 0..T-2."""
    return labels[:, 1:]


def count_trained(labels: torch.Tensor) -> int:
    """How many positions of a batch carry a loss (after the shift)."""
    return int((shifted_targets(labels) != IGNORE).sum())
