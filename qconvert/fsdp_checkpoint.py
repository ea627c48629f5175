"""Checkpoints of a sharded (FSDP2) run: torch.distributed.checkpoint (DCP) over safetensors files.

An `--fsdp` run's checkpoint folder (qconvert/train_checkpoint.py) holds, in place of
adapter_model.safetensors and optimizer.safetensors, a folder `dcp/` with one safetensors file per
rank (DCP's HuggingFaceStorageWriter: `shard-<rank+1>-model-00001-of-00001.safetensors`), each with
that rank's rows of:
- `lora.<name>`: every LoRA weight (`<name>` as in the model, `model.layers.0.mlp.up_proj.lora_A.weight`);
- `optim.<name>.exp_avg` / `.exp_avg_sq` (32-bit state) or `.state1` / `.state2` (8-bit codes),
  sharded as the weight is;
- `optim.<name>.absmax1.rank<R>` / `.absmax2.rank<R>`: the 8-bit block scales of rank R, whose
  blocks of 256 run over R's own rows, so they belong to that rank whole;
- `optim.<name>.step`, written once.
A file's safetensors metadata says where its rows sit in the whole tensor (DCP's sharding info).
Nothing is pickled and nothing is read with torch.load: the reader plans from the safetensors headers.

Loading reshards: DCP reads each rank's rows of every tensor from whichever files hold them, so a
checkpoint written by N ranks loads on M ranks, or on one process as whole tensors. The 8-bit
state's blocks follow the writing rank's rows: on the same rank count codes and scales are copied
(bit-identical); on another, the moments are decoded with the writer's blocks and coded again with
the reader's, which is exact where the old blocks line up with the new ones and otherwise moves a
moment by at most half a step of the 8-bit map (what every optimizer step's re-coding does). A
single-process checkpoint (whole tensors) loads into a sharded run the same way.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from qconvert.fsdp import shard_rows
from qconvert.paged_adamw import BLOCKSIZE, PagedAdamW, quantize_blockwise, read_state_file
from qconvert.train_checkpoint import SHARDS_DIR, load_adapter_tensors
from qformats.errors import QError
from qformats.nf4 import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED
from qserve.lora import lora_modules

_MOMENTS = {32: ("exp_avg", "exp_avg_sq"), 8: ("state1", "state2")}
_SCALES = (("absmax1", DYNAMIC_MAP_SIGNED), ("absmax2", DYNAMIC_MAP_UNSIGNED))  # with the map each codes with

# torch.distributed.checkpoint and .tensor are imported where a sharded run needs them: they cost a
# single-process run, which resumes through `load` too, about 40 MB of resident imports (sympy).


def lora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights by name, in `lora_parameters`' order (the optimizer's)."""
    return {f"{n}.lora_{half}.weight": lin.weight for n, m in lora_modules(model).items()
            for half, lin in (("A", m.lora_A), ("B", m.lora_B))}  # fmt: skip


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in lora_weights(model).values())


def save(folder: Path, model: nn.Module, optimizer: PagedAdamW) -> dict:
    """Write this rank's shards of the LoRA weights and optimizer state into `folder/dcp` (a collective:
    every rank calls it). Returns what trainer_state.json keeps for `load`."""
    named = lora_weights(model)
    rank, world = _rank_world(named)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, p) in enumerate(named.items()):
        state = sd["state"][i]
        tensors[f"lora.{name}"] = p.detach()
        tensors[f"optim.{name}.step"] = state["step"]
        for key in _MOMENTS[optimizer.param_bits[i]]:
            tensors[f"optim.{name}.{key}"] = _shaped_like(p, state[key])
        if optimizer.param_bits[i] == 8:
            for key, _ in _SCALES:
                tensors[f"optim.{name}.{key}.rank{rank}"] = state[key]
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(folder / SHARDS_DIR), save_distributed=True)
    dcp.save(tensors, storage_writer=writer, no_dist=not tdist.is_initialized())
    return {"shards": world, "optimizer_bits": optimizer.optim_bits, "param_groups": sd["param_groups"]}


def load(folder: Path, model: nn.Module, optimizer: PagedAdamW, record: dict | None) -> None:
    """Set the LoRA weights and optimizer state from a checkpoint: the sharded layout (`record` is what
    `save` returned) or a single process's whole tensors (`record` None), on any number of ranks, sharded
    or not (a collective where the checkpoint is sharded)."""
    named = lora_weights(model)
    rank, world = _rank_world(named)
    if record is None:
        saved, shards = _read_whole(folder, named, optimizer), 1
    else:
        if record.get("optimizer_bits") != optimizer.optim_bits:
            raise QError(f"{folder}: holds {record.get('optimizer_bits')}-bit optimizer state, this run uses "
                         f"{optimizer.optim_bits}-bit")  # fmt: skip
        shards = int(record["shards"])
        saved = _read_shards(folder, named, optimizer, rank if world == shards else None, shards)
    state = {}
    for i, (name, p) in enumerate(named.items()):
        mine = saved[name]
        with torch.no_grad():
            _local(p).copy_(mine.pop("weight"))
        if optimizer.param_bits[i] == 8 and "absmax1" not in mine:  # another rank count: re-block the codes
            start, stop = _flat_range(p, _row_range(p))
            holders = [_flat_range(p, shard_rows(p.shape[0], r, shards)) for r in range(shards)]
            for (key, code), moment in zip(_SCALES, _MOMENTS[8]):
                scales = [mine.pop(f"{key}.rank{r}") for r in range(shards)]
                mine[moment], mine[key] = _reblock(mine[moment], start, stop, holders, scales, code)
        state[i] = mine
    groups = record["param_groups"] if record is not None else saved["param_groups"]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except QError as e:
        raise QError(f"{folder}: {e}") from None


def _read_shards(folder: Path, named: dict[str, torch.Tensor], optimizer: PagedAdamW, rank: int | None,
                 shards: int) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
    """Each weight's and moment's rows this rank holds, read through DCP from `folder/dcp`, and the 8-bit
    scales: this rank's own when `rank` is given (the writer had this rank count), else every writer's."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(folder / SHARDS_DIR))
    try:
        meta = reader.read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 (a damaged file fails in safetensors or DCP with many types)
        raise QError(f"{folder / SHARDS_DIR}: unreadable sharded checkpoint ({type(e).__name__}: {e})") from None
    writers = [rank] if rank is not None else range(shards)  # whose 8-bit scales this rank reads
    targets: dict[str, torch.Tensor] = {}
    for i, (name, p) in enumerate(named.items()):
        local = _local(p)
        targets[f"lora.{name}"] = _shaped_like(p, torch.empty(local.shape, dtype=local.dtype))
        targets[f"optim.{name}.step"] = torch.zeros(())
        bits = optimizer.param_bits[i]
        for key in _MOMENTS[bits]:
            targets[f"optim.{name}.{key}"] = _shaped_like(p, torch.empty(local.shape, dtype=_moment_dtype(bits)))
        if bits == 8:
            for key, _ in _SCALES:
                for r in writers:
                    k = f"optim.{name}.{key}.rank{r}"
                    targets[k] = torch.empty(meta[k].size if k in meta else 0)
    for key in targets:
        if key not in meta:
            raise QError(f"{folder / SHARDS_DIR}: no tensor {key} (a checkpoint of another model or settings)")
        whole, held = meta[key].size.numel(), sum(c.sizes.numel() for c in meta[key].chunks)
        if held != whole:
            raise QError(f"{folder / SHARDS_DIR}: {key} has {held} of its {whole} elements (a shard file is missing)")
    with warnings.catch_warnings():  # one process loading a sharded checkpoint is what no_dist is for: no warning
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(targets, storage_reader=reader, no_dist=not tdist.is_initialized())
    saved = {}
    for i, name in enumerate(named):
        mine = {"weight": _local(targets[f"lora.{name}"]), "step": targets[f"optim.{name}.step"]}
        for key in _MOMENTS[optimizer.param_bits[i]]:
            mine[key] = _local(targets[f"optim.{name}.{key}"])
        for key, _ in _SCALES if optimizer.param_bits[i] == 8 else ():
            for r in writers:  # this rank's own scales as they are; every writer's, to re-block, by writer
                mine[key if rank is not None else f"{key}.rank{r}"] = targets[f"optim.{name}.{key}.rank{r}"]
        saved[name] = mine
    return saved


def _read_whole(folder: Path, named: dict[str, torch.Tensor], optimizer: PagedAdamW) -> dict:
    """A single process's checkpoint (adapter_model.safetensors, optimizer.safetensors) cut to this rank's rows."""
    adapter = load_adapter_tensors(folder)
    whole = read_state_file(folder / "optimizer.safetensors", optimizer.optim_bits)
    saved: dict = {"param_groups": whole["param_groups"]}
    for i, (name, p) in enumerate(named.items()):
        key, state = f"base_model.model.{name}", whole["state"].get(i)
        if key not in adapter or state is None:
            raise QError(f"{folder}: no saved state for {key}")
        bits = optimizer.param_bits[i]
        for k in ("step", *_MOMENTS[bits], *(key for key, _ in _SCALES if bits == 8)):
            if k not in state:
                raise QError(
                    f"{folder / 'optimizer.safetensors'}: parameter {i} lacks {k!r} ({bits}-bit state expected)"
                )
        rows = _row_range(p)
        mine = {"weight": adapter[key][rows[0] : rows[1]], "step": state["step"]}
        for k in _MOMENTS[bits]:
            mine[k] = state[k][rows[0] : rows[1]]
        if bits == 8:
            if rows == (0, p.shape[0]):
                mine.update(absmax1=state["absmax1"], absmax2=state["absmax2"])
            else:
                mine.update({"absmax1.rank0": state["absmax1"], "absmax2.rank0": state["absmax2"]})
        saved[name] = mine
    return saved


def _reblock(codes: torch.Tensor, start: int, stop: int, holders: list[tuple[int, int]], scales: list[torch.Tensor],
             code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """8-bit codes of the flat elements [start, stop), coded in blocks of 256 from each holder's own start
    (holders[r] = (first, end) element of writer r, scales[r] its block scales), coded again in blocks of
    256 from `start`: (codes, scales). A new block that is an old block keeps its codes and scale as they
    were (decoding and coding again could move its largest value: the signed map has no -1)."""
    n = stop - start
    flat = codes.reshape(-1).long()
    values, old_scale = torch.zeros(n), torch.zeros(n)
    block_id = torch.zeros(n, dtype=torch.long)  # which old block each element was coded in, numbered over holders
    opens, closes = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)  # first / last of its block
    numbered = 0
    for (first, end), absmax in zip(holders, scales):
        lo, hi = max(start, first), min(stop, end)
        if lo < hi:
            at = torch.arange(lo, hi) - first
            mine = slice(lo - start, hi - start)
            old_scale[mine] = absmax[at // BLOCKSIZE]
            values[mine] = code[flat[mine]] * old_scale[mine]
            block_id[mine] = numbered + at // BLOCKSIZE
            opens[mine] = at % BLOCKSIZE == 0
            closes[mine] = (at % BLOCKSIZE == BLOCKSIZE - 1) | (at == end - first - 1)
        numbered += -(-(end - first) // BLOCKSIZE)
    padded = torch.zeros(-(-n // BLOCKSIZE) * BLOCKSIZE)
    padded[:n] = values
    new_codes, absmax = quantize_blockwise(padded, code)  # zero padding: what PagedAdamW's pages hold there
    heads = torch.arange(0, n, BLOCKSIZE)
    tails = torch.clamp(heads + BLOCKSIZE - 1, max=n - 1)
    same = opens[heads] & closes[tails] & (block_id[heads] == block_id[tails])  # the new block is an old one
    absmax[same] = old_scale[heads[same]]
    kept = same.repeat_interleave(BLOCKSIZE)[:n]
    new_codes = torch.where(kept, flat, new_codes[:n].long()).to(torch.uint8)
    return new_codes.view(codes.shape), absmax


def _rank_world(named: dict[str, torch.Tensor]) -> tuple[int, int]:
    """This process's place on the mesh the LoRA weights are sharded over; (0, 1) when they are whole."""
    for p in named.values():
        if _is_dtensor(p):
            return p.device_mesh.get_local_rank(), p.device_mesh.size()
    return 0, 1


def _row_range(p: torch.Tensor) -> tuple[int, int]:
    """The rows of `p` this process holds (all of them when `p` is not sharded)."""
    if not _is_dtensor(p):
        return 0, p.shape[0]
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise QError(f"a LoRA weight is sharded as {p.placements}: checkpoints expect FSDP2's Shard(0)")
    rows = shard_rows(p.shape[0], p.device_mesh.get_local_rank(), p.device_mesh.size())
    if rows[1] - rows[0] != p.to_local().shape[0]:
        raise QError(f"a LoRA weight of shape {list(p.shape)} holds {p.to_local().shape[0]} rows on this rank, "
                     f"not the {rows[1] - rows[0]} of torch.chunk's split")  # fmt: skip
    return rows


def _flat_range(p: torch.Tensor, rows: tuple[int, int]) -> tuple[int, int]:
    """The flat elements [first, end) of `p` that its rows [first, end) hold."""
    row = p.numel() // max(p.shape[0], 1)
    return rows[0] * row, rows[1] * row


def _shaped_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's rows) as a tensor sharded like `p`, so DCP knows where its rows sit."""
    if not _is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")  # a DTensor (an FSDP2 parameter), without importing DTensor's module


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _moment_dtype(bits: int) -> torch.dtype:
    return torch.float32 if bits == 32 else torch.uint8
