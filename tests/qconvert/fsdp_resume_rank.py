"""One rank of tests/qconvert/test_fsdp_resume.py's library-level run, and the steps both sides take.

`python fsdp_resume_rank.py TINY WORK`, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the
environment. For 32- and 8-bit optimizer state: three sharded steps, a checkpoint after the second
(WORK/dcp-BITS); a fresh model and optimizer load it and take the third step, which must give the
same weights bit for bit; and a fresh sharded model loads WORK/whole-BITS, the checkpoint the test's
single process wrote, and takes the third step. What the test checks is written to WORK.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_rank import GLOBAL_BATCH, examples, lora_model, n_tokens
from safetensors.torch import save_file

from qconvert import fsdp_checkpoint
from qconvert.fsdp import full_tensor, shard_for_training
from qconvert.paged_adamw import PagedAdamW
from qconvert.sft_data import collate

MIN_8BIT = 64  # the tiny model's LoRA weights have 256-384 elements: 8-bit state for all of them


def optimizer(model, bits: int) -> PagedAdamW:
    return PagedAdamW(list(fsdp_checkpoint.lora_weights(model).values()), lr=1e-2, optim_bits=bits,
                      min_8bit_size=MIN_8BIT)  # fmt: skip


def train_step(model, opt: PagedAdamW, exs, n: int) -> None:
    tokens, labels = collate(exs, pad_id=0)
    model.loss(tokens, labels, n).backward()
    opt.step()
    opt.zero_grad()


def weights(model) -> dict[str, torch.Tensor]:
    """The whole LoRA weights (a collective when sharded)."""
    return {k: full_tensor(p.detach()).clone() for k, p in fsdp_checkpoint.lora_weights(model).items()}


def local_state(model, opt: PagedAdamW) -> dict[str, torch.Tensor]:
    """This rank's LoRA rows and optimizer state, flat, to compare bit for bit."""
    out = {f"weight.{k}": p.detach().to_local().clone() for k, p in fsdp_checkpoint.lora_weights(model).items()}
    for i, st in opt.state_dict()["state"].items():
        out |= {f"state.{i}.{k}": v for k, v in st.items()}
    return out


def rank_main(tiny: Path, work: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    exs = examples(tiny)
    per = GLOBAL_BATCH // world
    mine, n = exs[rank * per : (rank + 1) * per], n_tokens(exs)
    for bits in (32, 8):
        model = shard_for_training(lora_model(tiny))
        opt = optimizer(model, bits)
        for _ in range(2):
            train_step(model, opt, mine, n)
        record = fsdp_checkpoint.save(work / f"dcp-{bits}", model, opt)
        saved = local_state(model, opt)
        train_step(model, opt, mine, n)
        after = weights(model)

        resumed = shard_for_training(lora_model(tiny))
        resumed_opt = optimizer(resumed, bits)
        fsdp_checkpoint.load(work / f"dcp-{bits}", resumed, resumed_opt, record)
        loaded = local_state(resumed, resumed_opt)
        assert loaded.keys() == saved.keys()
        for k in saved:
            assert torch.equal(loaded[k], saved[k]), (bits, k)
        train_step(resumed, resumed_opt, mine, n)
        for k, w in weights(resumed).items():
            assert torch.equal(w, after[k]), (bits, k)

        from_whole = shard_for_training(lora_model(tiny))
        whole_opt = optimizer(from_whole, bits)
        fsdp_checkpoint.load(work / f"whole-{bits}", from_whole, whole_opt, None)
        loaded = local_state(from_whole, whole_opt)
        train_step(from_whole, whole_opt, mine, n)
        continued = weights(from_whole)
        save_file(loaded, work / f"from-whole-{bits}-rank{rank}.safetensors")
        if rank == 0:
            save_file({f"after.{k}": w for k, w in after.items()} | {f"continued.{k}": w for k, w in continued.items()},
                      work / f"sharded-{bits}.safetensors")  # fmt: skip
            (work / f"record-{bits}.json").write_text(json.dumps(record))
        save_file(saved, work / f"saved-{bits}-rank{rank}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
