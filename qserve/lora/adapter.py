"""A PEFT adapter against a model: the fit check, loading it into `LoRALinear`s, taking it out, the merge.

The adapter record and its files are `qformats.peft_adapter` (`PeftAdapter`, `read_adapter`); what here
needs a model: does the adapter fit it (`check_fit`, the one check training, serving and export run),
put it on the model for training or evaluation (`load_lora`), the trained adapter as a record
(`lora_adapter`), and the merged weights `W + scale * B @ A` (`merged_tensors`, what export writes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qformats.errors import QError
from qformats.peft_adapter import AdapterConfig, PeftAdapter, read_adapter
from qkernels.ops import dequantize
from qserve.lora.training import LoRALinear, lora_modules, split_name
from qserve.nf4_linear import NF4Linear


def check_fit(model: nn.Module, adapter: PeftAdapter) -> None:
    """QError naming the module unless every module the adapter targets is a linear of `model` (bare or
    wrapped for LoRA: the wrappers keep its in/out features) whose shape its A [r, in] and B [out, r] fit."""
    for module, (a, b) in adapter.weights.items():
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise QError(f"{adapter.source}: adapter targets {module!r}, which this model does not have") from None
        if not hasattr(target, "in_features") or isinstance(target, nn.Embedding):
            raise QError(f"{adapter.source}: adapter targets {module!r}, which is not a linear layer")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
            raise QError(f"{adapter.source}: {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                         f"a linear of {target.in_features} -> {target.out_features}")  # fmt: skip


def load_lora(model: nn.Module, adapter: PeftAdapter | str | Path, trainable: bool = False) -> list[str]:
    """Apply a PEFT adapter (record, folder or Hub id) to `model`, wrapping its target linears in
    `LoRALinear`, and load its weights; returns the module names. QError if it does not fit."""
    if not isinstance(adapter, PeftAdapter):
        adapter = read_adapter(adapter)
    check_fit(model, adapter)
    cfg = adapter.config
    for name, (a, b) in adapter.weights.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and module.r != a.shape[0]:
            raise QError(f"{adapter.source}: {name} has a LoRA of rank {module.r} already; the adapter's is {a.shape[0]}")
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, a.shape[0], 1.0, cfg.lora_dropout, cfg.use_rslora)
            module.train(model.training)  # a new wrapper in an eval model must not apply dropout
            parent, child = split_name(name)
            setattr(model.get_submodule(parent) if parent else model, child, module)
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
        module.alpha, module.scaling = cfg.alpha_of(name), adapter.scale(name)
        for p in (module.lora_A.weight, module.lora_B.weight):
            p.requires_grad_(trainable)
    return list(adapter.weights)


def lora_adapter(model: nn.Module, config: AdapterConfig) -> PeftAdapter:
    """The model's LoRA weights (on CPU) with the config they were made with, ready for `write_adapter`.
    A model sharded by FSDP2 (qconvert/fsdp.py) has them as DTensors: they are gathered whole, a
    collective every rank must join."""
    mods = lora_modules(model)
    if not mods:
        raise QError("the model has no LoRA adapter to save")

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()

    return PeftAdapter(config, {n: (whole(m.lora_A.weight.detach()), whole(m.lora_B.weight.detach())) for n, m in mods.items()})


def merged_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor in `dtype`) for every parameter of the model, each `LoRALinear` merged as
    `W + scale * B @ A` and each NF4 linear dequantized, in fp32 on the model's device, cast once.

    Yields lazily, so at most one dense linear exists at a time beyond what the caller keeps. A tied
    lm_head is left out (its weight is the embeddings').
    """
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    skip_inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_inside):
            continue
        if isinstance(module, LoRALinear):
            weight = module.base_weight(torch.float32) + module.delta_weight()
            bias = module.base.bias
        elif isinstance(module, NF4Linear):
            weight, bias = dequantize(module.nf4_weight, torch.float32), module.bias
        else:
            for pname, p in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full == "lm_head.weight" and tied:
                    continue
                yield full, p.detach().to("cpu", dtype)
            continue
        skip_inside.append(name + ".")
        yield f"{name}.weight", weight.to("cpu", dtype)
        if bias is not None:
            yield f"{name}.bias", bias.detach().to("cpu", dtype)
