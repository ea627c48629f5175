"""The training allocator (qkernels/cpu_caching_allocator.cpp): freed large blocks are reused, capped,
the numbers computed with it are the numbers computed without it, and leaving it restores the allocator.

It changes the allocator of the whole process, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import torch
    from qkernels.cpu_allocator import cached_bytes, caching_allocator

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(700, 900, generator=g), torch.randn(900, 500, generator=g)
    expected = a @ b
    training = caching_allocator(cap_bytes=8 << 20)
    assert training.__enter__()
    assert cached_bytes() == 0
    x = torch.empty(1 << 20)                      # 4 MiB: a cached block
    ptr = x.data_ptr()
    assert ptr % 64 == 0
    del x
    assert 4 << 20 < cached_bytes() <= (4 << 20) + (64 << 10)
    y = torch.ones(1 << 20)                      # the same size again: the same block, filled anew
    assert y.data_ptr() == ptr and cached_bytes() == 0 and bool((y == 1).all())
    z = torch.empty((1 << 20) - 1000)            # a little smaller: reuses a cached block too
    del y
    w = torch.empty(1 << 20)
    assert w.data_ptr() == ptr
    del z, w
    big = [torch.empty(3 << 20) for _ in range(3)]  # 12 MiB each: over the 8 MiB cap, unmapped on free
    del big
    assert cached_bytes() <= 8 << 20
    small = torch.empty(1000)                      # below 256 KiB: the heap, not the cache
    assert small.data_ptr() % 64 == 0
    del small
    # torch's raw_allocate path (oneDNN's buffers use it) on both kinds of block: it needs the data
    # pointer to be the whole context and one raw deleter that frees either kind
    from qkernels.cpu import linear_fp32
    for m, k, n in ((40, 32, 24), (600, 576, 1536)):
        xs, ws = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        torch.testing.assert_close(linear_fp32(xs, ws), xs @ ws.t(), rtol=1e-5, atol=1e-4)
    assert cached_bytes() <= 8 << 20
    for _ in range(3):                             # results do not depend on the allocator
        assert torch.equal(a @ b, expected)
        t = torch.randn(2000, 300, generator=g).requires_grad_()
        (t.sin() * 2).sum().backward()
        assert torch.allclose(t.grad, 2 * t.detach().cos())
    with caching_allocator(cap_bytes=8 << 20) as inner:  # nested: only sets the cap, the outer exit restores
        assert inner
    x = torch.empty(1 << 20)
    del x
    assert cached_bytes() > 0
    training.__exit__(None, None, None)           # the previous allocator is back, the cache emptied
    assert cached_bytes() == 0
    x = torch.empty(1 << 20)
    del x
    assert cached_bytes() == 0 and torch.equal(a @ b, expected)
    print("ok")
""")


def test_caching_allocator_reuses_caps_and_computes_the_same():
    out = subprocess.run([sys.executable, "-c", CHECK], check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
