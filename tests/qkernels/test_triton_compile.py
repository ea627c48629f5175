"""Every Triton kernel in qkernels, compiled for A100 (sm_80) and H100/H200 (sm_90) on a machine without a GPU.

The interpreter (tests/qkernels/interpreter) runs kernels as Python and accepts code that the real compiler
rejects; this test runs the real compiler. The specializations are the ones the code launches: the
Python entry points (`triton_nf4.dequantize`, `fused_matmul` with every config `fused_config`
returns for real model shapes, `triton_batched_lora.add_` with every `batched_config`) are called
on CPU tensors under a recording driver that stands in for CUDA, and Triton's own launcher records
each kernel, signature, constexprs, alignment attributes and options instead of compiling and
launching. Each one is then compiled by `triton.compile` for both targets (the wheel ships ptxas),
and `cuobjdump --dump-resource-usage` reads registers and stack (spills) from the cubin; shared
memory is the dynamic amount Triton allocates. Fails on a compile error, a spill, or more than
`DECODE_MAX_REGISTERS` registers a thread in the decode kernel (the fused matmul, every config).

Run alone for the table: `.venv/bin/python tests/qkernels/test_triton_compile.py`.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    # Loud, not a skip: under the interpreter nothing here would be proven (make test runs it without).
    pytest.fail("tests/qkernels/test_triton_compile.py compiles for real GPUs: run it without TRITON_INTERPRET", pytrace=False)

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.errors import TritonError
from triton.runtime import driver

from qformats.nf4 import NF4Weight

ARCHS = (80, 90)  # A100, H100/H200
DECODE_MAX_REGISTERS = 128
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # all that qformats.nf4.check_blocksize accepts
# [out, in] of the linears of SmolLM2-135M, Llama-3-8B and Llama-3-70B (q/o, k/v, gate/up, down).
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (1024, 4096), (14336, 4096),
          (4096, 14336), (8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]  # fmt: skip
FUSED_ROWS = (1, 2, 8, 16, 17, 64, 512)  # decode (linear's fused path) and bench/gpu.py's fused rows
SM_COUNTS = (108, 132)  # A100, H100
LORA_RANKS = (8, 16, 32, 64, 128)
LORA_TOKENS = (1, 2, 4, 8, 16, 64, 512)


_UNLABELLED = ("NESTED_BLOCKSIZE", "UPCAST", "INTERPRET", "EMULATE_RNE")  # the same in every GPU launch


@dataclass(frozen=True)
class Launch:
    """One specialization as Triton's launcher builds it: what `triton.compile` needs."""

    module: str
    kernel: str
    signature: tuple  # ((arg, type), ...)
    constants: tuple  # ((path, value), ...)
    attrs: tuple  # ((path, attributes), ...)
    options: tuple  # ((option, value), ...)

    def constexpr(self, name: str):
        index = [arg for arg, _ in self.signature].index(name)
        return dict(self.constants).get((index,))

    def label(self) -> str:
        sig = dict(self.signature)
        x = next(ty for arg, ty in self.signature if arg in ("x_ptr", "out_ptr", "y_ptr"))
        consts = {arg: self.constexpr(arg) for arg, ty in self.signature if ty == "constexpr"}
        consts = {k: v for k, v in consts.items() if k not in _UNLABELLED}
        ones = [arg for arg, ty in sig.items() if ty == "constexpr" and arg not in consts and self.constexpr(arg) == 1]
        opts = dict(self.options)
        text = " ".join(f"{k}={v}" for k, v in consts.items())
        return f"{x[1:]} {text} warps={opts['num_warps']}" + (f" ({'=1, '.join(ones)}=1)" if ones else "")


class _RecordingDriver:
    """Stands in for the CUDA driver: enough for Triton's launcher to specialize and look up a kernel."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"compile-check-sm{arch}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


def _kernels():
    from qkernels import triton_batched_lora, triton_nf4

    return [v for m in (triton_nf4, triton_batched_lora) for v in vars(m).values() if isinstance(v, triton.JITFunction)]


@contextlib.contextmanager
def recording_launches():
    """Kernel launches in this block are recorded (a set of `Launch`) instead of compiled and run."""
    launches: set[Launch] = set()

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        launches.add(Launch(
            module=fn.module, kernel=fn.name, signature=tuple(compile["signature"].items()),
            constants=tuple(sorted(compile["constants"].items())),
            attrs=tuple(sorted((k, tuple(map(tuple, v))) for k, v in compile["configs"][0].items())),
            options=(("num_warps", compile["num_warps"]), ("num_stages", compile["num_stages"]),
                     ("enable_fp_fusion", compile["enable_fp_fusion"])),
        ))  # fmt: skip
        return True  # skip the compile; the launcher then returns without launching

    recording = _RecordingDriver(90)
    saved_hook, saved_driver = knobs.runtime.jit_cache_hook, driver._active
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(recording)
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        driver._active = saved_driver
        for kernel in _kernels():
            kernel.device_caches.pop(recording.device, None)


def _weight(n: int, k: int, blocksize: int, dq: bool) -> NF4Weight:
    """An NF4 weight's tensors, uninitialized: the kernels are specialized on them, never run."""
    blocks = -(-n * k // blocksize)
    nested = -(-blocks // 256)
    if dq:
        return NF4Weight(packed=torch.empty(n * k // 2, 1, dtype=torch.uint8), absmax=torch.empty(blocks, dtype=torch.uint8),
                         quant_map=torch.empty(16), shape=(n, k), dtype=torch.bfloat16, blocksize=blocksize,
                         nested_absmax=torch.empty(nested), nested_quant_map=torch.empty(256), offset=0.0)  # fmt: skip
    return NF4Weight(packed=torch.empty(n * k // 2, 1, dtype=torch.uint8), absmax=torch.empty(blocks),
                     quant_map=torch.empty(16), shape=(n, k), dtype=torch.bfloat16, blocksize=blocksize)  # fmt: skip


@contextlib.contextmanager
def _cuda_with_sms(module, sms: int):
    """`module`'s config functions see a CUDA device with `sms` multiprocessors."""
    saved = module._sm_count
    module._sm_count = lambda index: sms
    try:
        yield torch.device("cuda", 0)
    finally:
        module._sm_count = saved


def _fused_configs() -> list[tuple[torch.dtype, dict]]:
    """(x dtype, config) for every config `fused_config` returns for the shapes and rows above, on A100 and H100."""
    from qkernels import triton_nf4

    configs = {}
    for sms in SM_COUNTS:
        with _cuda_with_sms(triton_nf4, sms) as cuda:
            for (n, k), m, dtype in itertools.product(SHAPES, FUSED_ROWS, DTYPES):
                cfg = triton_nf4.fused_config(m, n, k, cuda, dtype)
                configs[(dtype, *sorted(cfg.items()))] = (dtype, cfg)
    return list(configs.values())


def _batched_configs() -> list[tuple[int, int, dict]]:
    """(r_max, tokens, config) for every config `batched_config` returns on A100 and H100."""
    from qkernels import triton_batched_lora

    configs = {}
    for sms in SM_COUNTS:
        with _cuda_with_sms(triton_batched_lora, sms) as cuda:
            for (n, k), r, t in itertools.product(SHAPES, LORA_RANKS, LORA_TOKENS):
                cfg = triton_batched_lora.batched_config(t, n, k, r, cuda)
                configs[(r, t > 1, *sorted(cfg.items()))] = (r, t, cfg)
    return list(configs.values())


def launched_specializations() -> list[Launch]:
    """Drive the kernels' Python entry points over every dtype, format variant and config."""
    from qkernels import triton_batched_lora, triton_nf4

    with recording_launches() as launches:
        for blocksize in BLOCKSIZES:
            for dq in (True, False):
                w = _weight(256, 4096, blocksize, dq)
                for dtype in DTYPES:
                    triton_nf4.dequantize(w, dtype)
                for dtype, cfg in _fused_configs():
                    for m in (1, 5):
                        x = torch.empty(m, 4096, dtype=dtype)
                        triton_nf4.fused_matmul(x, w, config=cfg)
                        triton_nf4.fused_matmul(x, w, torch.empty(256, dtype=dtype), config=cfg)
        for r, t, cfg in _batched_configs():
            for dtype in DTYPES:
                x, y = torch.empty(t, 4096, dtype=dtype), torch.empty(t, 1024, dtype=dtype)
                a, b = torch.empty(3, r, 4096, dtype=dtype), torch.empty(3, 1024, r, dtype=dtype)
                idx, rank = torch.zeros(t, dtype=torch.int32), torch.full((3,), r, dtype=torch.int32)
                scale = torch.ones(3)
                triton_batched_lora.add_(y, x, a, b, idx, None, rank, config=cfg)  # what qserve launches
                triton_batched_lora.add_(y, x, a, b, idx, scale, None, config=cfg)
    return sorted(launches, key=lambda s: (s.kernel, s.label()))


@dataclass
class Compiled:
    launch: Launch
    arch: int
    registers: int = 0
    stack: int = 0  # bytes of stack a thread: > 0 means spills
    local: int = 0
    shared: int = 0  # bytes of shared memory a program (Triton's dynamic allocation)
    error: str = ""


def compile_one(launch: Launch, arch: int) -> Compiled:
    """`triton.compile` for one target, resources read from the cubin."""
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    attrs = {path: list(map(list, values)) for path, values in launch.attrs}
    src = ASTSource(fn, dict(launch.signature), dict(launch.constants), attrs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except (TritonError, RuntimeError) as e:  # the compiler's message (e.g. "Return type mismatch") is the result
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return Compiled(launch, arch, error=f"{type(e).__name__}: {first[:300]}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert found, usage
    regs, stack, local = map(int, found.groups())
    return Compiled(launch, arch, regs, stack, local, kernel.metadata.shared)


def _compile_in_worker(job):
    return compile_one(*job)


def compile_all(launches: list[Launch]) -> list[Compiled]:
    """Every launch for every target, in a process pool (compiles are CPU-bound and independent)."""
    jobs = [(launch, arch) for launch in launches for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_in_worker, jobs, chunksize=4))


def is_decode(launch: Launch) -> bool:
    return launch.kernel == "_fused_matmul_kernel"


def problems(results: list[Compiled]) -> list[str]:
    found = []
    for r in results:
        where = f"{r.launch.kernel} [{r.launch.label()}] sm_{r.arch}"
        if r.error:
            found.append(f"{where}: does not compile: {r.error}")
        elif r.stack or r.local:
            found.append(f"{where}: spills ({r.stack} bytes of stack, {r.local} local)")
        elif is_decode(r.launch) and r.registers > DECODE_MAX_REGISTERS:
            found.append(f"{where}: {r.registers} registers a thread, decode allows {DECODE_MAX_REGISTERS}")
    return found


def table(results: list[Compiled]) -> str:
    """One line per specialization: registers / stack / shared memory (bytes) for each target."""
    rows: dict[Launch, dict[int, Compiled]] = {}
    for r in results:
        rows.setdefault(r.launch, {})[r.arch] = r
    heads = " ".join(f"{f'sm_{arch} reg/stack/smem':>24}" for arch in ARCHS)
    lines = [f"{'kernel':<22} {'specialization':<92} {heads}"]
    for launch, by_arch in rows.items():
        cells = []
        for arch in ARCHS:
            r = by_arch[arch]
            cells.append(f"{'ERROR':>24}" if r.error else f"{f'{r.registers}/{r.stack}/{r.shared}':>24}")
        lines.append(f"{launch.kernel:<22} {launch.label():<92} " + " ".join(cells))
    return "\n".join(lines)


def test_every_launched_kernel_compiles_for_sm80_and_sm90(capsys):
    launches = launched_specializations()
    kernels = {launch.kernel for launch in launches}
    entry_points = {k.__name__ for k in _kernels() if k.__name__.endswith("_kernel")}  # the rest are device functions
    assert kernels == entry_points, f"kernels never launched here: {entry_points - kernels}"
    results = compile_all(launches)
    with capsys.disabled():
        print(f"\n{len(launches)} specializations x {len(ARCHS)} targets\n{table(results)}")
    found = problems(results)
    assert not found, f"{len(found)} of {len(results)} compiles failed the checks:\n" + "\n".join(found)


if __name__ == "__main__":
    launches = launched_specializations()
    results = compile_all(launches)
    print(table(results))
    print("\n".join(problems(results)) or "all compile, no spills, decode within the register limit")
    sys.exit(1 if problems(results) else 0)
