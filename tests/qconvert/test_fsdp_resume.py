"""Checkpoints of a sharded run (qconvert/fsdp_checkpoint.py): 2 gloo ranks save with DCP; the same rank
count resumes bit for bit (after kill -9 too), one process loads the shards as whole tensors, a single
process's checkpoint loads into 2 ranks, and a damaged sharded checkpoint is skipped with a note."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_rank import examples, lora_model, n_tokens
from fsdp_resume_rank import optimizer, train_step, weights
from safetensors.torch import load_file, save_file
from test_finetune import BIN, adapter, assert_adapters_close, cfg, cli_args, tiny, wait_for  # noqa: F401
from test_fsdp import assert_close_but_for_8_bit_rounding, free_port

from qconvert import fsdp_checkpoint
from qconvert import train_checkpoint as ckpt
from qconvert.finetune import finetune
from qconvert.paged_adamw import BLOCKSIZE, dequantize_blockwise, quantize_blockwise
from qformats.nf4 import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED
from qformats.peft_adapter import save_adapter_files
from qserve.lora import lora_adapter, lora_config

RANK_SCRIPT = Path(__file__).with_name("fsdp_resume_rank.py")
MOMENTS = {32: (("exp_avg", None, None), ("exp_avg_sq", None, None)),
           8: (("state1", "absmax1", DYNAMIC_MAP_SIGNED), ("state2", "absmax2", DYNAMIC_MAP_UNSIGNED))}  # fmt: skip


def spawn_two_ranks(tiny: Path, work: Path) -> None:  # noqa: F811
    env = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(tiny), str(work)], env=env | {"RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)


def decoded(state: dict, n_params: int, bits: int) -> dict[str, torch.Tensor]:
    """Each parameter's moments ("i.key") as fp32, 8-bit codes decoded with their own blocks of 256."""
    out = {}
    for i in range(n_params):
        for key, scales, code in MOMENTS[bits]:
            if scales is None:
                out[f"{i}.{key}"] = state[f"{i}.{key}"]
                continue
            codes = state[f"{i}.{key}"].reshape(-1)
            padded = torch.zeros(state[f"{i}.{scales}"].numel() * BLOCKSIZE, dtype=torch.uint8)
            padded[: codes.numel()] = codes
            decoded_ = dequantize_blockwise(padded, state[f"{i}.{scales}"], code)[: codes.numel()]
            out[f"{i}.{key}"] = decoded_.view(state[f"{i}.{key}"].shape)
    return out


def from_ranks(work: Path, stem: str, n_params: int, bits: int) -> tuple[dict, dict]:
    """The two ranks' files WORK/STEM-rankR as whole tensors: (LoRA weights, decoded moments)."""
    parts = [{k.removeprefix("state."): v for k, v in load_file(work / f"{stem}-rank{r}.safetensors").items()}
             for r in range(2)]  # fmt: skip
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k.startswith("weight.")}
    moments = [decoded(p, n_params, bits) for p in parts]
    return {k.removeprefix("weight."): v for k, v in joined.items()}, {k: torch.cat([m[k] for m in moments])
                                                                        for k in moments[0]}  # fmt: skip


def assert_moments_match(got: dict, want: dict, bits: int) -> None:
    """32-bit: equal. 8-bit, its blocks cut otherwise: within half a step of the map at the new block's scale
    (which is at most the largest value; 1% for rounding: the largest value itself may take a half step)."""
    for k, b in want.items():
        assert b.abs().max() > 0, k
        if bits == 32:
            assert torch.equal(got[k], b), k
        else:
            code = MOMENTS[8][k.endswith("state2")][2]
            assert (got[k] - b).abs().max() <= (code[1:] - code[:-1]).max() / 2 * b.abs().max() * 1.01, k


def flat_state(opt) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def test_damage_names_a_missing_rank_of_the_sharded_layout(tmp_path):
    """damage() counts each rank's files against the number of processes trainer_state.json records."""
    folder = tmp_path / "step-0000002"
    (folder / "dcp").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2, "sharded": {"shards": 2}}))
    for r in range(2):
        save_file({"x": torch.zeros(2)}, folder / "dcp" / f"shard-0000{r + 1}-model-00001-of-00001.safetensors")
        save_file({"cpu": torch.zeros(2, dtype=torch.uint8)}, folder / f"rng-{r}.safetensors")
    assert ckpt.damage(folder) is None
    (folder / "rng-1.safetensors").unlink()
    assert ckpt.damage(folder) == "1 of its 2 RNG states"
    (folder / "dcp" / "shard-00002-model-00001-of-00001.safetensors").unlink()
    assert ckpt.damage(folder) == "1 of its 2 shard files in dcp/"


def coded(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat x coded as PagedAdamW codes a shard's state: blocks of 256 from its first element, the tail zero."""
    padded = torch.zeros(-(-x.numel() // BLOCKSIZE) * BLOCKSIZE)
    padded[: x.numel()] = x
    codes, absmax = quantize_blockwise(padded, code)
    return codes[: x.numel()], absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(absmax.numel() * BLOCKSIZE, dtype=torch.uint8)
    padded[: codes.numel()] = codes.reshape(-1)
    return dequantize_blockwise(padded, absmax, code)[: codes.numel()]


def test_reblocking_8bit_state_keeps_the_blocks_that_line_up_and_codes_the_rest_again():
    """2 writers of 3 rows of 320 (960 elements: 3 whole blocks and one of 192 each) read by one process."""
    code = DYNAMIC_MAP_SIGNED
    x = torch.randn(6 * 320, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1, 6 * 320)
    holders = [(0, 960), (960, 1920)]
    written = [coded(x[a:b], code) for a, b in holders]
    codes = torch.cat([c for c, _ in written]).view(6, 320)
    new_codes, new_scales = fsdp_checkpoint._reblock(codes, 0, 1920, holders, [a for _, a in written], code)
    assert new_codes.shape == codes.shape and new_scales.numel() == 8
    # Blocks 0-2 are writer 0's blocks 0-2: kept as they were; the others straddle two old blocks: coded again.
    assert torch.equal(new_codes.view(-1)[:768], codes.view(-1)[:768])
    assert torch.equal(new_scales[:3], written[0][1][:3])
    old = torch.cat([decode(c, a, code) for c, a in written])  # each writer's blocks from its own start
    new = decode(new_codes, new_scales, code)
    half_step = (code[1:] - code[:-1]).max() / 2
    assert not torch.equal(new, old)
    for b in range(3, 8):
        span = slice(b * BLOCKSIZE, min((b + 1) * BLOCKSIZE, 1920))
        assert (new[span] - old[span]).abs().max() <= half_step * new_scales[b] * 1.01, b
    # The same writers read back on their own ranges: every block lines up, nothing changes (the short last one too).
    for (a, b), (c, scales) in zip(holders, written):
        same_codes, same_scales = fsdp_checkpoint._reblock(c, a, b, holders, [w[1] for w in written], code)
        assert torch.equal(same_codes, c) and torch.equal(same_scales, scales)
    # A rank that holds no rows.
    empty_codes, empty_scales = fsdp_checkpoint._reblock(codes[6:], 1920, 1920, holders, [w[1] for w in written], code)
    assert empty_codes.shape == (0, 320) and empty_scales.numel() == 0


def test_sharded_checkpoint_resumes_on_two_ranks_and_on_one(tiny, tmp_path):  # noqa: F811
    exs = examples(tiny)
    n = n_tokens(exs)
    single = {}
    for bits in (32, 8):  # the single process's run: 2 steps, a checkpoint in its layout, a third step
        model = lora_model(tiny)
        opt = optimizer(model, bits)
        for _ in range(2):
            train_step(model, opt, exs, n)
        folder = tmp_path / f"whole-{bits}"
        folder.mkdir()
        save_adapter_files(folder, lora_adapter(model, lora_config(r=4, alpha=8)))
        opt.save(folder / "optimizer.safetensors")
        at_two = weights(model), decoded(flat_state(opt), len(weights(model)), bits)
        train_step(model, opt, exs, n)
        single[bits] = at_two, weights(model)

    spawn_two_ranks(tiny, tmp_path)  # the ranks check their own resume bit for bit (fsdp_resume_rank.py)

    for bits in (32, 8):
        sharded = load_file(tmp_path / f"sharded-{bits}.safetensors")
        (single_weights, single_moments), single_third = single[bits]
        n_params = len(single_weights)
        # The single process's checkpoint on 2 ranks: the same rows, and the third step as one process takes it.
        got_weights, got_moments = from_ranks(tmp_path, f"from-whole-{bits}", n_params, bits)
        for k, w in single_weights.items():
            assert torch.equal(got_weights[k], w), k
        assert_moments_match(got_moments, single_moments, bits)
        if bits == 32:  # (8-bit: the blocks, so the steps, differ between the two layouts)
            for k, w in single_third.items():
                assert (sharded[f"continued.{k}"] - w).abs().max() <= 1e-5, k

        # The 2 ranks' checkpoint on one process: whole tensors, and the third step as the 2 ranks took it.
        record = json.loads((tmp_path / f"record-{bits}.json").read_text())
        assert record["shards"] == 2 and (tmp_path / f"dcp-{bits}").is_dir()
        model = lora_model(tiny)
        opt = optimizer(model, bits)
        fsdp_checkpoint.load(tmp_path / f"dcp-{bits}", model, opt, record)
        saved_weights, saved_moments = from_ranks(tmp_path, f"saved-{bits}", n_params, bits)
        for k, w in weights(model).items():
            assert torch.equal(w, saved_weights[k]), k
        assert_moments_match(decoded(flat_state(opt), n_params, bits), saved_moments, bits)
        train_step(model, opt, exs, n)
        if bits == 32:
            for k, w in weights(model).items():
                assert (w - sharded[f"after.{k}"]).abs().max() <= 1e-5, k


# --- `qconvert finetune --fsdp` on 2 processes (started as torchrun starts them: RANK, WORLD_SIZE, ...) ----------


def fsdp_ranks(tiny: Path, out: Path, steps: int, *extra: str) -> list[subprocess.Popen]:  # noqa: F811
    env = os.environ | {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = [str(BIN / "qconvert"), "finetune", *cli_args(tiny, out, steps, "--batch-size", "2", "--fsdp", *extra,
                                                         held_out=False)]  # fmt: skip
    return [subprocess.Popen(args, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in range(2)]  # fmt: skip


def finished(procs: list[subprocess.Popen]) -> str:
    """Rank 0's output, once every rank exited 0."""
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs[0]


def assert_same_bits(a: Path, b: Path) -> None:
    a, b = adapter(a), adapter(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_9_then_resume_on_two_ranks_is_bit_identical_and_skips_a_damaged_checkpoint(tiny, tmp_path):  # noqa: F811
    steps, dropout = 8, ("--dropout", "0.1")  # dropout: each rank's RNG state goes through the checkpoint
    whole = fsdp_ranks(tiny, tmp_path / "whole", steps, *dropout)
    run = fsdp_ranks(tiny, tmp_path / "run", steps, *dropout, "--save-every", "1")
    wait_for(tmp_path / "run-checkpoints", "step-0000002", run[0])
    for proc in run:  # SIGKILL both ranks: no chance to clean up
        proc.kill()
        proc.wait()
    finished(whole)
    assert not (tmp_path / "run").exists()
    kept = sorted((tmp_path / "run-checkpoints").glob("step-*"))
    assert len(kept) == 2 and all((k / "dcp").is_dir() and not (k / "optimizer.safetensors").exists() for k in kept)
    shard = sorted((kept[-1] / "dcp").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])  # rank 1's shard of the newest one, cut short
    out = finished(fsdp_ranks(tiny, tmp_path / "run", steps, *dropout, "--resume"))
    assert f"note: checkpoint {kept[-1].name} is damaged (" in out and "truncated" in out, out
    assert f"resuming from {kept[0]}" in out, out
    assert_same_bits(tmp_path / "run", tmp_path / "whole")


# 8-bit: rank 64, so that the LoRA weights reach the 4096 elements of 8-bit state (as in test_fsdp.py).
OPTIMIZERS = {
    "32-bit": ([], {}),
    "8-bit": (["--optimizer-bits", "8", "--rank", "64"], {"optimizer_bits": 8, "rank": 64}),
}


@pytest.mark.parametrize("bits", list(OPTIMIZERS))
def test_two_rank_checkpoint_resumes_on_two_ranks_and_on_one_process(tiny, tmp_path, bits):  # noqa: F811
    steps, no_dropout = 6, ("--dropout", "0")  # one process draws other dropout masks than 2 ranks: none here
    options, settings = OPTIMIZERS[bits]
    finished(fsdp_ranks(tiny, tmp_path / "whole", steps, *no_dropout, *options, "--save-every", "3"))
    for name in ("on-two", "on-one"):
        shutil.copytree(
            tmp_path / "whole-checkpoints" / "step-0000003", tmp_path / f"{name}-checkpoints" / "step-0000003"
        )
    finished(fsdp_ranks(tiny, tmp_path / "on-two", steps, *no_dropout, *options, "--resume"))
    assert_same_bits(tmp_path / "on-two", tmp_path / "whole")
    notes = []
    one = finetune(cfg(tiny, tmp_path / "on-one", steps=steps, dropout=0.0, resume=True, **settings), echo=notes.append)
    assert "note: step-0000003 was written by 2 process(es), this run has 1: the same global batch" in notes[0], notes
    assert one.steps == steps
    if bits == "32-bit":  # summation order: 1 process against 2
        assert_adapters_close(tmp_path / "on-one", tmp_path / "whole", 1e-5)
    else:  # the shards' 8-bit blocks line up with one process's here (rows x 64 columns), so the state loads
        # exactly; what differs is the nearest 8-bit code of a moment whose gradient differs in its last bits
        assert_close_but_for_8_bit_rounding(tmp_path / "on-one", tmp_path / "whole")


def test_single_process_checkpoint_resumes_on_two_ranks(tiny, tmp_path):  # noqa: F811
    steps = 6
    finetune(cfg(tiny, tmp_path / "single", steps=steps, dropout=0.0, save_every=3))
    shutil.copytree(tmp_path / "single-checkpoints" / "step-0000003", tmp_path / "on-two-checkpoints" / "step-0000003")
    out = finished(fsdp_ranks(tiny, tmp_path / "on-two", steps, "--dropout", "0", "--resume"))
    assert "was written by 1 process(es), this run has 2" in out, out
    assert_adapters_close(tmp_path / "on-two", tmp_path / "single", 1e-5)
