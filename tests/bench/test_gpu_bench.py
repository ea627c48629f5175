"""`bench/gpu.py --dry-run`: the GPU check's code (kernel checks, the GEMV and batched-LoRA tables under the Triton
interpreter, the decode table against transformers + bitsandbytes) runs end to end on the CPU, so it is ready
whenever a GPU is at hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}  # in its own process: before triton loads
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--work", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("machine: ") and lines[1].startswith("NF4 shapes [out x in]: 33x130; M = 1, 5, 20")
    checks = [ln for ln in lines if ln.startswith(("dequantize ", "fused ", "dequant+mm ", "batched lora "))]
    assert len(checks) == 4 + 2 * 2 * 3 + 2 * 3 and all(ln.endswith(" ok") for ln in checks), checks
    rows = [ln for ln in lines if ln.startswith("| 20")]  # table rows start with the date
    nf4 = [r for r in rows if "| 33x130 |" in r]
    assert [r.split(" | ")[3] for r in nf4] == ["1", "5", "20"]
    assert len([r for r in rows if "| 96 -> 40 |" in r]) == 2 * 2 * 1  # T rows x adapter counts x ranks
    decode = [r for r in rows if "| tiny random " in r]
    assert len(decode) == 2 and all(r.endswith("x |") for r in decode), decode
    assert any(ln.startswith("Decode, greedy, batch 1, 8 new tokens") and "+ bitsandbytes " in ln for ln in lines)
