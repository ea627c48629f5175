"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder `step-NNNNNNN/` under the run's checkpoint directory:
- `adapter_config.json` + `adapter_model.safetensors`: the adapter so far (a PEFT folder itself);
- `optimizer.safetensors`: PagedAdamW's state (tensors only, no pickle);
- or, for a sharded (`--fsdp`) run, in place of those two, `dcp/`: each rank's shards of the LoRA
  weights and optimizer state, one safetensors file per rank (qconvert/fsdp_checkpoint.py);
- `rng-<rank>.safetensors`: each rank's torch RNG states (CPU and CUDA), for dropout;
- `trainer_state.json`: step, data position (epoch, micro-batch), scheduler, loss history, the number
  of processes that wrote it, and the settings that must not change on resume (with them, the resumed
  run equals an uninterrupted one).
It is written into a temp folder and renamed once every rank has written its part, so a folder named
`step-*` is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qformats.errors import QError
from qformats.json_file import read_json_object
from qformats.safetensors_file import read_safetensors_header

STATE_FILE = "trainer_state.json"
SHARDS_DIR = "dcp"  # a sharded run's tensors (qconvert/fsdp_checkpoint.py)
_STEP_DIR = re.compile(r"step-(\d+)")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (trainer_state.json written), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()
             and (p / STATE_FILE).is_file()]  # fmt: skip
    return [p for _, p in sorted(found, reverse=True)]


def newest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    found = checkpoints(root)
    return found[0] if found else None


def damage(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, truncated or unreadable), or None.

    Checks what can be checked without loading: the state JSON, every safetensors header against its
    file size, and that every rank's files are there, which is what a disk filling up or a copy cut short
    breaks."""
    try:
        state = read_state(folder)
        sharded = state.get("sharded")
        if sharded is None:
            for name in ("adapter_model.safetensors", "optimizer.safetensors"):
                read_safetensors_header(folder / name)
        elif not isinstance(sharded, dict):
            return f"{STATE_FILE}: 'sharded' is not an object"
        else:
            shards = sorted((folder / SHARDS_DIR).glob("*.safetensors"))
            if len(shards) != sharded.get("shards"):
                return f"{len(shards)} of its {sharded.get('shards')} shard files in {SHARDS_DIR}/"
            for shard in shards:
                read_safetensors_header(shard)
        rngs = sorted(folder.glob("rng-*.safetensors"))
        if "world_size" in state and len(rngs) != state["world_size"]:
            return f"{len(rngs)} of its {state['world_size']} RNG states"
        for rng in rngs:
            read_safetensors_header(rng)
    except QError as e:
        return str(e)
    return None


def newest_intact_checkpoint(root: Path, note: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that is not damaged; each damaged newer one is skipped with a note."""
    for folder in checkpoints(root):
        problem = damage(folder)
        if problem is None:
            return folder
        note(f"checkpoint {folder.name} is damaged ({problem}); falling back to an older one")
    return None


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".step-{step:07d}.tmp"


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def save_rng(folder: Path, rank: int) -> None:
    save_file(rng_state(), str(folder / f"rng-{rank}.safetensors"))


def load_rng(folder: Path, rank: int) -> None:
    """Set this rank's RNG states from the checkpoint; where the run that wrote it had no such rank (it ran
    on fewer processes), the RNG stays as it is."""
    path = folder / f"rng-{rank}.safetensors"
    if not path.is_file():
        return
    try:
        state = load_file(str(path))
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
        torch.set_rng_state(state["cpu"])
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    except (OSError, SafetensorError, KeyError, RuntimeError, TypeError) as e:
        raise QError(f"{path}: not an RNG state written by qconvert finetune ({type(e).__name__}: {e})") from None


def finish(tmp: Path, final: Path, state: dict, keep: int) -> Path:
    """Write trainer_state.json last, rename tmp -> final, and prune all but the newest `keep` checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for stale in final.parent.glob(".step-*.tmp"):  # left by a run killed while saving (one saves at a time)
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        done = sorted((int(m.group(1)), p) for p in final.parent.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))
        for _, old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict:
    return read_json_object(folder / STATE_FILE)


def check_same_run(saved: dict, current: dict, folder: Path) -> None:
    """Resuming with different data or settings would not continue the same run: refuse, naming each difference."""
    if "global_batch" not in saved and {"batch_size", "grad_accum", "world_size"} <= saved.keys():
        saved = saved | {"global_batch": saved["batch_size"] * saved["grad_accum"] * saved["world_size"]}  # older runs
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise QError(f"{folder} was made with other settings, so --resume cannot continue it ({'; '.join(diffs)}); "
                     "use the same settings, or start a new run without --resume")  # fmt: skip


def load_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise QError(f"{folder}: unreadable adapter weights ({e})") from None
