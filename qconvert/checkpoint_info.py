"""What a checkpoint folder is: fp16/bf16 or NF4, architecture, quantized vs kept tensors, size, manifest.

Reads headers and the small JSON quant states only, never the weights, so it is instant on any size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qformats.checkpoint import open_checkpoint
from qformats.errors import QError
from qformats.manifest import MANIFEST_FILE, manifest_problems, read_manifest
from qformats.nf4 import FP4_STATE_SUFFIX, NF4_PART_SUFFIXES, QUANT_STATE_SUFFIX, read_quant_state
from qformats.safetensors_file import read_tensor


@dataclass
class CheckpointInfo:
    path: str
    format: str  # "nf4", or the dtype of an unquantized checkpoint ("float16", "bfloat16", "mixed", ...)
    architecture: str
    model_type: str
    layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    parameters: int
    quantized_parameters: int
    quantized_tensors: list[str]
    kept_tensors: list[str]
    kept_dtypes: dict[str, int]
    tensor_bytes: int
    file_bytes: int
    shards: int
    quantization: dict = field(default_factory=dict)  # blocksize, double_quant, compute_dtype, skip modules
    manifest: str = "missing"  # "missing", "present", "verified", or "mismatch"
    manifest_problems: list[str] = field(default_factory=list)

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.tensor_bytes / max(self.parameters, 1)

    def to_json(self) -> dict:
        return {**asdict(self), "bits_per_parameter": round(self.bits_per_parameter, 4)}

    def describe(self) -> str:
        q = self.quantization
        if self.format == "nf4":
            kind = (f"NF4 (bitsandbytes 4-bit{', double-quant' if q.get('double_quant') else ''}, "
                    f"blocksize {q.get('blocksize')}, compute {q.get('compute_dtype')})")  # fmt: skip
        else:
            kind = f"unquantized ({self.format})"
        dtypes = ", ".join(f"{d}: {n}" for d, n in sorted(self.kept_dtypes.items()))
        lines = [
            f"{self.path}: {kind}",
            (f"architecture  {self.architecture} ({self.model_type}), {self.layers} layers, "
             f"hidden {self.hidden_size}, vocab {self.vocab_size}"),
            f"tensors       {len(self.quantized_tensors)} quantized (NF4), {len(self.kept_tensors)} kept ({dtypes})",
            f"parameters    {self.parameters / 1e6:.2f}M, {self.quantized_parameters / 1e6:.2f}M of them in 4 bits",
            (f"size          {self.tensor_bytes / 1e6:.1f} MB of tensors in {self.shards} shard"
             f"{'s' * (self.shards > 1)}, {self.bits_per_parameter:.2f} bits per parameter"),
        ]  # fmt: skip
        if self.format == "nf4":
            lines.append(f"skip modules  {', '.join(q.get('skip_modules') or []) or '(none)'}")
        manifest = {
            "missing": f"no {MANIFEST_FILE}",
            "present": f"{MANIFEST_FILE} present, listed files exist (--verify checks every sha256)",
            "verified": f"ok: every sha256 in {MANIFEST_FILE} verified",
            "mismatch": "MISMATCH: " + "; ".join(self.manifest_problems),
        }[self.manifest]
        lines.append(f"manifest      {manifest}")
        return "\n".join(lines)


def inspect_checkpoint(path: str | Path, verify: bool = False) -> CheckpointInfo:
    """Describe the checkpoint folder at `path`; `verify` recomputes every sha256 of the manifest."""
    ckpt = open_checkpoint(Path(path))
    cfg = ckpt.config
    infos = ckpt.tensors
    text_cfg = cfg.get("text_config") or {}
    states = [n for n in infos if n.endswith(QUANT_STATE_SUFFIX)]
    if any(n.endswith(FP4_STATE_SUFFIX) for n in infos):
        raise QError(f"{path}: FP4 checkpoints are not supported, only NF4")
    quantized_parameters = 0
    quantized: list[str] = []
    parts: set[str] = set()
    quant: dict = {}
    for state_name in states:
        prefix = state_name.removesuffix(QUANT_STATE_SUFFIX)
        info = infos[state_name]
        with open(info.file, "rb") as f:
            blob = read_tensor(f, info)
        try:
            state = read_quant_state(blob)
            shape = [int(s) for s in state["shape"]]
        except (ValueError, KeyError, TypeError) as e:
            raise QError(f"{info.file}: tensor {state_name!r} is not a readable quant state ({e})") from None
        quant.setdefault("blocksize", state.get("blocksize"))
        quant.setdefault("double_quant", "nested_offset" in state)
        n = 1
        for s in shape:
            n *= s
        quantized_parameters += n
        quantized.append(prefix)
        parts.update(prefix + p for p in ("",) + NF4_PART_SUFFIXES)
    kept = [n for n in infos if n not in parts]
    qcfg = cfg.get("quantization_config") or {}
    if states:
        quant.update(compute_dtype=qcfg.get("bnb_4bit_compute_dtype"), skip_modules=qcfg.get("llm_int8_skip_modules"))
    kept_dtypes = Counter(str(infos[n].dtype).removeprefix("torch.") for n in kept)
    if states:
        fmt = "nf4"
    else:
        fmt = next(iter(kept_dtypes)) if len(kept_dtypes) == 1 else "mixed"
        float_dtypes = [d for d in kept_dtypes if d in ("float16", "bfloat16", "float32")]
        if len(kept_dtypes) > 1 and len(float_dtypes) == 1:
            fmt = float_dtypes[0]  # integer buffers next to float weights
    status, problems = "missing", []
    if (ckpt.folder / MANIFEST_FILE).is_file():
        if verify:
            problems = manifest_problems(ckpt.folder)
            status = "mismatch" if problems else "verified"
        else:
            missing = [n for n in read_manifest(ckpt.folder)["files"] if not (ckpt.folder / n).is_file()]
            problems = [f"{n}: listed in {MANIFEST_FILE} but missing" for n in missing]
            status = "mismatch" if problems else "present"
    files = [p for p in ckpt.folder.iterdir() if p.is_file()]
    return CheckpointInfo(
        path=str(path),
        format=fmt,
        architecture=", ".join(cfg.get("architectures") or ["?"]),
        model_type=cfg.get("model_type", "?"),
        layers=cfg.get("num_hidden_layers", text_cfg.get("num_hidden_layers")),
        hidden_size=cfg.get("hidden_size", text_cfg.get("hidden_size")),
        vocab_size=cfg.get("vocab_size", text_cfg.get("vocab_size")),
        parameters=quantized_parameters + sum(infos[n].numel for n in kept),
        quantized_parameters=quantized_parameters,
        quantized_tensors=quantized,
        kept_tensors=kept,
        kept_dtypes=dict(kept_dtypes),
        tensor_bytes=sum(i.nbytes for i in infos.values()),
        file_bytes=sum(p.stat().st_size for p in files),
        shards=len(ckpt.shards),
        quantization=quant,
        manifest=status,
        manifest_problems=problems,
    )
