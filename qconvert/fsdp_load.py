"""Loading a checkpoint for FSDP2 training, streamed: each rank reads only the rows it keeps.

The model is built on the meta device (`qserve.loader.load_meta_model`: checked against the config,
no data), LoRA is applied, FSDP2 shards it (`qconvert.fsdp.shard_for_training`), and only then is
memory allocated: each rank's local shard of every parameter, which it fills from the safetensors
files, reading its own row range of each tensor. FSDP2 shards dim 0 as `torch.chunk` does (rank r
keeps rows `[r * ceil(n / world), ...)`, the last ranks fewer or none, padded in FSDP's storage), so
the 4-bit base (packed codes, 8-bit scales, nested scales, maps) and the float tensors alike are
row ranges of the file. No rank ever holds the whole base: the peak is the rank's shards plus one
bounded read buffer.

The LoRA weights are small: every rank draws them whole, in `apply_lora`'s order from the same
seeded generator, then keeps its shard, so a sharded run starts from exactly the adapter of a
single-process run (tests/qconvert/test_fsdp_load.py checks the shards byte for byte).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qconvert.fsdp import shard_for_training, shard_rows
from qformats.errors import QError
from qformats.peft_adapter import AdapterConfig
from qformats.safetensors_file import TensorInfo, read_into
from qserve.loader import load_meta_model
from qserve.lora import apply_lora, lora_modules
from qserve.model import CausalLM
from qserve.nf4_linear import NF4Linear

# NF4Linear's parameters (after `hold_as_parameters`) and the checkpoint names of what they hold,
# relative to the module: bitsandbytes' layout (qformats/nf4.py, NF4Weight.to_tensors).
_NF4_STORED = {"weight": "weight", "weight_absmax": "weight.absmax", "weight_quant_map": "weight.quant_map",
               "weight_nested_absmax": "weight.nested_absmax", "weight_nested_quant_map": "weight.nested_quant_map"}  # fmt: skip
READ_CHUNK_BYTES = 4 << 20  # rows that need a cast to the compute dtype are read in pieces of at most this much


def load_sharded_model(model_dir: Path, adapter_config: AdapterConfig, *, seed: int, dtype: torch.dtype | None,
                       device: torch.device, offload: bool = False, progress: bool = False) -> CausalLM:  # fmt: skip
    """The model of `model_dir` with the LoRA of `adapter_config` (initialized from `seed`), sharded over
    the default process group (a collective: every rank calls it). `progress` is accepted for the
    whole-model loader's signature; reading a rank's rows takes seconds, so there is no bar."""
    device = torch.device(device)
    model, tensors = load_meta_model(Path(model_dir), dtype=dtype, device=device)
    sources = _sources(model, tensors)
    apply_lora(model, adapter_config)
    generator = torch.Generator(device).manual_seed(seed)
    for lora in lora_modules(model).values():  # whole on every rank, drawn in apply_lora's order
        lora.lora_A.to_empty(device=device)
        lora.lora_B.to_empty(device=device)
        lora.reset_lora_parameters(generator)
    shard_for_training(model, None, offload=offload)
    # Memory for the base shards only now; FSDP's `_apply` then pads each into the storage it all-gathers from.
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    model.model.reset_rope(device)
    failed = _fill_shards(model, sources)
    # One rank's bad rows (NaN in a scale) must stop every rank, not leave the others waiting in a collective.
    bad = torch.tensor([failed is not None], dtype=torch.int32, device=device)  # nccl reduces device tensors only
    dist.all_reduce(bad)
    if failed is not None:
        raise failed
    if bad.item():
        raise QError(f"{model_dir}: another rank found bad data in the checkpoint (see its error)")
    return model


def _sources(model: CausalLM, tensors: dict[str, TensorInfo]) -> dict[tuple[nn.Module, str], TensorInfo]:
    """(module, parameter name) -> the checkpoint tensor it is loaded from; taken before LoRA wraps the
    linears (which moves them under `.base`) and before sharding replaces the parameters."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, NF4Linear):
            out |= {(module, attr): tensors[prefix + key] for attr, key in _NF4_STORED.items()
                    if prefix + key in tensors}  # fmt: skip
        for attr, p in module.named_parameters(recurse=False):
            if prefix + attr in tensors:
                out[(module, attr)] = tensors[prefix + attr]
    if model.args.tie_word_embeddings:  # the embedding table, loaded once (a tied checkpoint may hold a copy)
        out.pop((model.lm_head, "weight"), None)
    return out


def _fill_shards(model: CausalLM, sources: dict[tuple[nn.Module, str], TensorInfo]) -> QError | None:
    """Read each parameter's local rows into its shard, file by file in file order; the first bad
    tensor's QError (returned, so that the caller can tell the other ranks first)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    order = sorted(sources.items(), key=lambda item: (str(item[1].file), item[1].start))
    files = {}
    try:
        with torch.no_grad():
            for (module, attr), info in order:
                local = module._parameters[attr].to_local()
                first = shard_rows(info.shape[0], rank, world)[0]
                if local.shape[1:] != info.shape[1:] or (len(local) and first + len(local) > info.shape[0]):
                    raise QError(f"{info.file}: tensor {info.name!r} of shape {list(info.shape)} does not match "
                                 f"its shard {list(local.shape)} (a loader bug)")  # fmt: skip
                if info.file not in files:
                    files[info.file] = open(info.file, "rb")  # noqa: SIM115 (closed below)
                _read_rows(files[info.file], info, first, local)
    except QError as e:
        return e
    finally:
        for f in files.values():
            f.close()
    return None


def _read_rows(f, info: TensorInfo, first: int, out: torch.Tensor) -> None:
    """Rows `[first, first + len(out))` of tensor `info` (open file `f`) into `out`: straight into its
    memory when the dtypes agree (the NF4 storage), else through a buffer of at most READ_CHUNK_BYTES
    cast piece by piece (fp16 embeddings into an fp32 model); a float row holding NaN or inf is a
    QError naming the tensor."""
    row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
    flat = out.view(len(out), math.prod(info.shape[1:]))
    step = max(1, len(out) if out.dtype == info.dtype else READ_CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, len(out), step):
        n = min(step, len(out) - start)
        dst = flat[start : start + n]
        piece = dst if out.dtype == info.dtype else torch.empty(dst.shape, dtype=info.dtype)
        read_into(f, memoryview(piece.view(-1).view(torch.uint8).numpy()), info, info.start + (first + start) * row_bytes)
        if piece.is_floating_point() and not torch.isfinite(piece).all():
            raise QError(f"{info.file}: tensor {info.name!r} has non-finite values (NaN or inf)")
        if piece is not dst:
            dst.copy_(piece)
