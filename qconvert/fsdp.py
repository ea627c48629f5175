"""FSDP2 over the 4-bit base: each decoder layer and the root wrapped with `fully_shard`.

Every rank keeps 1/world of each tensor: the NF4 storage of every `NF4Linear` (packed codes, 8-bit
scales, nested scales, quant maps) as frozen parameters, the LoRA A/B as trainable ones. FSDP
all-gathers a layer's tensors just before its forward (and again before its backward) and frees
them after, so one layer's base is whole at a time. FSDP2 gathers parameters of mixed dtypes as
bytes, which is what lets the uint8 codes travel with the fp32 scales and LoRA weights.

Gradients are summed over ranks, not averaged: the training loss is already divided by the token
count of the whole step over all ranks (`CausalLM.loss`), as in the DDP path of qconvert/finetune.py.
`PagedAdamW` steps on each rank's local shards.

The float tensors outside the layers are the largest: an untied embedding table and output layer are
each their own unit, gathered only around their use (the lookup; the fused cross-entropy and its
backward) and freed after, rather than held whole with gloo's staging copy for the whole step by the
root. A tied table is one tensor used at both ends, so it stays with the root.
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from qserve.lm_loss import linear_cross_entropy
from qserve.model import CausalLM
from qserve.nf4_linear import NF4Linear


def shard_for_training(model: CausalLM, mesh_or_group=None, offload: bool = False) -> CausalLM:
    """Shard `model` (LoRA already applied, on its training device) in place over `mesh_or_group`
    (a DeviceMesh, or None for the default process group's ranks); `offload` keeps the shards and
    their gradients in CPU memory between uses (FSDP2's CPUOffloadPolicy). Returns the model."""
    if mesh_or_group is not None and not hasattr(mesh_or_group, "mesh"):
        from torch.distributed.device_mesh import DeviceMesh

        mesh_or_group = DeviceMesh.from_group(mesh_or_group, model.device.type)
    for module in model.modules():
        if isinstance(module, NF4Linear):
            module.hold_as_parameters()
    # Pinned host memory needs an accelerator; on a CPU-only machine the offload keeps plain memory.
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh_or_group, offload_policy=policy)
    if not model.args.tie_word_embeddings:
        fully_shard(model.model.embed_tokens, mesh=mesh_or_group, offload_policy=policy)
        head = model.lm_head
        plain = type(head) is nn.Linear
        fully_shard(head, mesh=mesh_or_group, offload_policy=policy)
        if plain:  # `CausalLM.loss` reads its frozen weight in a fused cross-entropy, without calling the
            # layer: that method is where FSDP gathers it (and again before its backward).
            head.cross_entropy = MethodType(_output_cross_entropy, head)
            register_fsdp_forward_method(head, "cross_entropy")
    fully_shard(model, mesh=mesh_or_group, offload_policy=policy)
    # Training calls `model.loss`, not `model(...)`: the root's tensors (final norm, a tied table) are
    # gathered around it. Only the outermost method: a nested one would reshard on its return.
    register_fsdp_forward_method(model, "loss")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def _output_cross_entropy(head: nn.Linear, h: torch.Tensor, targets: torch.Tensor, scale: float,
                          chunk: int | None) -> torch.Tensor:  # fmt: skip
    return linear_cross_entropy(h, head.weight, targets, scale, chunk)


def shard_rows(dim0: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [first, end) of dimension 0 that rank `rank` of `world` holds under FSDP2's Shard(0):
    torch.chunk's split, ceil(dim0 / world) rows each, the last ranks short or empty."""
    per = -(-dim0 // world)
    first = min(rank * per, dim0)
    return first, min(first + per, dim0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or gradient (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
