"""Many LoRA adapters over one base model at once: each row of a batch uses its own adapter (or none).

The serving engine keeps one base model in memory and any number of adapters next to it. Target
linears are wrapped in `MultiLoRALinear`, which holds every adapter's A/B for that module (loaded
once, kept in memory). Before each forward the engine says which adapter each row uses
(`MultiLoRA.use(ids)`); the wrapped linears then compute

    y[b] = base(x[b]) + scale[a_b] * (x[b] @ A[a_b].T) @ B[a_b].T

with the rows of the batch gathered per adapter: one pair of small matmuls per adapter present in
the batch (rows without an adapter cost nothing). This is the CPU torch path; on GPU a Triton
gather kernel (punica-style BGMV, one launch for all adapters) would replace the per-adapter loop
via qkernels - not written yet, the torch path runs there too.

Adapters are PEFT LoRA folders (adapter_config.json + adapter_model.safetensors); scaling is
`lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA), as PEFT computes it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qformats.errors import QError
from qformats.peft_adapter import AdapterConfig, read_adapter

BASE = 0  # the adapter id of "no adapter"


@dataclass
class LoRAAdapter:
    """One adapter in memory: per target module, (A [r, in], B [out, r]) and its scale."""

    name: str
    path: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: dict[str, float]
    config: AdapterConfig

    @classmethod
    def from_folder(cls, path: str | Path, name: str | None = None) -> LoRAAdapter:
        """Read a PEFT LoRA adapter folder; QError naming the file or field if it is not one we can serve."""
        adapter = read_adapter(path)  # validated: LoRA only, no DoRA, no biases, no modules_to_save
        weights = {m: (a.float(), b.float()) for m, (a, b) in adapter.weights.items()}
        scale = {m: adapter.scale(m) for m in weights}
        rank = max(a.shape[0] for a, _ in weights.values())
        return cls(name=name or Path(path).name, path=str(path), rank=rank, weights=weights, scale=scale,
                   config=adapter.config)  # fmt: skip


class RowAdapters:
    """Which adapter each row of the current forward uses, grouped once per forward for all layers."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # (adapter id, rows; None = every row)

    def set(self, ids: list[int], device: torch.device) -> None:
        by_id: dict[int, list[int]] = {}
        for row, aid in enumerate(ids):
            if aid != BASE:
                by_id.setdefault(aid, []).append(row)
        if len(by_id) == 1 and len(next(iter(by_id.values()))) == len(ids):
            self.groups = [(next(iter(by_id)), None)]
        else:
            self.groups = [(aid, torch.tensor(rows, device=device)) for aid, rows in by_id.items()]


class MultiLoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or NF4Linear) plus any number of LoRA adapters, chosen per row."""

    def __init__(self, base: nn.Module, rows: RowAdapters):
        super().__init__()
        self.base = base
        self.rows = rows
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for aid, rows in self.rows.groups:
            lora = self.adapters.get(aid)
            if lora is None:  # this adapter does not target this module
                continue
            a, b, scale = lora
            if rows is None:
                y = y + scale * ((x @ a.T) @ b.T)
            else:
                y = y.index_add(0, rows, (x.index_select(0, rows) @ a.T) @ b.T, alpha=scale)
        return y


class MultiLoRA:
    """The adapters of one model: add/remove them, and pick each row's adapter for a forward.

    Not thread-safe: the serving engine calls it from its own thread only, between forwards.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = RowAdapters()
        self.adapters: dict[int, LoRAAdapter] = {}
        self._next_id = 1
        ref = next(model.parameters())
        self.dtype, self.device = (ref.dtype if ref.is_floating_point() else torch.float32), ref.device

    def check(self, adapter: LoRAAdapter) -> None:
        """QError unless every module the adapter targets is a linear of this model with matching shapes."""
        for module, (a, b) in adapter.weights.items():
            try:
                target = self.model.get_submodule(module)
            except AttributeError:
                raise QError(f"{adapter.path}: adapter targets {module!r}, which this model does not have") from None
            if isinstance(target, MultiLoRALinear):
                target = target.base
            if not hasattr(target, "in_features") or isinstance(target, nn.Embedding):
                raise QError(f"{adapter.path}: adapter targets {module!r}, which is not a linear layer")
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
                raise QError(f"{adapter.path}: {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                             f"a linear of {target.in_features} -> {target.out_features}")  # fmt: skip

    def add(self, adapter: LoRAAdapter) -> int:
        """Install an adapter; returns its id (never BASE, never reused)."""
        self.check(adapter)
        aid, self._next_id = self._next_id, self._next_id + 1
        for module, (a, b) in adapter.weights.items():
            layer = self._wrap(module)
            a, b = a.to(self.device, self.dtype), b.to(self.device, self.dtype)
            layer.adapters[aid] = (a, b, adapter.scale[module])
        self.adapters[aid] = adapter
        return aid

    def remove(self, aid: int) -> None:
        adapter = self.adapters.pop(aid)
        for module in adapter.weights:
            self.model.get_submodule(module).adapters.pop(aid, None)

    def _wrap(self, module: str) -> MultiLoRALinear:
        target = self.model.get_submodule(module)
        if isinstance(target, MultiLoRALinear):
            return target
        wrapped = MultiLoRALinear(target, self.rows)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)
        return wrapped

    @contextmanager
    def use(self, ids: list[int]):
        """Within the block, row b of a forward uses adapter `ids[b]` (BASE: none)."""
        self.rows.set(ids, self.device)
        try:
            yield
        finally:
            self.rows.groups = []

