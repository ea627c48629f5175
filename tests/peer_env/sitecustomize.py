"""Pin bitsandbytes to its portable CPU path in the tests and every process they start.

Two things differ on a CPU with AVX-512 (bitsandbytes 0.50.2), and neither is the peer the tests
compare against:
- Its native CPU `dequantize_4bit` is wrong when a weight's row length is not a multiple of the
  blocksize (a [64, 96] weight at blocksize 64 decodes to values off by up to 1.5). bitsandbytes'
  own generic implementation, which it already uses for odd shapes, is exact: here every shape
  uses it.
- With AVX512-BF16 it repacks a Linear4bit's weight at its first eval-mode forward and computes
  every 4-bit matmul in bf16 (its fused CPU kernel casts the input to bf16 whatever the compute
  dtype), and a model saved after the repack no longer has the checkpoint layout. The tests compare
  our fp32 results with the peer's fp32 results at 1e-4; here the probe answers False, so the peer
  dequantizes to the compute dtype and multiplies, as it does on other CPUs and on GPUs.

conftest.py imports this module and puts its folder on PYTHONPATH, so subprocesses (CLI runs,
torchrun workers, snippet runs) load it as `sitecustomize` at start-up. Benchmarks do not: there
the peer runs as it ships.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _no_avx512bf16(module) -> None:
    module.lib.has_avx512bf16_cpu = lambda: False


def _generic_cpu_dequantize_4bit(module) -> None:
    import torch
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    # Eager: bitsandbytes wraps it in torch.compile, which recompiles for every weight shape.
    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    with warnings.catch_warnings():  # torch warns that it replaces bitsandbytes' kernel: that is the point
        warnings.simplefilter("ignore")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)


# Applied right after each module runs: the probe is read while bitsandbytes imports (it picks the
# CPU kernels it registers), so it must be answered before the package finishes importing.
_PATCHES = {"bitsandbytes.cextension": _no_avx512bf16, "bitsandbytes.backends.cpu.ops": _generic_cpu_dequantize_4bit}


class _PortableBitsandbytesPath(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if any(name in sys.modules for name in _PATCHES):
        raise RuntimeError("bitsandbytes was imported before the tests could pin its CPU path")
    if not any(isinstance(f, _PortableBitsandbytesPath) for f in sys.meta_path):
        sys.meta_path.insert(0, _PortableBitsandbytesPath())


install()
