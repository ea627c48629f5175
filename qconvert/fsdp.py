"""FSDP2 over the 4-bit base: each decoder layer and the root wrapped with `fully_shard`.

Every rank keeps 1/world of each tensor: the NF4 storage of every `NF4Linear` (packed codes, 8-bit
scales, nested scales, quant maps) as frozen parameters, the LoRA A/B as trainable ones. FSDP
all-gathers a layer's tensors just before its forward (and again before its backward) and frees
them after, so one layer's base is whole at a time. FSDP2 gathers parameters of mixed dtypes as
bytes, which is what lets the uint8 codes travel with the fp32 scales and LoRA weights.

Gradients are summed over ranks, not averaged: the training loss is already divided by the token
count of the whole step over all ranks (`CausalLM.loss`), as in the DDP path of qconvert/finetune.py.
`PagedAdamW` steps on each rank's local shards.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

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
    fully_shard(model, mesh=mesh_or_group, offload_policy=policy)
    # Training calls `model.loss`, not `model(...)`: the root's tensors (embeddings, final norm, output
    # layer) are gathered around it. Only the outermost method: a nested one would reshard on its return.
    register_fsdp_forward_method(model, "loss")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or gradient (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
