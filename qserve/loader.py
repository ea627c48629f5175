"""Load a `CausalLM` from an fp16/bf16/fp32 or NF4 (bitsandbytes-4bit layout) checkpoint folder or Hub id.

The model is built on the meta device (no memory), then filled shard by shard, one tensor at a
time: float tensors are cast to the compute dtype, NF4 weights become `NF4Linear` modules holding
the stored tensors as they are. Peak memory is therefore about the final model size (near its
4-bit size for NF4) plus one tensor. Every tensor is checked against the config before use: a
missing, unexpected or wrongly shaped tensor is a QError naming it; so is a float tensor (or an NF4
scale) holding NaN or inf, which would silently turn every answer into nothing.
`load_meta_model` stops before the data: the same checked model, every tensor on the meta device,
for a loader that reads only its part of each tensor (qconvert/fsdp_load.py).

Compute dtype (`dtype=None`): on CPU float32 (fp16 matmuls are slow on CPUs, and bf16 is only fast
on some); on CUDA the checkpoint's dtype, or `bnb_4bit_compute_dtype` for NF4 checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qformats.checkpoint import Checkpoint, iter_checkpoint_tensors, open_checkpoint
from qformats.dtypes import known_dtype, parse_dtype
from qformats.errors import QError
from qformats.hub_pull import resolve_source
from qformats.nf4 import NF4_PART_SUFFIXES, QUANT_STATE_SUFFIX, NF4Weight, read_quant_state
from qformats.safetensors_file import TensorInfo, read_tensor
from qserve.model import CausalLM
from qserve.model_config import ModelArgs
from qserve.nf4_linear import NF4Linear

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve_model_dir(model: str | Path, revision: str | None = None) -> Path:
    """A local folder as-is, or a Hub id (`owner/name`) fetched into the HF cache (weights, configs, tokenizer).

    Honours HF_HUB_OFFLINE (cache only), HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_ENDPOINT; see qformats.hub_pull.
    """
    return resolve_source(model, revision=revision, allow_patterns=HUB_PATTERNS)


def quantization_of(cfg: dict, name: str = "config.json") -> dict | None:
    """The bitsandbytes-4bit `quantization_config`, None for a float checkpoint; QError for other kinds."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise QError(f"{name}: quantization {method!r} is not supported; qserve loads bitsandbytes NF4 checkpoints")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise QError(f"{name}: 8-bit bitsandbytes checkpoints are not supported, only 4-bit NF4")
    if q.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise QError(f"{name}: bnb_4bit_quant_type {q.get('bnb_4bit_quant_type')!r} is not supported, only nf4")
    return q


def default_dtype(cfg: dict, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    q = quantization_of(cfg) or {}
    return known_dtype(q.get("bnb_4bit_compute_dtype") or cfg.get("dtype") or cfg.get("torch_dtype")) or torch.float32


def load_model(model: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               revision: str | None = None, progress: bool = False) -> CausalLM:  # fmt: skip
    """Load a checkpoint folder or Hub id as a `CausalLM` in eval mode, every weight frozen.

    dtype: compute dtype (None: see module doc). Loaded parameters have requires_grad=False;
    training code enables what it trains (LoRA adapters) and gets gradients through the rest.
    """
    device = torch.device(device)
    model_dir = resolve_model_dir(model, revision)
    ckpt, lm, nf4_prefixes = _checked_skeleton(model_dir)
    dtype = parse_dtype(dtype) or default_dtype(ckpt.config, device)
    found = {name: info.file for name, info in ckpt.tensors.items()}
    expected = dict(lm.named_parameters(remove_duplicate=False))
    tied = lm.args.tie_word_embeddings

    pending: dict[str, dict[str, torch.Tensor]] = {p: {} for p in nf4_prefixes}
    bar = tqdm(total=len(found), desc="loading", unit="tensor", disable=None if progress else True, leave=False)  # None: off when not a TTY
    for name, t in iter_checkpoint_tensors(ckpt):
        bar.update()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QError(f"{found[name]}: tensor {name!r} has non-finite values (NaN or inf)")
        group = _nf4_group(name, pending)
        if group is not None:
            pending[group][name] = t.to(device)
            if len(pending[group]) == _nf4_group_size(pending[group], group):
                _install_nf4(lm, group, pending.pop(group), model_dir)
            continue
        if name in expected and not (tied and name == "lm_head.weight"):
            _set_param(lm, name, t.to(device=device, dtype=dtype))
    bar.close()
    if pending:
        p, got = next(iter(pending.items()))
        NF4Weight.from_tensors(p, got)  # raises naming the missing part
    if tied:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.model.reset_rope(device)
    for name, t in [*lm.named_parameters(), *lm.named_buffers()]:
        if t is not None and t.is_meta:  # every expected tensor was checked above; this is a loader bug
            raise QError(f"{model_dir}: {name!r} was not loaded")
    return lm.eval()


def load_meta_model(model_dir: Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[CausalLM, dict[str, TensorInfo]]:  # fmt: skip
    """The model of a checked checkpoint folder with every tensor on the meta device (no data read but
    the small NF4 quant states), shaped and typed as `load_model(model_dir, dtype=dtype, device=device)`
    would load it, NF4 linears included; and where each checkpoint tensor lies. For a loader that fills
    only parts of the tensors (qconvert/fsdp_load.py: each rank its own rows). Frozen, in eval mode;
    rope frequencies on the CPU."""
    ckpt, lm, nf4_prefixes = _checked_skeleton(model_dir)
    dtype = parse_dtype(dtype) or default_dtype(ckpt.config, torch.device(device))
    tensors = ckpt.tensors
    for prefix in nf4_prefixes:
        parts = {k: torch.empty(info.shape, dtype=info.dtype, device="meta") for k, info in tensors.items()
                 if _nf4_group(k, (prefix,)) == prefix}  # fmt: skip
        state = tensors[prefix + QUANT_STATE_SUFFIX]  # the JSON that gives shape, blocksize and offset
        with open(state.file, "rb") as f:
            parts[state.name] = read_tensor(f, state)
        _install_nf4(lm, prefix, parts, model_dir)
    for name, p in list(lm.named_parameters(remove_duplicate=False)):  # the float tensors, NF4 biases included
        _set_param(lm, name, torch.empty(p.shape, dtype=dtype, device="meta"))
    if lm.args.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return lm.requires_grad_(False).eval(), tensors


def _checked_skeleton(model_dir: Path) -> tuple[Checkpoint, CausalLM, set[str]]:
    """The checkpoint (config.json and every shard header checked), its model on the meta device, and the
    names of its 4-bit weights, once every tensor has been checked against the config: a missing,
    unexpected or wrongly shaped tensor is a QError naming it, before any data is read."""
    ckpt = open_checkpoint(model_dir)
    cfg = ckpt.config
    args = ModelArgs.from_config(cfg, str(model_dir / "config.json"))
    quantization_of(cfg, str(model_dir / "config.json"))
    found = {name: (info.file, info.shape) for name, info in ckpt.tensors.items()}

    with torch.device("meta"):
        lm = CausalLM(args)
    expected = {name: tuple(p.shape) for name, p in lm.named_parameters(remove_duplicate=False)}
    nf4_prefixes = {k.removesuffix(QUANT_STATE_SUFFIX) for k in found if k.endswith(QUANT_STATE_SUFFIX)}
    for p in nf4_prefixes:
        if p not in expected or not isinstance(_module_of(lm, p), nn.Linear):
            raise QError(f"{model_dir}: unexpected 4-bit tensor {p!r} (not a linear weight of this "
                         f"{args.model_type} config)")  # fmt: skip
    tied = args.tie_word_embeddings
    # In model order, so the first tensor reported is the first one that disagrees.
    for name, want in expected.items():
        if name in found and name not in nf4_prefixes and found[name][1] != want:
            raise QError(f"{found[name][0]}: tensor {name!r} has shape {list(found[name][1])}, but config.json "
                         f"implies {list(want)}")  # fmt: skip
    missing = [n for n in expected if n not in found and not (tied and n == "lm_head.weight")]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise QError(f"{model_dir}: checkpoint lacks {', '.join(repr(m) for m in missing[:3])}{more}")
    for name, (shard, _) in found.items():
        known = name in expected or _nf4_group(name, nf4_prefixes) is not None
        if not known and not name.endswith("rotary_emb.inv_freq") and not (tied and name == "lm_head.weight"):
            raise QError(f"{shard}: unexpected tensor {name!r} (not part of a {args.model_type} model with this "
                         "config.json)")  # fmt: skip
    return ckpt, lm, nf4_prefixes


def _nf4_group(name: str, prefixes) -> str | None:
    """The quantized weight (`P.weight`) that tensor `name` belongs to, if any."""
    if name in prefixes:
        return name
    for suffix in NF4_PART_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in prefixes:
            return name[: -len(suffix)]
    return None


def _nf4_group_size(got: dict[str, torch.Tensor], prefix: str) -> int:
    """How many tensors the weight `prefix` has: 4, or 6 with double quantization (known once the state is read)."""
    state = got.get(prefix + QUANT_STATE_SUFFIX)
    if state is None:
        return -1
    try:
        nested = "nested_offset" in read_quant_state(state)
    except ValueError:
        return len(got)  # let NF4Weight.from_tensors report the unreadable state
    return 6 if nested else 4


def _module_of(root: nn.Module, param_name: str) -> nn.Module:
    return root.get_submodule(param_name.rsplit(".", 1)[0])


def _set_param(root: nn.Module, name: str, t: torch.Tensor) -> None:
    module_name, attr = name.rsplit(".", 1)
    module = root.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(t, requires_grad=False))


def _install_nf4(root: nn.Module, weight_name: str, tensors: dict[str, torch.Tensor], model_dir: Path) -> None:
    w = NF4Weight.from_tensors(weight_name, tensors)
    if w.offset is not None and not math.isfinite(w.offset):
        raise QError(f"{model_dir}: 4-bit tensor {weight_name!r} has a non-finite nested_offset ({w.offset})")
    module_name = weight_name.rsplit(".", 1)[0]
    old = root.get_submodule(module_name)
    if tuple(w.shape) != (old.out_features, old.in_features):
        raise QError(f"{model_dir}: 4-bit tensor {weight_name!r} has shape {list(w.shape)}, but config.json "
                     f"implies {[old.out_features, old.in_features]}")  # fmt: skip
    new = NF4Linear(w, bias=None)
    new.bias = old.bias  # a meta placeholder until the bias tensor arrives, or the loaded one
    parent_name, child = module_name.rsplit(".", 1)
    setattr(root.get_submodule(parent_name), child, new)
