"""One rank of tests/qconvert/test_fsdp_load.py: `python fsdp_load_rank.py equal|memory|bad FOLDER`, with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment. `equal`: the streamed load's shards, padded
storage, loss and gradients equal the whole-model path's (a failed check exits non-zero). `memory`:
writes FOLDER/rss-RANK.json, the rank's resident set before and at its peak while loading, and the
model's bytes; then checks as `equal` does. `bad`: the load fails on every rank, each rank's message in
FOLDER/error-RANK.txt.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from qconvert.fsdp import shard_for_training
from qconvert.fsdp_load import load_sharded_model
from qformats.errors import QError
from qserve.loader import load_model
from qserve.lora import apply_lora, lora_config

SEED = 1


def load(folder: Path, streamed: bool):
    config = lora_config(r=4, alpha=8)
    if streamed:
        return load_sharded_model(folder / "nf4", config, seed=SEED, dtype=torch.float32, device=torch.device("cpu"))
    model = load_model(folder / "nf4", dtype=torch.float32)
    apply_lora(model, config, seed=SEED)
    return shard_for_training(model)


def _padded_storage(model) -> dict[str, torch.Tensor]:
    """Every FSDP parameter's padded local storage (what FSDP all-gathers from), by parameter name."""
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for fsdp_param in module._get_fsdp_state()._fsdp_param_group.fsdp_params:
                info = fsdp_param._module_info
                out[f"{names[info.module]}.{info.param_name}"] = fsdp_param._sharded_param_data
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _check_equal(folder: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    streamed, whole = load(folder, True), load(folder, False)
    a, b = dict(streamed.named_parameters()), dict(whole.named_parameters())
    assert a.keys() == b.keys() and a, (a.keys() ^ b.keys())
    assert any(p.dtype == torch.uint8 for p in a.values())
    for name, p in a.items():
        sa, sb = p.to_local(), b[name].to_local()
        assert sa.shape == sb.shape and sa.dtype == sb.dtype, (name, sa.shape, sb.shape)
        assert torch.equal(_bytes(sa), _bytes(sb)), name
        assert p.requires_grad == b[name].requires_grad, name
    pa, pb = _padded_storage(streamed), _padded_storage(whole)
    assert pa.keys() == pb.keys() and len(pa) == len(a), (len(pa), len(a))
    for name in pa:
        assert torch.equal(_bytes(pa[name]), _bytes(pb[name])), name

    # A global batch of 4 random sequences, 2 per rank; every position trained.
    tokens = torch.randint(streamed.args.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    mine = tokens[rank * 4 // world : (rank + 1) * 4 // world]
    losses = [m.train().loss(mine, mine, tokens[:, 1:].numel()) for m in (streamed, whole)]
    for loss in losses:
        loss.backward()
        dist.all_reduce(loss.detach())
    assert losses[0].item() == losses[1].item(), [x.item() for x in losses]
    for name, p in a.items():
        if p.requires_grad:
            assert torch.equal(p.grad.to_local(), b[name].grad.to_local()), name


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _check_memory(folder: Path) -> None:
    # FSDP2's first use costs ~100 MB of runtime whatever the model (imports, DTensor's dispatch tables):
    # paid here on a 4 x 4 linear, so that what grows below is what the load holds.
    fully_shard(torch.nn.Linear(4, 4))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current resident set
    before = _status_bytes("VmRSS")
    model = load(folder, True)
    peak = _status_bytes("VmHWM")
    params = {id(p): p for p in model.parameters()}.values()
    whole = sum(p.numel() * p.element_size() for p in params)
    local = sum(p.to_local().numel() * p.element_size() for p in params)
    got = {"before": before, "peak": peak, "peak_growth": peak - before, "whole_bytes": whole, "local_bytes": local}
    (folder / f"rss-{dist.get_rank()}.json").write_text(json.dumps(got))
    del model
    _check_equal(folder)


def _check_refused(folder: Path) -> None:
    """The streamed load must fail with a QError on every rank; its message goes to FOLDER/error-RANK.txt."""
    try:
        load(folder, True)
    except QError as e:
        (folder / f"error-{dist.get_rank()}.txt").write_text(str(e))
        return
    raise AssertionError("the bad checkpoint loaded")


def rank_main(mode: str, folder: Path) -> None:
    dist.init_process_group("gloo")
    try:
        {"equal": _check_equal, "memory": _check_memory, "bad": _check_refused}[mode](folder)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1], Path(sys.argv[2]))
