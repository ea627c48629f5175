"""Quantize an HF safetensors checkpoint to NF4 (+ double-quantized scales), streaming tensor by tensor.

The output is the bitsandbytes/transformers layout of docs/format.md: every 2-D `.weight` of a linear
layer inside the decoder layers becomes NF4 (packed codes, absmax, quant maps, JSON quant state);
embeddings, `lm_head`, norms, biases and anything 1-D stay in the source dtype. How the bytes move
(qconvert/quantize_stream.py, docs/checkpoints.md): a scan makes each output shard's header known
before its data, then a reader thread, the kernel and a writer thread stream every tensor once into
the final shard files (each output byte hashed as written, the source files by a thread of their
own), in about two tensors of memory, far below one shard.
Non-finite source tensors are refused by name unless allowed. On CPU the codec runs as the fused
C++ kernel of qkernels/cpu_quantize.py (byte-identical to qformats' torch reference, which runs
instead on CUDA or when the extension cannot be built).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from qconvert.quantize_stream import Job, Settings
from qconvert.quantize_stream import run as run_stream
from qformats import dtypes
from qformats.checkpoint import CONFIG_FILE, Checkpoint, open_checkpoint
from qformats.errors import QError
from qformats.lineage import check_base_model_id, model_origin, portable_name
from qformats.manifest import MANIFEST_FILE, BackgroundSha256, build_manifest, sha256_file
from qformats.nf4 import SUPPORTED_INPUT_DTYPES, check_blocksize
from qformats.output_folder import check_out_apart_from_sources
from qformats.safetensors_file import TensorInfo
from qformats.sharded_writer import ShardedWriter, copy_extra_files, parse_size
from qserve.device import resolve_device

# A tensor inside a numbered decoder layer: `model.layers.3.`, `transformer.h.3.`, `blocks.3.`.
_DECODER_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.")
_NOT_LINEAR = ("norm", "embed", "ln_", "wte", "wpe")
# Files fetched from the Hub: weights, configs, tokenizer, chat template.
HUB_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja")


@dataclass
class QuantizeSummary:
    """What `quantize_checkpoint` did; sizes are tensor bytes (before: source, after: output)."""

    out: Path
    parameters: int
    quantized_parameters: int
    quantized_tensors: list[str]
    kept_tensors: list[str]
    skip_modules: list[str]
    bytes_before: int
    bytes_after: int
    seconds: float
    shards: list[str] = field(default_factory=list)

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.bytes_after / max(self.parameters, 1)

    def describe(self) -> str:
        mb = 1e6
        return "\n".join([
            (f"quantized {len(self.quantized_tensors)} of {len(self.quantized_tensors) + len(self.kept_tensors)} "
             f"tensors to NF4+DQ: {self.quantized_parameters / 1e6:.1f}M of {self.parameters / 1e6:.1f}M parameters"),
            (f"kept in the source dtype: {len(self.kept_tensors)} tensors; llm_int8_skip_modules: "
             f"{', '.join(self.skip_modules) or '(none)'}"),
            (f"size {self.bytes_before / mb:.1f} MB -> {self.bytes_after / mb:.1f} MB "
             f"({self.bits_per_parameter:.2f} bits per parameter)"),
            (f"wrote {self.out} ({len(self.shards)} shard{'s' * (len(self.shards) > 1)}) in {self.seconds:.1f} s "
             f"({self.bytes_before / mb / max(self.seconds, 1e-9):.0f} MB/s of source)"),
        ])  # fmt: skip


def module_matches(module: str, patterns: Iterable[str]) -> bool:
    """Whether `module` is named by a skip pattern, with transformers' rule (so its loader agrees):
    a prefix ending at a module boundary, a regex with that boundary, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for p in patterns:
        try:
            if re.match(rf"(?:{p}){boundary}", module):
                return True
        except re.error:
            pass
        if module.endswith(p):
            return True
    return False


def is_decoder_linear(info: TensorInfo) -> bool:
    """A 2-D `.weight` inside a numbered decoder layer that is not a norm or embedding."""
    name = info.name
    if not name.endswith(".weight") or len(info.shape) != 2 or not _DECODER_LAYER.search(name):
        return False
    module_leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return not any(s in module_leaf for s in _NOT_LINEAR)


def plan_tensors(ckpt: Checkpoint, skip_modules: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Decide per tensor: "nf4" or "kept"; and the modules to list in `llm_int8_skip_modules`.

    Raises QError before anything is written when a weight to quantize has a dtype NF4 cannot take.
    """
    skip_modules = [s for s in skip_modules if s]
    kinds: dict[str, str] = {}
    skipped = ["lm_head"] + [s for s in skip_modules if s != "lm_head"]
    for name, info in ckpt.tensors.items():
        module = name.removesuffix(".weight")
        if is_decoder_linear(info) and not module_matches(module, skip_modules):
            if info.dtype not in SUPPORTED_INPUT_DTYPES:
                raise QError(f"{info.file}: tensor {name!r} is {info.dtype_name}; NF4 quantizes F16, BF16 or F32 "
                             "weights (is this checkpoint already quantized?)")  # fmt: skip
            kinds[name] = "nf4"
        else:
            kinds[name] = "kept"
            is_other_linear = (name.endswith(".weight") and len(info.shape) == 2 and "embed" not in name
                               and not _DECODER_LAYER.search(name))  # fmt: skip
            if is_other_linear and not module_matches(module, skipped):
                skipped.append(module)
    if not any(k == "nf4" for k in kinds.values()):
        raise QError(f"{ckpt.folder}: found no linear weights inside decoder layers to quantize")
    return kinds, skipped


def source_dtype(ckpt: Checkpoint, kinds: dict[str, str]) -> torch.dtype:
    """The dtype the quantized weights come from (they all must share it, as one model dtype)."""
    dtypes = {ckpt.tensors[n].dtype for n, k in kinds.items() if k == "nf4"}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise QError(f"{ckpt.folder}: linear weights mix dtypes ({names}); convert to one dtype first")
    return dtypes.pop()


def quantization_config(compute_dtype: str, double_quant: bool, skip_modules: list[str]) -> dict:
    """The `quantization_config` block of config.json, as transformers writes it for bnb 4-bit."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str | None = None,
    skip_modules: Iterable[str] = (),
    shard_size: float | str = 5e9,
    device: str | torch.device = "cpu",
    force: bool = False,
    revision: str | None = None,
    progress: bool = True,
    allow_nonfinite: bool = False,
    pipelined: bool = True,
    base_model: str | None = None,
    source_hashes: BackgroundSha256 | None = None,
) -> QuantizeSummary:
    """Quantize the checkpoint at SRC (a folder or Hub repo id) into the folder OUT.

    OUT appears only when everything is written (it is built in `OUT.tmp-<pid>`); a non-empty OUT
    is refused unless `force`. `compute_dtype` defaults to the source dtype. A source tensor with a
    NaN or inf is refused by name unless `allow_nonfinite`. `pipelined=False` runs the reader, the
    kernel and the writer one after the other on this thread (same output; for tests).
    `base_model` (a Hub repo id) is recorded as the original where SRC's lineage does not lead to one;
    qconvert.json names sources by Hub id or folder name, never by a local path. The source files'
    sha256 come from `source_hashes` when given (the CLI starts it before importing torch), else from
    one started here; either runs beside the quantizer, a bounded distance ahead of it.
    """
    from qformats.hub_pull import pull

    t0 = time.perf_counter()
    check_blocksize(blocksize)
    check_base_model_id(base_model)
    shard_bytes = parse_size(shard_size)
    compute_dtype = dtypes.dtype_name(compute_dtype, "--compute-dtype")
    dev = resolve_device(device)
    skip_modules = [m for m in skip_modules if m]
    quiet = {} if progress else {"report": None}
    pulled = pull(src, revision=revision, allow_patterns=HUB_PATTERNS, **quiet)
    ckpt = open_checkpoint(pulled.path)
    if ckpt.is_quantized:
        method = ckpt.config["quantization_config"].get("quant_method", "?")
        raise QError(f"{ckpt.folder}: already quantized ({method}); quantize the fp16/bf16 checkpoint instead")
    out = Path(out)
    check_out_apart_from_sources(out, [ckpt.folder])
    kinds, skipped = plan_tensors(ckpt, skip_modules)
    dtype = source_dtype(ckpt, kinds)
    dtype_name = str(dtype).removeprefix("torch.")
    infos = ckpt.tensors

    settings = Settings(blocksize=blocksize, double_quant=double_quant, device=dev, allow_nonfinite=allow_nonfinite)
    jobs = [Job(info, kinds[name]) for name, info in infos.items()]
    hashes = source_hashes or BackgroundSha256(ckpt.source_files)
    total = sum(i.nbytes for i in infos.values())
    try:
        with ShardedWriter(out, shard_size=shard_bytes, force=force) as writer, tqdm(
            total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress, dynamic_ncols=True
        ) as bar:  # fmt: skip
            run_stream(ckpt, jobs, settings, writer, lambda n: (bar.update(n), hashes.advance(n)), pipelined=pipelined)
            shards = writer.finish_shards()

            config = dict(ckpt.config)
            config["quantization_config"] = quantization_config(compute_dtype or dtype_name, double_quant, skipped)
            config["dtype"] = config["torch_dtype"] = dtype_name
            writer.write_json(CONFIG_FILE, config)
            copy_extra_files(ckpt, writer, skip={CONFIG_FILE, MANIFEST_FILE})

            source_files = {p.name: hashes.digest(p) or sha256_file(p) for p in ckpt.source_files}
            parameters = {"blocksize": blocksize, "double_quant": double_quant,
                          "compute_dtype": compute_dtype or dtype_name, "skip_modules": skip_modules,
                          "llm_int8_skip_modules": skipped, "shard_size": shard_bytes}  # fmt: skip
            origin, license_ = model_origin(ckpt.folder)
            source = {"path": portable_name(src, pulled.repo_id), "repo_id": pulled.repo_id, "revision": revision,
                      "commit": pulled.commit, "base_model": base_model or origin, "license": license_}  # fmt: skip
            tensors = {n: {"shape": list(infos[n].shape), "dtype": infos[n].dtype_name, "kind": kinds[n]} for n in infos}
            manifest = build_manifest(parameters, source, source_files, tensors, dict(writer.file_hashes))
            writer.write_json(MANIFEST_FILE, manifest)
            writer.commit()
    except BaseException:
        hashes.stop()  # nothing will ask for them
        raise

    quantized = [j.info.name for j in jobs if j.kind == "nf4"]
    return QuantizeSummary(out=out, parameters=sum(i.numel for i in infos.values()),
                           quantized_parameters=sum(infos[n].numel for n in quantized), quantized_tensors=quantized,
                           kept_tensors=[j.info.name for j in jobs if j.kind == "kept"], skip_modules=skipped,
                           bytes_before=total, bytes_after=writer.total_size,
                           seconds=time.perf_counter() - t0, shards=shards)  # fmt: skip
