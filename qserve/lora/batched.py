"""Many LoRA adapters over one base model at once: each row of a batch uses its own adapter (or none).

The serving engine keeps one base model in memory and any number of adapters next to it. Target
linears are wrapped in `MultiLoRALinear`, which holds every adapter's A/B for that module (loaded
once, kept in memory). Before each forward the engine says which adapter each row uses
(`MultiLoRA.use(ids)`); the wrapped linears then compute

    y[b] = base(x[b]) + scale[a_b] * (x[b] @ A[a_b].T) @ B[a_b].T

On CPU, as two small matmuls per linear whatever the mix of adapters in the batch (the A and B
of the adapters present are stacked, and a per-row mask keeps each row's own rank columns; see
`MultiLoRALinear`). On GPU, a batch that mixes adapters goes through the Triton gather kernels
(`qkernels.ops.batched_lora_add_`, punica-style BGMV): each row reads only its own adapter's A and
B, from a per-layer stack `GatheredLoRA` laid out once when an adapter is added or removed. A
batch on one adapter keeps the two plain matmuls (cuBLAS) on both devices.

Adapters are PEFT LoRA folders (adapter_config.json + adapter_model.safetensors); scaling is
`lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA), as PEFT computes it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qformats.peft_adapter import PeftAdapter
from qkernels.ops import batched_lora_add_
from qserve.lora.adapter import check_fit

BASE = 0  # the adapter id of "no adapter"


class RowAdapters:
    """Which adapter each row of the current forward uses; shared by every wrapped linear of the model."""

    def __init__(self):
        self.ids: list[int] = []
        self.present: tuple[int, ...] = ()  # distinct adapters in the batch (BASE excluded), first-seen order
        self.uniform: int | None = BASE  # the one adapter of every row, if they all share one (or all BASE)
        self.device: torch.device | None = None
        self.threads = 1  # torch's CPU threads in the current forward (see `one_thread`); 1 outside one
        self._masks: dict[tuple, torch.Tensor] = {}

    def set(self, ids: list[int], device: torch.device, threads: int = 1) -> None:
        self.ids, self.device, self._masks, self.threads = list(ids), device, {}, threads
        self.present = tuple(dict.fromkeys(a for a in ids if a != BASE))
        self.uniform = ids[0] if ids and all(a == ids[0] for a in ids) else None

    def clear(self) -> None:
        self.set([], self.device)
        self.uniform = BASE

    @contextmanager
    def one_thread(self):
        """Run a LoRA product on one CPU thread, then give the forward its threads back.

        The products are tiny: waking a second OpenMP thread for each costs more than the product, and
        far more when the CPU is shared (a fork waits for every thread to be scheduled), while the base
        linears around them want every thread. Only inside `MultiLoRA.use`, which owns the thread count
        of the forward and restores it on exit; elsewhere nothing is changed."""
        if self.threads > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if self.threads > 1:
                torch.set_num_threads(self.threads)

    def mask(self, adapters: tuple[int, ...], ranks: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[B, sum(ranks)]: 1 where a row's own adapter owns the column, 0 elsewhere (cached per forward).
        In the dtype of the LoRA matmuls: an fp32 mask would promote a bf16 model's h to fp32."""
        key = (adapters, ranks, dtype)
        if key not in self._masks:
            m = torch.zeros(len(self.ids), sum(ranks), dtype=dtype)
            offsets = dict(zip(adapters, (sum(ranks[:i]) for i in range(len(ranks)))))
            for row, aid in enumerate(self.ids):
                if aid in offsets:
                    m[row, offsets[aid] : offsets[aid] + ranks[adapters.index(aid)]] = 1
            self._masks[key] = m.to(self.device)
        return self._masks[key]

    def slots(self, adapters: tuple[int, ...], tokens_per_row: int) -> torch.Tensor:
        """int32 [B * tokens_per_row]: each token's index in `adapters` (-1: none); cached per forward,
        so the layers sharing one set of adapters share one host-to-device copy."""
        key = ("slots", adapters, tokens_per_row)
        if key not in self._masks:
            position = {aid: i for i, aid in enumerate(adapters)}
            slots = torch.tensor([position.get(aid, -1) for aid in self.ids], dtype=torch.int32)
            self._masks[key] = slots.repeat_interleave(tokens_per_row).to(self.device)
        return self._masks[key]


@dataclass
class GatheredLoRA:
    """One layer's adapters laid out for the batched-LoRA op: slot i holds adapter `ids[i]`."""

    ids: tuple[int, ...]
    a: torch.Tensor  # [n, r_max, in], zero past each adapter's rank
    b: torch.Tensor  # [n, out, r_max], the scale folded in as in `MultiLoRALinear.adapters`
    rank: torch.Tensor  # int32 [n]: the kernels never read past it

    @classmethod
    def build(cls, adapters: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> GatheredLoRA:
        pairs = list(adapters.values())
        r_max = max(a.shape[0] for a, _ in pairs)
        a0, b0 = pairs[0]
        a = a0.new_zeros(len(pairs), r_max, a0.shape[1])
        b = b0.new_zeros(len(pairs), b0.shape[0], r_max)
        for i, (ai, bi) in enumerate(pairs):
            a[i, : ai.shape[0]], b[i, :, : bi.shape[1]] = ai, bi
        rank = torch.tensor([ai.shape[0] for ai, _ in pairs], dtype=torch.int32, device=a.device)
        return cls(ids=tuple(adapters), a=a, b=b, rank=rank)

    def views(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each adapter's (A [r, in], B [out, r]) as views of the stack: one copy of the weights in memory."""
        ranks = self.rank.tolist()
        return {aid: (self.a[i, : ranks[i]], self.b[i, :, : ranks[i]]) for i, aid in enumerate(self.ids)}


class MultiLoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or NF4Linear) plus any number of LoRA adapters, chosen per row.

    With one adapter for the whole batch: `y + (x A^T) (s B)^T`. With several, the A of the adapters
    present are stacked (cached per set of adapters), so two matmuls serve every row whatever the mix:
    `y + ((x A_cat^T) * mask) B_cat^T`, the mask keeping each row's own rank columns. With `gather`
    (the GPU), a mixed batch instead goes through the batched-LoRA op on `gathered`, a stack of every
    adapter of the layer; `adapters` then holds views of that stack.
    """

    def __init__(self, base: nn.Module, rows: RowAdapters, gather: bool = False):
        super().__init__()
        self.base = base
        self.rows = rows
        self.gather = gather
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (A [r, in], scale * B [out, r])
        self.stacked: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        self.gathered: GatheredLoRA | None = None
        self.in_features, self.out_features = base.in_features, base.out_features

    def add_adapter(self, aid: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Install adapter `aid`'s A [r, in] and scale * B [out, r] (contiguous, in the model's dtype)."""
        self.adapters[aid] = (a, b)
        self._relayout()

    def remove_adapter(self, aid: int) -> None:
        self.adapters.pop(aid, None)
        self._relayout()

    def _relayout(self) -> None:
        self.stacked.clear()
        if self.gather:
            self.gathered = GatheredLoRA.build(self.adapters) if self.adapters else None
            if self.gathered is not None:
                self.adapters = self.gathered.views()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora(x, self.base(x))

    def add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base output for x) plus each row's LoRA term; in place when no gradient is wanted."""
        rows = self.rows
        if rows.uniform is not None:
            lora = self.adapters.get(rows.uniform)
            if lora is None:
                return y
            a, b = lora
            mask = None
        else:
            present = tuple(a for a in rows.present if a in self.adapters)
            if not present:
                return y
            if self.gathered is not None and not torch.is_grad_enabled() and y.is_contiguous():
                return self.add_gathered(x, y)
            a, b, ranks = self._stack(present)
            mask = rows.mask(present, ranks, a.dtype)
            mask = mask.view(mask.shape[0], *[1] * (x.dim() - 2), mask.shape[1])  # rows first, ranks last
        # F.linear, not x @ a.T: MKL takes a path ~50x slower for the transposed 3-D matmul on CPU.
        with self.rows.one_thread():
            h = F.linear(x, a)
            # Select, don't multiply: 0 * inf or 0 * NaN in another row's rank columns would reach this row.
            return self._add(y, h if mask is None else torch.where(mask != 0, h, 0), b)

    def add_gathered(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += each row's LoRA term through the batched-LoRA op (Triton on GPU), in place; y contiguous."""
        g = self.gathered
        idx = self.rows.slots(g.ids, math.prod(x.shape[1:-1]))
        batched_lora_add_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), g.a, g.b, idx, None, g.rank)
        return y

    @staticmethod
    def _add(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y + h @ b.T; in place into the base output when no gradient is wanted (one op, no temporary)."""
        if torch.is_grad_enabled() or not y.is_contiguous():
            return y + F.linear(h, b)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.T)
        return y

    def _stack(self, present: tuple[int, ...]):
        if present not in self.stacked:
            if len(self.stacked) >= 32:  # many different mixes: keep memory bounded
                self.stacked.clear()
            pairs = [self.adapters[a] for a in present]
            self.stacked[present] = (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1),
                                     tuple(a.shape[0] for a, _ in pairs))  # fmt: skip
        return self.stacked[present]


class MultiLoRA:
    """The adapters of one model: add/remove them, and pick each row's adapter for a forward.

    Not thread-safe: the serving engine calls it from its own thread only, between forwards.
    """

    def __init__(self, model: nn.Module, gather: bool | None = None):
        """`gather`: lay adapters out for the batched-LoRA op (default: on a CUDA model)."""
        self.model = model
        self.rows = RowAdapters()
        self.adapters: dict[int, PeftAdapter] = {}
        self._next_id = 1
        ref = next(model.parameters())
        self.dtype, self.device = (ref.dtype if ref.is_floating_point() else torch.float32), ref.device
        self.gather = self.device.type == "cuda" if gather is None else gather

    def add(self, adapter: PeftAdapter) -> int:
        """Install an adapter (QError if it does not fit the model); returns its id (never BASE, never reused)."""
        check_fit(self.model, adapter)
        aid, self._next_id = self._next_id, self._next_id + 1
        for module, (a, b) in adapter.weights.items():
            layer = self._wrap(module)
            a, b = a.to(self.device, self.dtype), b.to(self.device, self.dtype) * adapter.scale(module)
            layer.add_adapter(aid, a.contiguous(), b.contiguous())
        self.adapters[aid] = adapter
        return aid

    def remove(self, aid: int) -> None:
        adapter = self.adapters.pop(aid)
        for module in adapter.weights:
            self.model.get_submodule(module).remove_adapter(aid)

    def _wrap(self, module: str) -> MultiLoRALinear:
        target = self.model.get_submodule(module)
        if isinstance(target, MultiLoRALinear):
            return target
        wrapped = MultiLoRALinear(target, self.rows, self.gather)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)
        return wrapped

    @contextmanager
    def use(self, ids: list[int]):
        """Within the block (one forward of an engine step), row b uses adapter `ids[b]` (BASE: none).

        Owns torch's CPU thread count for the forward: read once on entry, restored on exit whatever
        the forward did; the LoRA products inside run on one thread (`RowAdapters.one_thread`)."""
        threads = torch.get_num_threads()
        self.rows.set(ids, self.device, threads if self.device.type == "cpu" else 1)
        try:
            yield
        finally:
            self.rows.clear()
            torch.set_num_threads(threads)
