"""PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`, read and written.

The layout is PEFT's, so adapters go both ways between this toolkit, PEFT (on transformers +
bitsandbytes) and vLLM:
- tensors `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`
  (PEFT strips the adapter name on save; `...lora_A.default.weight` is accepted on read);
- scaling `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` and
  `alpha_pattern` override r and alpha per module (PEFT's key matching: the module name ends
  with the pattern key at a dot boundary, as a regular expression).
What vLLM and our runtime cannot use is refused with a QError naming the field: DoRA, trained
biases, `modules_to_save`, `fan_in_fan_out`, other PEFT types; so is a tensor holding NaN or inf
(it would turn every answer through the adapter into nothing), whoever reads: the server, export, push.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qformats.errors import QError
from qformats.json_file import read_json_object
from qformats.output_folder import make_temp_folder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # all that reading an adapter needs, from a folder or the Hub
KEY_PREFIX = "base_model.model."


@dataclass
class AdapterConfig:
    """The fields of adapter_config.json this toolkit reads and writes (PEFT's LoraConfig names)."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_of(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_of(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_of(self, module: str) -> float:
        """PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA, with per-module patterns applied."""
        r, alpha = self.rank_of(module), self.alpha_of(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_json(self) -> dict:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None, "inference_mode": True, "r": self.r, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout, "target_modules": self.target_modules, "bias": "none",
            "use_rslora": self.use_rslora, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern, "lora_bias": False,
        }  # fmt: skip

    @classmethod
    def from_json(cls, cfg: dict, name: str = CONFIG_NAME) -> AdapterConfig:
        """Validate a parsed adapter_config.json; QError naming the field that is wrong or unsupported."""

        def bad(key: str, why: str) -> QError:
            return QError(f"{name}: field {key!r} {why}")

        if cfg.get("peft_type", "LORA") != "LORA":
            raise bad("peft_type", f"is {cfg.get('peft_type')!r}; only LORA adapters are supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in cfg:
                raise bad(key, "is missing")
        r, alpha = cfg["r"], cfg["lora_alpha"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise bad("r", f"must be a positive integer, not {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise bad("lora_alpha", f"must be a finite number, not {alpha!r}")
        targets = cfg["target_modules"]
        if isinstance(targets, list):
            if not targets or not all(isinstance(t, str) for t in targets):
                raise bad("target_modules", "must be a non-empty list of module names or a regex string")
        elif not isinstance(targets, str):
            raise bad("target_modules", f"must be a list of module names or a regex string, not {targets!r}")
        if cfg.get("bias", "none") != "none":
            raise bad("bias", f"is {cfg['bias']!r}; only bias 'none' is supported (vLLM serves no trained biases)")
        if cfg.get("use_dora"):
            raise bad("use_dora", "is true; DoRA adapters are not supported")
        if cfg.get("fan_in_fan_out"):
            raise bad("fan_in_fan_out", "is true; only fan_in_fan_out false (nn.Linear layout) is supported")
        if cfg.get("modules_to_save"):
            raise bad("modules_to_save", f"is {cfg['modules_to_save']!r}; fully trained modules are not supported")
        if cfg.get("lora_bias"):
            raise bad("lora_bias", "is true; LoRA biases are not supported")
        dropout = cfg.get("lora_dropout", 0.0) or 0.0
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise bad("lora_dropout", f"must be in [0, 1), not {dropout!r}")
        patterns = {}
        for key in ("rank_pattern", "alpha_pattern"):
            value = cfg.get(key) or {}
            if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and math.isfinite(v) for v in value.values()):  # fmt: skip
                raise bad(key, "must map module patterns to finite numbers")
            if key == "rank_pattern" and not all(isinstance(v, int) and v >= 1 for v in value.values()):
                raise bad(key, "must map module patterns to positive integer ranks")
            patterns[key] = value
        return cls(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=float(dropout),
                   use_rslora=bool(cfg.get("use_rslora", False)),
                   base_model_name_or_path=cfg.get("base_model_name_or_path"), **patterns)  # fmt: skip


@dataclass
class PeftAdapter:
    """An adapter in memory: its config and, per target module, (A `[r, in]`, B `[out, r]`).

    The one adapter record of the toolkit: training writes it, serving, export, push and the vLLM
    hand-off read it. `source`: where it was read from (a folder or Hub id), for messages.
    """

    config: AdapterConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source: str = "adapter"

    def scale(self, module: str) -> float:
        return self.config.scale_of(module)

    @property
    def rank(self) -> int:
        """The largest rank of its modules (that of its tensors; the config's r when it has none)."""
        return max((a.shape[0] for a, _ in self.weights.values()), default=self.config.r)


def adapter_tensors(weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The safetensors entries of `weights`, keyed as PEFT saves them."""
    out = {}
    for module, (a, b) in weights.items():
        out[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.detach().contiguous()
        out[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.detach().contiguous()
    return out


def adapter_folder(source: str | Path, revision: str | None = None) -> Path:
    """A local adapter folder as-is, or a Hub id with the files `read_adapter` needs pulled into the cache."""
    from qformats.hub_pull import resolve_source

    return resolve_source(source, revision=revision, allow_patterns=ADAPTER_FILES)


def read_adapter(source: str | Path, revision: str | None = None, device: str | torch.device = "cpu", *,
                 max_rank: int | None = None, max_bytes: int | None = None) -> PeftAdapter:  # fmt: skip
    """Read and validate a PEFT LoRA adapter, a local folder or a Hub id (only its two files are pulled);
    QError naming the file, field or tensor at fault.

    max_rank / max_bytes: refuse a larger rank (any module's) or weights file before reading its tensors.
    """
    path = adapter_folder(source, revision)
    cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise QError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    config = AdapterConfig.from_json(read_json_object(cfg_path), str(cfg_path))
    rank = max([config.r, *config.rank_pattern.values()])
    if max_rank is not None and rank > max_rank:
        raise QError(f"{cfg_path}: rank {rank} exceeds the limit of {max_rank}")
    if not weights_path.is_file():
        hint = " (adapter_model.bin is a pickle: convert it to safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise QError(f"{path}: no {WEIGHTS_NAME}{hint}")
    size = weights_path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise QError(f"{weights_path}: {size / 2**20:.1f} MiB exceeds the limit of {max_bytes / 2**20:.1f} MiB")
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise QError(f"{weights_path}: unreadable ({e})") from None
    return PeftAdapter(config, _pair_tensors(tensors, config, str(weights_path)), source=str(source))


def _pair_tensors(tensors: dict[str, torch.Tensor], config: AdapterConfig, name: str):
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise QError(f"{name}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        halves.setdefault(m.group(1), {})[m.group(2)] = t
    if not halves:
        raise QError(f"{name}: no lora_A / lora_B tensors")
    weights = {}
    for module, ab in sorted(halves.items()):
        for half in "AB":
            if half not in ab:
                raise QError(f"{name}: {module}.lora_{half}.weight is missing (the other half is there)")
        a, b = ab["A"], ab["B"]
        r = config.rank_of(module)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise QError(f"{name}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not match "
                         f"rank {r} of adapter_config.json (expected [{r}, in] and [out, {r}])")  # fmt: skip
        if not a.is_floating_point() or not b.is_floating_point():
            raise QError(f"{name}: {module}: LoRA weights must be floating point, not {a.dtype}")
        for half, t in (("A", a), ("B", b)):
            if not torch.isfinite(t).all():
                raise QError(f"{name}: tensor {module}.lora_{half}.weight has non-finite values (NaN or inf)")
        weights[module] = (a, b)
    return weights


def save_adapter_files(folder: Path, adapter: PeftAdapter) -> None:
    """adapter_model.safetensors + adapter_config.json into an existing folder (no atomicity: see write_adapter)."""
    save_file(adapter_tensors(adapter.weights), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(adapter.config.to_json(), indent=2) + "\n")


def write_adapter(path: str | Path, adapter: PeftAdapter, *, force: bool = False,
                  finalize: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Write the folder atomically (a temp folder renamed at the end); refuse an existing one unless `force`.

    finalize: called with the temp folder once the adapter files are in it, to add more (a model card).
    """
    path = Path(path)
    if path.exists() and not force:
        raise QError(f"{path} already exists: choose another output folder or pass --force to replace it")
    tmp = make_temp_folder(path)
    try:
        save_adapter_files(tmp, adapter)
        if finalize is not None:
            finalize(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def target_matches(module: str, targets: list[str] | str) -> bool:
    """PEFT's target_modules rule: a regex string must match the whole name; a list entry must equal
    the name or be its suffix at a dot boundary."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
