"""LoRA on the frozen base, in one place: the training layer (`training.py`: `LoRALinear`, `apply_lora`)
and the batched serving layer (`batched.py`: `MultiLoRALinear`, `MultiLoRA`, one adapter per row).
The adapter on disk (config + weights, the reader and writer) is `qformats.peft_adapter`."""

from qserve.lora.batched import BASE, GatheredLoRA, LoRAAdapter, MultiLoRA, MultiLoRALinear, RowAdapters
from qserve.lora.training import (
    ALL_LINEAR,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    to_peft_adapter,
)

__all__ = ["ALL_LINEAR", "BASE", "GatheredLoRA", "LoRAAdapter", "LoRALinear", "MultiLoRA", "MultiLoRALinear",
           "RowAdapters", "apply_lora", "load_lora", "lora_modules", "lora_parameters", "lora_state_dict",
           "merge_lora", "to_peft_adapter"]  # fmt: skip
