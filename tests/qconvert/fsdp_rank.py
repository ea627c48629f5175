"""One rank of tests/qconvert/test_fsdp.py's FSDP2 run, and the step both sides take.

`python fsdp_rank.py FOLDER offload|no-offload`, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
in the environment; rank 0 writes FOLDER/fsdp-offload|no-offload.safetensors.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

from qconvert.fsdp import full_tensor, shard_for_training
from qconvert.paged_adamw import PagedAdamW
from qconvert.sft_data import IGNORE, collate, load_sft_jsonl
from qserve.loader import load_model
from qserve.lora import apply_lora, lora_config, lora_parameters
from qserve.tokenizer import Tokenizer

GLOBAL_BATCH = 4


def lora_model(folder: Path):
    """The tiny NF4 model with LoRA on every linear layer, B drawn non-zero so that A gets a gradient too."""
    model = load_model(folder / "nf4")
    apply_lora(model, lora_config(r=4, alpha=8), seed=1)
    with torch.no_grad():
        for p in lora_parameters(model)[1::2]:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return model.train()


def examples(folder: Path):
    return load_sft_jsonl(folder / "data.jsonl", Tokenizer.from_dir(folder / "nf4")).examples[:GLOBAL_BATCH]


def n_tokens(exs) -> int:
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in exs)


def step(model, exs, n: int, params) -> tuple[torch.Tensor, dict, dict]:
    """Loss, LoRA gradients, and LoRA weights after one PagedAdamW step (gradients and weights whole)."""
    tokens, labels = collate(exs, pad_id=0)
    loss = model.loss(tokens, labels, n)
    loss.backward()
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = {k: full_tensor(p.grad) for k, p in named.items()}
    PagedAdamW(params, lr=1e-2).step()
    return loss.detach(), grads, {k: full_tensor(p.detach()) for k, p in named.items()}


def rank_main(folder: Path, offload: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    exs = examples(folder)
    per = GLOBAL_BATCH // world
    whole = lora_model(folder).state_dict()
    model = shard_for_training(lora_model(folder), dist.group.WORLD if offload else None, offload=offload)
    assert any(p.dtype == torch.uint8 for p in model.parameters())  # the NF4 codes are parameters now
    for name, p in model.named_parameters():  # and every tensor is held 1/world per rank
        assert p.to_local().numel() <= -(-p.numel() // world), name
    # untied float tables: units of their own, gathered around their use, not for the root's whole step
    assert isinstance(model.model.embed_tokens, FSDPModule) and isinstance(model.lm_head, FSDPModule)
    loss, grads, weights = step(model, exs[rank * per : (rank + 1) * per], n_tokens(exs), lora_parameters(model))
    dist.all_reduce(loss)
    sharded = model.state_dict()  # the unsharded names (the checkpoint's and PEFT's), each tensor whole when gathered
    assert list(sharded) == list(whole)
    for k, t in sharded.items():
        assert torch.equal(full_tensor(t), whole[k]) or "lora_" in k, k  # the LoRA weights took a step
    if rank == 0:
        save_file({"loss": loss.reshape(1)} | {"grad." + k: g for k, g in grads.items()}
                  | {"weight." + k: w.contiguous() for k, w in weights.items()}, folder / f"fsdp-{sys.argv[2]}.safetensors")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), sys.argv[2] == "offload")
