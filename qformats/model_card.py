"""Model cards (README.md with the Hub's YAML front matter) for the three artifacts the toolkit writes.

An artifact folder is one of: an NF4 base (config.json with a bitsandbytes 4-bit
`quantization_config`), a PEFT adapter (adapter_config.json), or a merged / plain fp16-bf16 model
(config.json without `quantization_config`). `read_artifact` says which and gathers what the card
states; `render_card` writes the card; `refresh_card` puts it in the folder.

The card's `base_model` is the original Hub repo id even when the artifact was made from a local
folder (`qformats.lineage.model_origin` follows it, with the license), or the one `--base-model`
names when no lineage leads to the Hub.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qformats.errors import QError
from qformats.json_file import read_json_object
from qformats.lineage import CARD_MARKER, model_origin, repo_id_of

ArtifactKind = Literal["nf4", "adapter", "merged"]
RELATION = {"nf4": "quantized", "adapter": "adapter", "merged": "merge"}
# What markdown would read as markup in a table cell or heading (links, images, HTML, code, emphasis, columns).
_MARKUP = re.compile(r"([\\`*_\[\]<>|&])")
_QLORA_TAGS = ["qlora", "nf4", "4-bit", "bitsandbytes"]
_TEMPLATE_FILLER = "[More Information Needed]"
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# What `qconvert finetune` leaves in an adapter folder for the card: every step's losses, and their plot.
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss.png"


@dataclass
class Artifact:
    """What a folder holds, as far as the card needs to know."""

    kind: ArtifactKind
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # qconvert.json, when present
    base_model: str | None = None  # original Hub repo id
    base_path: str | None = None  # what the artifact names as its base, verbatim
    license: str | None = None
    existing_card: str | None = None  # README.md text already in the folder

    @property
    def quantization_config(self) -> dict[str, Any]:
        return self.config.get("quantization_config") or {}


def detect_kind(folder: Path) -> ArtifactKind:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if not (folder / "config.json").is_file():
        raise QError(f"{folder}: neither config.json (a model) nor adapter_config.json (a PEFT adapter) is there")
    qc = read_json_object(folder / "config.json").get("quantization_config")
    if not qc:
        return "merged"
    if qc.get("quant_method") == "bitsandbytes" and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        return "nf4"
    raise QError(f"{folder / 'config.json'}: quantization_config {qc.get('quant_method')!r} is not bitsandbytes 4-bit; "
                 "qconvert publishes NF4, adapter and fp16/bf16 folders only")  # fmt: skip


def read_artifact(folder: str | os.PathLike) -> Artifact:
    folder = Path(folder)
    if not folder.is_dir():
        raise QError(f"{folder}: no such folder")
    kind = detect_kind(folder)
    art = Artifact(kind=kind, folder=folder)
    if (folder / "config.json").is_file():
        art.config = read_json_object(folder / "config.json")
    if kind == "adapter":
        art.adapter_config = read_json_object(folder / "adapter_config.json")
        art.base_path = art.adapter_config.get("base_model_name_or_path")
    if (folder / "qconvert.json").is_file():
        art.manifest = read_json_object(folder / "qconvert.json")
    if (folder / "README.md").is_file():
        art.existing_card = (folder / "README.md").read_text(errors="replace")
    art.base_model, art.license = model_origin(folder)
    if kind == "merged" and art.base_model is None:
        art.base_model = repo_id_of(art.config.get("_name_or_path"))
    return art


# ---------------------------------------------------------------- rendering


def card_metadata(art: Artifact) -> dict[str, Any]:
    tags = list(_QLORA_TAGS)
    if art.kind == "adapter":
        tags += ["lora", "peft"]
    elif art.kind == "merged":
        tags = ["qlora", "merge"]
    meta: dict[str, Any] = {
        "library_name": "peft" if art.kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if art.base_model:
        meta["base_model"] = art.base_model
        meta["base_model_relation"] = RELATION[art.kind]
    if art.license:
        meta["license"] = art.license
    return meta


def render_card(art: Artifact, repo_id: str) -> str:
    """The whole README.md: front matter, what it is, how it was made, how to run it."""
    from huggingface_hub import ModelCardData

    yaml = ModelCardData(**card_metadata(art)).to_yaml()
    name = repo_id.split("/")[-1]
    base = f"[{art.base_model}](https://huggingface.co/{art.base_model})" if art.base_model else "a model"
    intro = {
        "nf4": f"{base[0].upper()}{base[1:]} quantized to 4-bit NF4 with double-quantized scales (QLoRA's storage format), in the "
        "bitsandbytes layout: it loads as-is in transformers + bitsandbytes, vLLM and qserve.",
        "adapter": f"A LoRA adapter (PEFT format) for {base}, trained with QLoRA on the 4-bit NF4 base.",
        "merged": f"{base[0].upper()}{base[1:]} with a QLoRA adapter merged into its weights (dequantized base + LoRA, merged in fp32).",
    }[art.kind]
    parts = [f"---\n{yaml}\n---\n", f"# {escape_markdown(name)}\n", intro, ""]
    parts += _details(art)
    parts += ["## Use it", ""] + _snippets(art, repo_id)
    parts += ["", "Made with [qlora-toolkit](https://pypi.org/project/qlora-toolkit/) (`qconvert`).", "", CARD_MARKER, ""]
    return "\n".join(parts)


class Markdown(str):
    """A table cell this module wrote as markdown on purpose; every other value is escaped."""


def escape_markdown(text: Any) -> str:
    """`text` shown literally in markdown, on one line: file names and other values from files are not markup."""
    return _MARKUP.sub(r"\\\1", " ".join(str(text).split()))


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| | |", "| --- | --- |"]
    out += [f"| {escape_markdown(k)} | {_fmt(v)} |" for k, v in rows if v is not None and v != ""]
    return out + [""]


def _fmt(v: Any) -> str:
    if isinstance(v, Markdown):
        return v
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_code(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return escape_markdown(json.dumps(v, sort_keys=True))
    return escape_markdown(v)


def _code(x: Any) -> str:
    """`x` as inline code, or escaped text when it could close the code span or break the table."""
    text = " ".join(str(x).split())
    return f"`{text}`" if not any(c in text for c in "`|") else escape_markdown(text)


def _details(art: Artifact) -> list[str]:
    m = art.manifest
    if art.kind == "nf4":
        qc = art.quantization_config
        params = m.get("parameters") if isinstance(m.get("parameters"), dict) else {}
        double = qc.get("bnb_4bit_use_double_quant")
        rows = [
            ("quant type", qc.get("bnb_4bit_quant_type")),
            ("block size", params.get("blocksize", 64)),
            ("double quantization", "yes: 8-bit scales in blocks of 256, fp32 offset" if double else "no: fp32 scales"),
            ("compute dtype", qc.get("bnb_4bit_compute_dtype")),
            ("storage", qc.get("bnb_4bit_quant_storage")),
            ("kept in the source dtype", qc.get("llm_int8_skip_modules")),
        ]
        tensors = m.get("tensors") if isinstance(m.get("tensors"), dict) else {}
        if tensors:
            count = {"nf4": 0, "kept": 0}
            numel = 0
            for t in tensors.values():
                count[t.get("kind", "kept")] = count.get(t.get("kind", "kept"), 0) + 1
                numel += _prod(t.get("shape") or [])
            rows.append(("tensors", f"{count['nf4']} quantized, {count['kept']} kept"))
            rows.append(("parameters", f"{numel:,}"))
            weight_bytes = sum(p.stat().st_size for p in art.folder.glob("*.safetensors"))
            if numel and weight_bytes:
                rows.append(("bits per parameter (whole checkpoint)", f"{8 * weight_bytes / numel:.2f}"))
        source = m.get("source") if isinstance(m.get("source"), dict) else {}
        if source.get("repo_id"):
            at = f" at {_code(source['commit'][:10])}" if source.get("commit") else ""
            rows.append(("quantized from", Markdown(_code(source["repo_id"]) + at)))
        if m.get("version"):
            rows.append(("qlora-toolkit version", m["version"]))
        rows.append(("size on disk", _weights_size(art.folder)))
        return ["## Quantization", ""] + _table(rows)
    if art.kind == "adapter":
        ac = art.adapter_config
        r = ac.get("r")
        alpha = ac.get("lora_alpha")
        scaling = None
        if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)):
            scaling = alpha / r**0.5 if ac.get("use_rslora") else alpha / r
        rows = [
            ("rank r", r), ("alpha", alpha), ("scaling", scaling), ("dropout", ac.get("lora_dropout")),
            ("target modules", sorted(ac["target_modules"]) if isinstance(ac.get("target_modules"), list) else ac.get("target_modules")),
            ("rsLoRA", ac.get("use_rslora")), ("DoRA", ac.get("use_dora")), ("bias", ac.get("bias")),
            ("trained on", "a local NF4 copy of the base" if _base_quantization(art) else _public_base(art.base_path)),
        ]  # fmt: skip
        out = ["## LoRA", ""] + _table(rows)
        training = _training_facts(art)
        if training:
            out += ["## Training", ""] + _table(training)
        return out + _loss_curve(art.folder)
    rows = [("dtype", art.config.get("dtype") or art.config.get("torch_dtype")), ("architecture", art.config.get("model_type"))]
    rows += [(k.replace("_", " "), v) for k, v in (m.get("merge") or m.get("export") or {}).items()] if isinstance(m.get("merge") or m.get("export"), dict) else []
    rows.append(("size on disk", _weights_size(art.folder)))
    return ["## Merge", ""] + _table(rows)


def _loss_curve(folder: Path) -> list[str]:
    """The train/eval loss image `qconvert finetune` drew, or why there is none."""
    if (folder / LOSS_CURVE).is_file():
        return ["### Loss", "", f"![train and eval loss against step]({LOSS_CURVE})", ""]
    if (folder / METRICS_FILE).is_file():
        return ["### Loss", "", (f"No loss curve: matplotlib was not installed when this adapter was trained "
                f"(`pip install 'qlora-toolkit[plot]'`); every step's losses are in `{METRICS_FILE}`."), ""]  # fmt: skip
    return []


def _training_facts(art: Artifact) -> list[tuple[str, Any]]:
    """Hyperparameters and final losses, from qconvert.json's `training` section (our finetune) or
    trainer_state.json (transformers' Trainer)."""
    rows: list[tuple[str, Any]] = []
    training = art.manifest.get("training")
    if isinstance(training, dict):
        for key, value in training.items():
            if isinstance(value, dict):
                rows += [(f"{key} {k}".replace("_", " "), v) for k, v in value.items() if not isinstance(v, (dict, list))]
            elif not isinstance(value, list) or len(value) <= 8:
                rows.append((key.replace("_", " "), value))
    state = art.folder / "trainer_state.json"
    if not rows and state.is_file():
        history = read_json_object(state).get("log_history") or []
        train = [h["loss"] for h in history if "loss" in h]
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        rows += [("steps", read_json_object(state).get("global_step")), ("final train loss", train[-1] if train else None),
                 ("final eval loss", evals[-1] if evals else None)]  # fmt: skip
    return rows


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _weights_size(folder: Path) -> str:
    n = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return f"{n / 1e6:.1f} MB" if n else ""


def _snippets(art: Artifact, repo_id: str) -> list[str]:
    prompt = "The capital of France is"
    gen = [
        f'inputs = tokenizer("{prompt}", return_tensors="pt").to(model.device)',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0], skip_special_tokens=True))",
    ]
    if art.kind == "adapter":
        base = art.base_model or _public_base(art.base_path) or "BASE_MODEL_REPO_ID"
        r = art.adapter_config.get("r") or 16
        max_rank = next((x for x in _VLLM_LORA_RANKS if x >= r), r)
        adapter_name = repo_id.split("/")[-1]
        base_qc = _base_quantization(art)
        if base_qc:
            # Trained on an NF4 copy of `base`: quantize it the same way on load (bitsandbytes' 4-bit codes are ours).
            compute = base_qc.get("bnb_4bit_compute_dtype") or "bfloat16"
            load = [
                "import torch",
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig",
                "",
                (f'nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
                 f'bnb_4bit_use_double_quant={bool(base_qc.get("bnb_4bit_use_double_quant"))}, '
                 f"bnb_4bit_compute_dtype=torch.{compute})"),
                f'base = AutoModelForCausalLM.from_pretrained("{base}", quantization_config=nf4, device_map="auto")',
            ]
        else:
            load = [
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}", device_map="auto")',
            ]
        transformers = [
            *load,
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
            *gen,
        ]
        quant = ', quantization="bitsandbytes"' if base_qc else ""
        vllm = [
            "from huggingface_hub import snapshot_download",
            "from vllm import LLM, SamplingParams",
            "from vllm.lora.request import LoRARequest",
            "",
            f'llm = LLM(model="{base}"{quant}, enable_lora=True, max_lora_rank={max_rank})',
            f'lora = LoRARequest("{adapter_name}", 1, snapshot_download("{repo_id}"))',
            f'print(llm.generate(["{prompt}"], SamplingParams(max_tokens=32), lora_request=lora)[0].outputs[0].text)',
        ]
        qserve = [f"qserve --model {base} --adapter {adapter_name}={repo_id}   # OpenAI-compatible server, model=\"{adapter_name}\""]
    else:
        transformers = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")'
            + ("  # 4-bit config is in config.json; needs bitsandbytes" if art.kind == "nf4" else ""),
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            *gen,
        ]
        quant = ', quantization="bitsandbytes"' if art.kind == "nf4" else ""
        vllm = [
            "from vllm import LLM, SamplingParams",
            "",
            f'llm = LLM(model="{repo_id}"{quant})',
            f'print(llm.generate(["{prompt}"], SamplingParams(max_tokens=32))[0].outputs[0].text)',
        ]
        qserve = [f'qserve generate --model {repo_id} --prompt "{prompt}"', f"qserve --model {repo_id}   # OpenAI-compatible server"]
    return (["### transformers", "", "```python", *transformers, "```", "", "### vLLM", "", "```python", *vllm, "```",
             "", "### qserve", "", "```bash", *qserve, "```"])  # fmt: skip


def _base_quantization(art: Artifact) -> dict[str, Any]:
    """The bitsandbytes quantization_config of the adapter's base, when that is a local NF4 folder; else {}.

    Our finetune records it in qconvert.json; for other adapters it is read from the local base folder."""
    source = art.manifest.get("source")
    if isinstance(source, dict) and isinstance(source.get("base_quantization"), dict):
        return source["base_quantization"]
    if art.base_path and (Path(art.base_path).expanduser() / "config.json").is_file():
        qc = read_json_object(Path(art.base_path).expanduser() / "config.json").get("quantization_config") or {}
        return qc if qc.get("quant_method") == "bitsandbytes" else {}
    return {}


def _public_base(name: str | None) -> str | None:
    """A base name fit for a public card: a repo id; never a local path (it means nothing elsewhere)."""
    return name if name and repo_id_of(name) == name else None


# ---------------------------------------------------------------- writing


def card_text(art: Artifact, repo_id: str) -> str:
    """The card to publish: ours regenerated; a hand-written card kept, with our metadata filled in where missing.

    Unfilled templates (PEFT's `save_pretrained` writes one full of "[More Information Needed]") count as ours.
    """
    existing = art.existing_card
    if existing is None or CARD_MARKER in existing or _TEMPLATE_FILLER in existing:
        return render_card(art, repo_id)
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(art.existing_card, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError) as e:
        raise QError(f"{art.folder / 'README.md'}: its YAML front matter does not parse ({str(e).splitlines()[0]}); "
                     "fix it, or delete the file to get a generated card") from None
    for key, value in card_metadata(art).items():
        current = getattr(card.data, key, None)
        local_base = key == "base_model" and isinstance(current, str) and repo_id_of(current) != current
        if current in (None, [], "") or local_base:  # a local path is no use to anyone reading the Hub
            setattr(card.data, key, value)
    return str(card)


def refresh_card(art: Artifact, repo_id: str) -> Path:
    """Write README.md into the artifact folder (temp file + rename), return its path."""
    text = card_text(art, repo_id)
    path = art.folder / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    art.existing_card = text
    return path
