"""`qserve --engine vllm`: check a base model and adapters against vLLM's limits, then run `vllm serve`.

The same artifacts the native engine serves go to vLLM unchanged (docs/format.md, "Interop contracts"):
- a pre-quantized bitsandbytes checkpoint needs `bnb_4bit_quant_storage: uint8` and a float16 or
  bfloat16 model dtype, and is served with `--quantization bitsandbytes --load-format bitsandbytes`;
  vLLM refuses tensor parallelism for it, so several GPUs mean `--pipeline-parallel-size`;
- LoRA adapters: no `modules_to_save`, no DoRA, `bias: "none"`; a rank above 16 needs
  `--max-lora-rank` (one of vLLM's allowed values, rounded up).
Everything is checked before vLLM starts, each problem in one line naming the file and field, so
a user learns in a second what would otherwise fail minutes into a GPU job. For Hub ids only what
the checks read is fetched: the base's config files (vLLM downloads its weights itself) and each
adapter's config and weights (its ranks are those of its tensors; vLLM then finds them in the
same Hub cache).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qformats.errors import QError
from qformats.hub_pull import resolve_source
from qformats.json_file import read_json_object
from qformats.peft_adapter import read_adapter

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
VLLM_DEFAULT_LORA_RANK = 16
_HALF_DTYPES = {"float16", "bfloat16"}


@dataclass
class VllmCommand:
    argv: list[str]
    # Passed in the environment, never on argv (a process listing would show it) nor printed.
    api_key: str | None = None

    def shell(self) -> str:
        """The command line to paste; with an API key, vLLM's variable is named but not its value."""
        return ("VLLM_API_KEY=... " if self.api_key else "") + shlex.join(self.argv)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise QError(f"{path.parent}: no {path.name}")
    return read_json_object(path)


def _vllm_arg(source: str) -> str:
    """What vLLM gets for a model or adapter argument: the absolute local path, or the Hub id as given."""
    local = Path(source).expanduser()
    return str(local.resolve()) if local.exists() else source


def check_base(folder: Path, dtype: str, tensor_parallel_size: int) -> bool:
    """QError if vLLM cannot serve this base as configured; returns whether it is a bitsandbytes checkpoint."""
    cfg_path = folder / "config.json"
    cfg = _read_json(cfg_path)
    q = cfg.get("quantization_config") or {}
    if not q:
        return False
    if q.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return False  # another method (AWQ, GPTQ, ...): vLLM reads it from config.json itself
    storage = q.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise QError(f"{cfg_path}: quantization_config.bnb_4bit_quant_storage is {storage!r}; vLLM loads "
                     "pre-quantized bitsandbytes weights stored as uint8 only (re-quantize with qconvert quantize)")  # fmt: skip
    model_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").removeprefix("torch.")
    if dtype == "float32" or (dtype == "auto" and model_dtype not in _HALF_DTYPES):
        raise QError(f"{cfg_path}: dtype is {model_dtype or 'unset'!r}; vLLM serves bitsandbytes checkpoints in "
                     "float16 or bfloat16 only: pass --dtype bfloat16 (or float16), or quantize from an fp16/bf16 "
                     "checkpoint")  # fmt: skip
    if tensor_parallel_size > 1:
        raise QError(f"--tensor-parallel-size {tensor_parallel_size}: vLLM refuses tensor parallelism for "
                     f"pre-quantized bitsandbytes checkpoints; use --pipeline-parallel-size {tensor_parallel_size} "
                     "to spread the layers over the GPUs instead")  # fmt: skip
    return True


def check_adapter(name: str, source: str) -> int:
    """QError naming the field if vLLM cannot serve this adapter (folder or Hub id); returns its largest rank.

    What vLLM refuses (modules_to_save, DoRA, trained biases) the one adapter reader refuses too."""
    try:
        return read_adapter(source).rank
    except QError as e:
        raise QError(f"adapter {name!r}: {e}") from None


def lora_rank_flag(rank: int) -> int | None:
    """The --max-lora-rank value for adapters up to `rank` (None: vLLM's default 16 is enough)."""
    if rank <= VLLM_DEFAULT_LORA_RANK:
        return None
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise QError(f"an adapter has rank {rank}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")


def vllm_command(model: str, adapters: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000,
                 max_batch: int | None = None, max_model_len: int | None = None,
                 served_model_name: str | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, dtype: str = "auto", revision: str | None = None,
                 api_key: str | None = None) -> VllmCommand:  # fmt: skip
    """Check everything, then build the `vllm serve` argv (nothing runs here).

    api_key: required as a Bearer token on vLLM's /v1 routes too (its VLLM_API_KEY), as on ours."""
    base_dir, base_arg = resolve_source(model, revision=revision, allow_patterns=["*.json"]), _vllm_arg(model)
    bnb = check_base(base_dir, dtype, tensor_parallel_size)
    argv = ["vllm", "serve", base_arg, "--host", host, "--port", str(port)]
    if revision:
        argv += ["--revision", revision]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if bnb:
        argv += ["--quantization", "bitsandbytes", "--load-format", "bitsandbytes"]
    if dtype != "auto":
        argv += ["--dtype", dtype]
    if max_batch:
        argv += ["--max-num-seqs", str(max_batch)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if pipeline_parallel_size > 1:
        argv += ["--pipeline-parallel-size", str(pipeline_parallel_size)]
    if adapters:
        ranks, modules = [], []
        for name, source in adapters.items():
            ranks.append(check_adapter(name, source))
            modules.append(f"{name}={_vllm_arg(source)}")
        argv += ["--enable-lora", "--lora-modules", *modules, "--max-loras", str(len(adapters))]
        rank = lora_rank_flag(max(ranks))
        if rank is not None:
            argv += ["--max-lora-rank", str(rank)]
    return VllmCommand(argv, api_key=api_key)


def vllm_installed() -> bool:
    return shutil.which("vllm") is not None or importlib.util.find_spec("vllm") is not None


def run_vllm(cmd: VllmCommand) -> None:
    """Replace this process by `vllm serve` (signals and exit status are vLLM's)."""
    if not vllm_installed():
        raise QError("vllm is not installed here (pip install 'qlora-toolkit[vllm]' on a GPU machine); "
                     "--dry-run prints the command to run there")  # fmt: skip
    exe = shutil.which("vllm")
    argv = cmd.argv if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main", *cmd.argv[1:]]
    env = dict(os.environ, VLLM_API_KEY=cmd.api_key) if cmd.api_key else os.environ
    os.execvpe(argv[0], argv, env)
