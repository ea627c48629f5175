"""Merged export: dequantize the base, merge a LoRA adapter in fp32, write an HF checkpoint (or NF4 again).

`export_merged(model, out, adapter=...)` loads the base with our loader (NF4 weights stay packed, so
memory is about the 4-bit model), applies the adapter with `qserve.lora.load_lora`, then writes one tensor at
a time through `qformats.sharded_writer.ShardedWriter` (a temp folder renamed at the end):

- every linear becomes `W + scale * B @ A`, formed in fp32 from the dequantized base and cast once
  to the output dtype (default: the checkpoint's dtype; bf16, fp16 or fp32);
- config.json loses `quantization_config` and says the new dtype, so transformers and vLLM load the
  folder as a plain fp16/bf16 model; tokenizer, chat template and generation config are copied.

With `requantize=True` the merged linears that were NF4 in the base are quantized again with
`qformats.nf4.quantize_nf4` (through its fused C++ twin on CPU; same block size and double
quantization) and config.json keeps the base's `quantization_config`: a 4-bit model with the adapter baked in. Merging into a 4-bit base
costs accuracy (the merged weight is rounded to the NF4 grid again, unlike base + adapter at run
time); the export measures it instead of hiding it: the perplexity of base + adapter (our runtime)
and of the requantized output on a text, reported in the summary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qformats.checkpoint import CONFIG_FILE, open_checkpoint
from qformats.dtypes import parse_dtype
from qformats.errors import QError
from qformats.lineage import model_origin, portable_name
from qformats.manifest import MANIFEST_FILE, build_manifest, sha256_file
from qformats.output_folder import check_out_apart_from_sources
from qformats.peft_adapter import adapter_folder, read_adapter
from qformats.sharded_writer import ShardedWriter, copy_extra_files, parse_size
from qkernels.ops import quantize_nf4  # on CPU the fused C++ quantizer, byte-identical to qformats
from qserve.loader import load_model, resolve_model_dir
from qserve.lora import load_lora, merged_tensors
from qserve.model import CausalLM
from qserve.nf4_linear import NF4Linear
from qserve.tokenizer import Tokenizer

# The default text for the requantization check: plain English prose, ~170 words (written for this project).
DEFAULT_EVAL_TEXT = (
    "The old lighthouse stood at the end of a narrow spit of land, where the sea met the river. For more than a "
    "century its keepers had climbed the spiral stairs each evening to light the lamp, and each morning they had "
    "written a few lines in the logbook: the weather, the ships that passed, the birds that rested on the rail. "
    "When the light was automated, the last keeper moved to the village, but he still walked out along the shore "
    "every day. He said that he could tell the time by the tide and the season by the colour of the water. "
    "Children from the school would follow him and ask about storms, and he would tell them about the winter when "
    "the waves reached the top of the tower, and the night a small fishing boat found its way home by the light "
    "alone. The logbooks are kept in the village library now, and anyone may read them on a quiet afternoon."
)


@dataclass
class ExportSummary:
    out: Path
    dtype: torch.dtype
    merged_modules: int
    requantized: bool
    perplexity_runtime: float | None = None  # base + adapter in our runtime (fp32 compute)
    perplexity_export: float | None = None  # the requantized export
    seconds: float = 0.0

    def describe(self) -> str:
        what = "NF4 (requantized)" if self.requantized else str(self.dtype).removeprefix("torch.")
        line = f"wrote {self.out} ({what}, {self.merged_modules} linears merged) in {self.seconds:.1f}s"
        if self.perplexity_export is not None:
            change = 100 * (self.perplexity_export / self.perplexity_runtime - 1)
            line += (f"\nperplexity: base + adapter {self.perplexity_runtime:.3f} -> merged and requantized "
                     f"{self.perplexity_export:.3f} ({change:+.2f}%)")  # fmt: skip
        return line


def text_perplexity(model: CausalLM, ids: list[int]) -> float:
    """Perplexity of one window of tokens (the first max_position_embeddings) under a plain causal forward."""
    ids = ids[: model.args.max_position_embeddings]
    if len(ids) < 2:
        raise QError("the evaluation text is shorter than 2 tokens")
    tokens = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        return math.exp(model.loss(tokens, tokens, len(ids) - 1).item())


def export_merged(model: str | Path, out: str | Path, adapter: str | Path | None = None, *,
                  dtype: str | torch.dtype | None = None, requantize: bool = False, eval_text: str | None = None,
                  shard_size: str | int = "5GB", force: bool = False, revision: str | None = None,
                  device: str | torch.device = "cpu", progress: bool = True) -> ExportSummary:  # fmt: skip
    """Write base (+ adapter, merged) to `out` as an HF checkpoint; see the module doc."""
    start = time.perf_counter()
    model_dir = resolve_model_dir(model, revision)
    adapter_dir = adapter_folder(adapter) if adapter is not None else None
    check_out_apart_from_sources(out, [model_dir, adapter_dir, eval_text])
    ckpt = open_checkpoint(model_dir)
    config = dict(ckpt.config)
    out_dtype = parse_dtype(dtype) or _checkpoint_dtype(config)
    lm = load_model(model_dir, dtype=torch.float32, device=device, progress=progress)
    nf4_modules = {n: m for n, m in lm.named_modules() if isinstance(m, NF4Linear)}  # before LoRA wraps them
    if requantize and not nf4_modules:
        raise QError(f"{model_dir}: --requantize needs an NF4 base; this one is {config.get('dtype', 'float')} "
                     "(export it, then run `qconvert quantize` on the result)")  # fmt: skip
    merged: list[str] = []
    if adapter is not None:
        peft = read_adapter(adapter_dir)
        if lm.args.tie_word_embeddings and "lm_head" in peft.weights:
            raise QError(f"{adapter}: the adapter changes lm_head, which this model ties to its embeddings; "
                         "a merged export cannot hold both")  # fmt: skip
        merged = load_lora(lm, peft)
    tokenizer = Tokenizer.from_dir(model_dir) if requantize else None
    text_ids = tokenizer.encode(Path(eval_text).read_text() if eval_text else DEFAULT_EVAL_TEXT) if tokenizer else []
    ppl_runtime = text_perplexity(lm, text_ids) if requantize else None

    with ShardedWriter(Path(out), shard_size=parse_size(shard_size), force=force) as writer:
        for name, t in tqdm(merged_tensors(lm, out_dtype), desc="export", unit="tensor", disable=not progress,
                            leave=False):  # fmt: skip
            module = name.removesuffix(".weight")
            if requantize and module in nf4_modules and name.endswith(".weight"):
                old = nf4_modules[module]
                w = quantize_nf4(t, blocksize=old.nf4_weight.blocksize, double_quant=old.nf4_weight.double_quant)
                writer.add(w.to_tensors(name))
            else:
                writer.add({name: t})
        writer.finish_shards()
        if not requantize:
            config.pop("quantization_config", None)
        config["dtype"] = config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        writer.write_json(CONFIG_FILE, config)
        copy_extra_files(ckpt, writer, skip={CONFIG_FILE, MANIFEST_FILE})
        # Provenance: what this was made from (model cards follow it back to the original Hub id).
        parameters = {"operation": "export", "dtype": str(out_dtype).removeprefix("torch."), "requantize": requantize,
                      "merged_modules": merged}  # fmt: skip
        origin, license_ = model_origin(model_dir)
        source = {"path": portable_name(model), "base_model": origin or portable_name(model), "revision": revision,
                  "license": license_, "adapter": None if adapter is None else portable_name(adapter)}  # fmt: skip
        source_files = {p.name: sha256_file(p) for p in ckpt.source_files}
        writer.write_json(MANIFEST_FILE, build_manifest(parameters, source, source_files, {}, dict(writer.file_hashes)))
        writer.commit()
    del lm
    summary = ExportSummary(out=Path(out), dtype=out_dtype, merged_modules=len(merged), requantized=requantize,
                            perplexity_runtime=ppl_runtime)  # fmt: skip
    if requantize:
        summary.perplexity_export = text_perplexity(load_model(out, dtype=torch.float32, device=device), text_ids)
    summary.seconds = time.perf_counter() - start
    return summary


def _checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint was made from (that of its quant states for NF4); float16 if unknown."""
    return parse_dtype(config.get("dtype") or config.get("torch_dtype")) or torch.float16
