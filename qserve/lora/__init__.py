"""LoRA on the frozen base, in one place: the training layer (`training.py`: `LoRALinear`, `apply_lora`),
the batched serving layer (`batched.py`: `MultiLoRALinear`, `MultiLoRA`, one adapter per row) and an
adapter against a model (`adapter.py`: the fit check, loading, the merge). The adapter record and its
files are `qformats.peft_adapter` (`PeftAdapter`, `read_adapter`, `write_adapter`)."""

from qserve.lora.adapter import check_fit, load_lora, lora_adapter, merged_tensors
from qserve.lora.batched import BASE, GatheredLoRA, MultiLoRA, MultiLoRALinear, RowAdapters
from qserve.lora.training import (
    ALL_LINEAR,
    LoRALinear,
    apply_lora,
    lora_config,
    lora_modules,
    lora_parameters,
)

__all__ = ["ALL_LINEAR", "BASE", "GatheredLoRA", "LoRALinear", "MultiLoRA", "MultiLoRALinear", "RowAdapters",
           "apply_lora", "check_fit", "load_lora", "lora_adapter", "lora_config", "lora_modules", "lora_parameters",
           "merged_tensors"]  # fmt: skip
