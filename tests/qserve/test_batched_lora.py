"""qserve.lora.batched's two paths agree on CPU: the torch path (stacked adapters + rank mask) and the
gathered layout through `qkernels.ops.batched_lora_add_`, whose CPU implementation is the torch
reference of the Triton kernels (tests/qkernels/interpreter/test_triton_batched_lora.py checks those against it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qformats.errors import QError
from qformats.peft_adapter import AdapterConfig, PeftAdapter
from qkernels.ops import batched_lora_add_, batched_lora_reference_
from qserve.lora import BASE, MultiLoRA, MultiLoRALinear, RowAdapters


def random_adapter(name: str, shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> PeftAdapter:
    """An in-memory adapter: per module (A [rank, in], B [out, rank]), scale 2 / rank."""
    g = torch.Generator().manual_seed(seed)
    weights = {m: (torch.randn(rank, k, generator=g) / 4, torch.randn(n, rank, generator=g) / 4)
               for m, (n, k) in shapes.items()}  # fmt: skip
    return PeftAdapter(AdapterConfig(r=rank, lora_alpha=2.0, target_modules=list(shapes)), weights, source=name)


def two_layers(ranks, n=23, k=37, dtype=torch.float32):
    """A torch-path layer and a gathered layer over the same base and the same adapters (ids 1..)."""
    torch.manual_seed(0)
    rows = RowAdapters()
    base = nn.Linear(k, n).to(dtype)
    masked, gathered = MultiLoRALinear(base, rows), MultiLoRALinear(base, rows, gather=True)
    for aid, r in enumerate(ranks, start=1):
        a, b = (torch.randn(r, k) / 4).to(dtype), (torch.randn(n, r) / 4).to(dtype)
        masked.add_adapter(aid, a, b)
        gathered.add_adapter(aid, a.clone(), b.clone())
    return rows, masked, gathered


@pytest.mark.parametrize("ids", [[1, BASE, 3, 2, 1], [2, 3], [BASE, 3, BASE]])
def test_gathered_reference_equals_torch_path(ids):
    """Mixed adapters of ranks 4, 1, 7 and rows with none, x [B, S, in]: both paths give the same y."""
    rows, masked, gathered = two_layers((4, 1, 7))
    x = torch.randn(len(ids), 3, 37)
    rows.set(ids, torch.device("cpu"))
    with torch.no_grad():
        want, got = masked(x), gathered(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = masked.base(x)
    for row, aid in enumerate(ids):
        if aid == BASE:
            assert torch.equal(got[row], base[row])


def test_bf16_torch_path_stays_bf16():
    """The rank mask is made in the matmuls' dtype: a bf16 model's mixed batch is not promoted to fp32."""
    rows, masked, gathered = two_layers((4, 6), dtype=torch.bfloat16)
    x = torch.randn(3, 37).to(torch.bfloat16)
    rows.set([1, 2, BASE], torch.device("cpu"))
    with torch.no_grad():
        want, got = masked(x), gathered(x)
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_gathered_stack_is_the_only_copy_and_follows_add_and_remove():
    _, _, gathered = two_layers((4, 1))
    g = gathered.gathered
    assert g.ids == (1, 2) and g.a.shape == (2, 4, 37) and g.b.shape == (2, 23, 4) and g.rank.tolist() == [4, 1]
    assert gathered.adapters[2][0].data_ptr() == g.a[1].data_ptr()  # views of the stack
    assert not g.a[1, 1:].any() and not g.b[1, :, 1:].any()  # zero past the rank
    gathered.add_adapter(5, torch.randn(9, 37), torch.randn(23, 9))
    gathered.remove_adapter(1)
    g = gathered.gathered
    assert g.ids == (2, 5) and g.a.shape == (2, 9, 37) and g.rank.tolist() == [1, 9]
    gathered.remove_adapter(2)
    gathered.remove_adapter(5)
    assert gathered.gathered is None and not gathered.adapters


def test_multilora_gather_on_a_model_equals_torch_path():
    """MultiLoRA with the gathered layout (the GPU default) on a small model, adapters targeting different modules."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    adapters = [random_adapter("a", {"0": (24, 16), "2": (16, 24)}, 4, 1),
                random_adapter("b", {"2": (16, 24)}, 8, 2), random_adapter("c", {"0": (24, 16)}, 2, 3)]  # fmt: skip
    x = torch.randn(4, 5, 16)
    outs = []
    for gather in (False, True):
        lora = MultiLoRA(model if not outs else _unwrapped(model), gather=gather)
        ids = [lora.add(a) for a in adapters]
        with torch.no_grad(), lora.use([ids[0], ids[1], BASE, ids[2]]):
            outs.append(lora.model(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _unwrapped(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[m.base if isinstance(m, MultiLoRALinear) else m for m in model])


def test_reference_skips_padding_when_given_ranks():
    """With ranks given, whatever lies past them in the stack is never read."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 12, generator=g), torch.randn(2, 7, 5, generator=g)
    x, y = torch.randn(3, 12, generator=g), torch.zeros(3, 7)
    idx, rank = torch.tensor([1, 0, -1], dtype=torch.int32), torch.tensor([5, 2], dtype=torch.int32)  # slot 1: rank 2
    got = batched_lora_reference_(y.clone(), x, a, b, idx, torch.tensor([1.0, 3.0]), rank)
    torch.testing.assert_close(got[0], 3.0 * (a[1, :2] @ x[0]) @ b[1, :, :2].t())
    torch.testing.assert_close(got[1], (a[0] @ x[1]) @ b[0].t())
    assert not got[2].any()


def test_op_names_the_misfit():
    a, b = torch.zeros(2, 4, 12), torch.zeros(2, 7, 4)
    with pytest.raises(QError, match="batched LoRA: .* do not fit"):
        batched_lora_add_(torch.zeros(3, 7), torch.zeros(3, 12), a, b, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(QError, match="batched LoRA"):
        batched_lora_add_(torch.zeros(3, 8), torch.zeros(3, 12), a, b, torch.zeros(3, dtype=torch.int32))


def test_op_registration_traces():
    """The custom op's schema (mutates y), fake impl and dynamic-shape tracing, as torch.compile uses them."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 12, generator=g), torch.randn(2, 7, 4, generator=g)
    args = (torch.zeros(3, 7), torch.randn(3, 12, generator=g), a, b, torch.tensor([1, 0, -1], dtype=torch.int32),
            torch.tensor([1.0, 2.0]), torch.tensor([4, 2], dtype=torch.int32))  # fmt: skip
    result = torch.library.opcheck(torch.ops.qkernels.batched_lora_add_.default, args,
                                   test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
    assert set(result.values()) == {"SUCCESS"}, result


def test_a_non_finite_bottleneck_in_one_row_stays_in_that_row():
    """Masked rank columns are zeroed by selection, not multiplied by 0: an adapter whose x A^T overflows
    (or holds NaN past the load checks) spoils only the rows that use it in a mixed batch."""
    rows, masked, _ = two_layers((4, 6))
    x = torch.randn(4, 37)
    rows.set([1, 2, BASE, 1], torch.device("cpu"))
    with torch.no_grad():
        clean = masked(x)
        a, _b = masked.adapters[2]
        a[0, 0] = float("nan")
        a[1, 1] = float("inf")
        masked.stacked.clear()  # the stacks are copies made at the first mixed forward
        poisoned = masked(x)
    assert not torch.isfinite(poisoned[1]).all()
    for row in (0, 2, 3):
        assert torch.equal(poisoned[row], clean[row]), row


def test_thread_count_is_owned_by_use_and_restored(monkeypatch):
    """Outside `MultiLoRA.use` the layers never touch torch's thread count; inside, the LoRA products run
    on one thread and the forward's count is back on exit, also when the forward raises."""
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    lora = MultiLoRA(model, gather=False)
    ids = [lora.add(random_adapter("a", {"0": (24, 16)}, 4, 1)), lora.add(random_adapter("b", {"2": (16, 24)}, 2, 2))]
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or real(n))
    threads = torch.get_num_threads()
    x = torch.randn(2, 16)
    with torch.no_grad():
        lora.model(x)
        assert calls == []
        with lora.use(ids):
            lora.model(x)
        assert torch.get_num_threads() == threads and (threads == 1 or 1 in calls)
        with pytest.raises(RuntimeError), lora.use(ids):
            lora.model(torch.randn(2, 3))
        assert torch.get_num_threads() == threads
