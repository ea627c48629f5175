"""FSDP2 over the NF4 base (qconvert/fsdp.py): 2 gloo processes equal one process on the whole batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fsdp_rank import examples, lora_model, n_tokens, step
from safetensors.torch import load_file
from test_finetune import tiny  # noqa: F401  (the fixture)

from qserve.lora import lora_parameters

RANK_SCRIPT = Path(__file__).with_name("fsdp_rank.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offload", ["no-offload", "offload"])
def test_two_process_fsdp_step_equals_single_process(tiny, offload):  # noqa: F811
    model = lora_model(tiny)
    exs = examples(tiny)
    loss, grads, weights = step(model, exs, n_tokens(exs), lora_parameters(model))

    env = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(tiny), offload], env=env | {"RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    got = load_file(tiny / f"fsdp-{offload}.safetensors")
    assert abs(got["loss"].item() - loss.item()) <= 1e-5
    assert grads.keys() and any(g.abs().max() > 0 for g in grads.values())
    for k in grads:
        assert (got["grad." + k] - grads[k]).abs().max() <= 1e-5, k
        assert (got["weight." + k] - weights[k]).abs().max() <= 1e-5, k
