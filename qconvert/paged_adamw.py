"""PagedAdamW: AdamW whose state lives in fixed-size pages under a memory budget.

All optimizer state (first and second moments of every parameter) is laid out in one flat
element space per precision, cut into pages of equal size. A page's home is host memory
(pinned when CUDA is present); the pages being worked on are *resident* on the parameters'
device, at most `budget_bytes` of them at a time. `step()` walks the pages, resident ones
first, fetching the next page on a side stream while the current one computes (prefetch),
and evicting the least recently used page when the budget is full. `evict()` frees resident
pages for a memory spike (the training loop calls it on an out-of-memory error). On CPU the
same code runs: with no budget the pages are used in place; with a budget the resident
copies are real copies, written back on eviction, which the tests use to prove the budget.

Two state precisions:
- 32-bit: the math of `torch.optim.AdamW` (decoupled weight decay), op for op.
- 8-bit: bitsandbytes' blockwise scheme (`AdamW8bit`): blocks of 256, the first moment coded
  with the signed dynamic map, the second with the unsigned one, nearest value, one fp32
  absmax per block; parameters under `min_8bit_size` elements keep 32-bit state, as in bnb.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from qformats.errors import QError
from qformats.nf4 import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED

BLOCKSIZE = 256  # 8-bit state blocks; pages and parameter offsets align to it


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 absmax per block of 256) of a flat fp32 tensor whose length is a multiple of 256.

    Nearest value of `code` (ties take the lower index); an all-zero block codes 0 exactly.
    """
    blocks = x.view(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.nan_to_num(blocks * (1.0 / absmax).unsqueeze(1), nan=0.0)
    mids = (code[:-1] + code[1:]) / 2
    # searchsorted, not bucketize: same answer, and bucketize's threading costs more than the work on small inputs.
    return torch.searchsorted(mids, scaled.view(-1), right=False).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (code[codes.long()].view(-1, BLOCKSIZE) * absmax.unsqueeze(1)).view(-1)


@dataclass
class _Segment:
    """A run of one parameter's elements inside a page."""

    param: int  # index into PagedAdamW._params
    src: int  # first element in the flattened parameter
    dst: int  # first element in the page
    n: int


@dataclass
class _Page:
    bits: int  # 32 or 8
    segments: list[_Segment]
    host: torch.Tensor  # uint8 [page_bytes]: the page's home


def _page_views(buf: torch.Tensor, bits: int, elems: int) -> tuple[torch.Tensor, ...]:
    """Typed views of a page buffer: (m, v) fp32 for 32-bit; (absmax1, absmax2, codes1, codes2) for 8-bit."""
    if bits == 32:
        mv = buf.view(torch.float32).view(2, elems)
        return mv[0], mv[1]
    nb = elems // BLOCKSIZE
    absmax = buf[: 8 * nb].view(torch.float32).view(2, nb)
    codes = buf[8 * nb :].view(2, elems)
    return absmax[0], absmax[1], codes[0], codes[1]


def _page_bytes(bits: int, elems: int) -> int:
    return 8 * elems if bits == 32 else 2 * elems + 8 * (elems // BLOCKSIZE)


class PagedAdamW:
    """AdamW with paged 32-bit or 8-bit state under a device-memory budget.

    The torch.optim.Optimizer interface (`param_groups`, `step`, `zero_grad`, `state_dict`,
    `load_state_dict`) without subclassing it: constructing a torch Optimizer imports torch._dynamo,
    sympy and triton (~150 MB resident), a tenth of a small model's whole training footprint.
    torch's LR schedulers insist on a real Optimizer; set `group["lr"]` instead (qconvert.finetune does).

    `budget_bytes=None` means whatever is free: on CUDA the free device memory at construction,
    on CPU unlimited (pages used in place, no copies). `page_bytes` is the size of one page (at
    most half the budget: pages shrink to fit a small one).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, optim_bits: int = 32, min_8bit_size: int = 4096,
                 page_bytes: int = 1 << 20, budget_bytes: int | None = None) -> None:  # fmt: skip
        if optim_bits not in (8, 32):
            raise QError(f"optimizer state bits must be 8 or 32, not {optim_bits}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise QError(f"invalid AdamW hyperparameters: lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups = _groups(params, self.defaults)
        self.optim_bits, self.min_8bit_size = optim_bits, min_8bit_size
        self._owners: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]  # hold the grads
        self._params = [_local(p) for p in self._owners]  # what the update writes
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise QError(f"PagedAdamW needs all parameters on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        for i, p in enumerate(self._params):
            if not p.is_contiguous():
                raise QError(f"parameter {i} of shape {list(p.shape)} is not contiguous")
        self._steps = [0] * len(self._params)
        # Decided on the whole parameter (a DTensor's numel is global), as bitsandbytes does: a sharded run keeps
        # the same precision per parameter whatever the number of ranks, so its checkpoints load on any count.
        self.param_bits = [8 if optim_bits == 8 and p.numel() >= min_8bit_size else 32 for p in self._owners]
        if budget_bytes is not None and page_bytes > budget_bytes // 2:
            page_bytes = max(budget_bytes // 2, 8 * BLOCKSIZE)  # two pages fit: one in use, one prefetched
        self._elems = {32: _round_down(page_bytes // 8), 8: _round_down(page_bytes * BLOCKSIZE // (2 * BLOCKSIZE + 8))}
        self.page_bytes = {bits: _page_bytes(bits, e) for bits, e in self._elems.items()}
        self._pages: list[_Page] = []
        self._layout()
        cuda = self.device.type == "cuda"
        if budget_bytes is None and cuda:
            budget_bytes = torch.cuda.mem_get_info(self.device)[0]
        self.budget_bytes = budget_bytes
        self._in_place = budget_bytes is None  # CPU without a budget: the host page is the working page
        if budget_bytes is not None and self._pages and budget_bytes < max(len(pg.host) for pg in self._pages):
            raise QError(f"optimizer budget {budget_bytes} bytes is smaller than one page "
                         f"({max(len(pg.host) for pg in self._pages)} bytes): raise the budget")  # fmt: skip
        self._resident: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._dirty: set[int] = set()
        self._ready: dict[int, torch.cuda.Event] = {}
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.page_transfers = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._owners:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # --- layout -------------------------------------------------------------------------------

    def _layout(self) -> None:
        """Pack each precision's parameters into a flat space (256-aligned) and cut it into pages."""
        pin = torch.cuda.is_available()
        for bits in (32, 8):
            elems = self._elems[bits]
            pos, segments = 0, []  # pos: next free element of the flat space
            for i, p in enumerate(self._params):
                if self.param_bits[i] != bits:
                    continue
                src = 0
                while src < p.numel():
                    page_end = (pos // elems + 1) * elems
                    n = min(p.numel() - src, page_end - pos)
                    segments.append((pos // elems, _Segment(i, src, pos % elems, n)))
                    src, pos = src + n, pos + n
                pos = -(-pos // BLOCKSIZE) * BLOCKSIZE
            n_pages = -(-pos // elems)
            for k in range(n_pages):
                segs = [s for page, s in segments if page == k]
                used = -(-max(s.dst + s.n for s in segs) // BLOCKSIZE) * BLOCKSIZE  # last page may be short
                host = torch.zeros(_page_bytes(bits, used), dtype=torch.uint8, pin_memory=pin)
                self._pages.append(_Page(bits, segs, host))

    @property
    def state_bytes(self) -> int:
        """Total optimizer state, all pages."""
        return sum(len(pg.host) for pg in self._pages)

    # --- paging -------------------------------------------------------------------------------

    def _fetch(self, k: int, prefetch: bool = False) -> torch.Tensor | None:
        """Make page k resident and return its device buffer (for a prefetch: start the copy, maybe)."""
        if self._in_place:
            return self._pages[k].host
        if k in self._resident:
            self._resident.move_to_end(k)
        else:
            size = len(self._pages[k].host)
            if prefetch and self.resident_bytes + size > self.budget_bytes:
                return None  # a prefetch never evicts: the budget is for pages in use first
            while self.resident_bytes + size > self.budget_bytes:
                self._evict_one()
            self._resident[k] = self._copy(self._pages[k].host, self.device, k)
            self.resident_bytes += size
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
            self.page_transfers += 1
        if not prefetch and k in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready.pop(k))
        return self._resident[k]

    def _copy(self, src: torch.Tensor, device: torch.device, k: int) -> torch.Tensor:
        if self._stream is None:
            return src.to(device, copy=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            out = src.to(device, non_blocking=True, copy=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        if device.type == "cuda":
            self._ready[k] = event
        return out

    def _evict_one(self) -> int:
        k, buf = self._resident.popitem(last=False)
        if k in self._dirty:
            self._write_back(k, buf)
        self.resident_bytes -= len(buf)
        return len(buf)

    def _write_back(self, k: int, buf: torch.Tensor) -> None:
        self._dirty.discard(k)
        if self._stream is None:
            self._pages[k].host.copy_(buf)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._pages[k].host.copy_(buf, non_blocking=True)
            buf.record_stream(self._stream)  # keep the device buffer alive until the copy is done

    def evict(self, nbytes: int | None = None) -> int:
        """Free resident pages, least recently used first, until `nbytes` are free (None: all). Returns bytes freed."""
        freed = 0
        while self._resident and (nbytes is None or freed < nbytes):
            freed += self._evict_one()
        return freed

    def flush(self) -> None:
        """Write every dirty resident page back to its host home (pages stay resident)."""
        for k, buf in self._resident.items():
            if k in self._dirty:
                self._write_back(k, buf)
        if self._stream is not None:
            self._stream.synchronize()

    # --- the update ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [p.grad is not None for p in self._owners]
        for i, p in enumerate(self._owners):
            if live[i]:
                if p.grad.is_sparse:
                    raise QError("PagedAdamW does not support sparse gradients")
                self._steps[i] += 1
        # Resident pages first: with a budget smaller than the state, they are the free hits.
        todo = [k for k, pg in enumerate(self._pages) if any(live[s.param] for s in pg.segments)]
        resident = set(self._resident)
        todo = [k for k in todo if k in resident] + [k for k in todo if k not in resident]
        for j, k in enumerate(todo):
            buf = self._fetch(k)
            if j + 1 < len(todo):
                self._fetch(todo[j + 1], prefetch=True)
            self._update_page(self._pages[k], buf, live)
            self._dirty.add(k)
        return loss

    def _update_page(self, page: _Page, buf: torch.Tensor, live: list[bool]) -> None:
        elems = len(buf) // 8 if page.bits == 32 else (len(buf) * BLOCKSIZE) // (2 * BLOCKSIZE + 8)
        views = _page_views(buf, page.bits, elems)
        for s in page.segments:
            if not live[s.param]:
                continue
            p = self._params[s.param]
            g = self.param_groups[self._group_of[s.param]]
            param = p.view(-1)[s.src : s.src + s.n]
            grad = _local(self._owners[s.param].grad).reshape(-1)[s.src : s.src + s.n]
            work = param if param.dtype == torch.float32 else param.float()
            if page.bits == 32:
                m, v = views[0][s.dst : s.dst + s.n], views[1][s.dst : s.dst + s.n]
                _adamw_32bit(work, grad.float(), m, v, g, self._steps[s.param])
            else:
                b0, b1 = s.dst // BLOCKSIZE, -(-(s.dst + s.n) // BLOCKSIZE)
                padded = (b1 - b0) * BLOCKSIZE
                a1, a2 = views[0][b0:b1], views[1][b0:b1]
                c1, c2 = views[2][s.dst : s.dst + padded], views[3][s.dst : s.dst + padded]
                m = dequantize_blockwise(c1, a1, _map(DYNAMIC_MAP_SIGNED, p.device))
                v = dequantize_blockwise(c2, a2, _map(DYNAMIC_MAP_UNSIGNED, p.device))
                _adamw_8bit(work, grad.float(), m[: s.n], v[: s.n], g, self._steps[s.param])
                m[s.n :], v[s.n :] = 0.0, 0.0  # the alignment tail belongs to no parameter: keep it zero
                for state, codes, absmax, code in ((m, c1, a1, DYNAMIC_MAP_SIGNED), (v, c2, a2, DYNAMIC_MAP_UNSIGNED)):
                    q, amax = quantize_blockwise(state, _map(code, p.device))
                    codes.copy_(q)
                    absmax.copy_(amax)
            if work is not param:
                param.copy_(work)

    # --- checkpoints (tensors only: safetensors, never pickle) --------------------------------

    def state_dict(self) -> dict:
        """{"state": {i: tensors and "step"}, "param_groups": [...]}: torch.optim's shape, tensors only."""
        self.flush()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, p in enumerate(self._params):
            if self.param_bits[i] == 32:
                state[i] = {"exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.zeros(p.shape)}
            else:
                nb = -(-p.numel() // BLOCKSIZE)
                state[i] = {"state1": torch.zeros(p.shape, dtype=torch.uint8), "absmax1": torch.zeros(nb),
                            "state2": torch.zeros(p.shape, dtype=torch.uint8), "absmax2": torch.zeros(nb)}  # fmt: skip
            state[i]["step"] = torch.tensor(float(self._steps[i]))
        for page in self._pages:
            self._copy_segments(page, state, to_page=False)
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in self.param_groups]
        for i, gi in enumerate(self._group_of):
            groups[gi]["params"].append(i)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise QError("optimizer state does not match the parameters being trained (different groups or counts)")
        for g, saved in zip(self.param_groups, groups):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        self.evict()  # resident copies are stale from here on
        self._dirty.clear()
        for i, p in enumerate(self._params):
            s = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            if s is None:
                raise QError(f"optimizer state has no entry for parameter {i}")
            want = ("exp_avg", "exp_avg_sq") if self.param_bits[i] == 32 else ("state1", "absmax1", "state2", "absmax2")
            for key in want:
                if key not in s:
                    raise QError(f"optimizer state of parameter {i} lacks {key!r} "
                                 f"({self.param_bits[i]}-bit state expected)")  # fmt: skip
                if key in ("exp_avg", "exp_avg_sq", "state1", "state2") and s[key].shape != p.shape:
                    raise QError(f"optimizer state {key!r} of parameter {i} has shape {list(s[key].shape)}, "
                                 f"expected {list(p.shape)}")  # fmt: skip
            self._steps[i] = int(float(s["step"]))
        for page in self._pages:
            self._copy_segments(page, state_dict["state"], to_page=True)

    def _copy_segments(self, page: _Page, state: dict, to_page: bool) -> None:
        elems = len(page.host) // 8 if page.bits == 32 else (len(page.host) * BLOCKSIZE) // (2 * BLOCKSIZE + 8)
        views = _page_views(page.host, page.bits, elems)
        for s in page.segments:
            st = state.get(s.param, state.get(str(s.param)))
            if page.bits == 32:
                pairs = [(views[0][s.dst : s.dst + s.n], st["exp_avg"]), (views[1][s.dst : s.dst + s.n], st["exp_avg_sq"])]
                spans = [(a, b.reshape(-1)[s.src : s.src + s.n]) for a, b in pairs]
            else:
                b0, src_b0 = s.dst // BLOCKSIZE, s.src // BLOCKSIZE
                nb = -(-s.n // BLOCKSIZE)
                spans = [(views[0][b0 : b0 + nb], st["absmax1"].reshape(-1)[src_b0 : src_b0 + nb]),
                         (views[1][b0 : b0 + nb], st["absmax2"].reshape(-1)[src_b0 : src_b0 + nb]),
                         (views[2][s.dst : s.dst + s.n], st["state1"].reshape(-1)[s.src : s.src + s.n]),
                         (views[3][s.dst : s.dst + s.n], st["state2"].reshape(-1)[s.src : s.src + s.n])]  # fmt: skip
            for page_view, full in spans:
                if to_page:
                    page_view.copy_(full)
                else:
                    full.copy_(page_view)

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (hyperparameters in its metadata)."""
        sd = self.state_dict()
        tensors = {f"state.{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        meta = {"param_groups": json.dumps(sd["param_groups"]), "optim_bits": str(self.optim_bits)}
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Read a state written by `save`; raises QError naming the file if it does not fit."""
        state = read_state_file(path, self.optim_bits)
        try:
            self.load_state_dict(state)
        except QError as e:
            raise QError(f"{path}: {e}") from None


def read_state_file(path: str | Path, optim_bits: int) -> dict:
    """The state dict `PagedAdamW.save` wrote to `path` (whole tensors), checked to hold `optim_bits`-bit state."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        groups = json.loads(meta["param_groups"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise QError(f"{path}: not an optimizer state file ({e})") from None
    if int(meta.get("optim_bits", 32)) != optim_bits:
        raise QError(f"{path}: holds {meta.get('optim_bits')}-bit optimizer state, this run uses {optim_bits}-bit")
    return {"state": state, "param_groups": groups}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP2 parameter or its gradient, qconvert/fsdp.py), sharing its
    storage; any other tensor as it is. So the step runs on the local shards only."""
    if not hasattr(t, "to_local"):
        return t
    with torch.no_grad():
        return t.to_local()


def _groups(params, defaults: dict) -> list[dict]:
    """torch.optim's param groups: an iterable of tensors, or of dicts with "params" and overrides."""
    params = list(params)
    if not params:
        raise QError("PagedAdamW got no parameters to optimize")
    raw = params if isinstance(params[0], dict) else [{"params": params}]
    groups = []
    for g in raw:
        group = {**defaults, **g, "params": list(g["params"])}
        group["betas"] = tuple(group["betas"])
        groups.append(group)
    return groups


def _adamw_32bit(param, grad, exp_avg, exp_avg_sq, group: dict, step: int) -> None:
    """torch.optim.AdamW's single-tensor update, op for op, so results agree to rounding."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if wd != 0:
        param.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _adamw_8bit(param, grad, state1, state2, group: dict, step: int) -> None:
    """bitsandbytes' 8-bit blockwise AdamW update on the dequantized state."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    state1.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    state2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    denom = (state2.sqrt() / correction2).add_(eps)
    if wd > 0.0:
        param.mul_(1.0 - lr * wd)
    param.addcdiv_(state1, denom, value=-lr / correction1)


_MAPS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _map(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    key = (id(code), device)
    if key not in _MAPS:
        _MAPS[key] = code.to(device)
    return _MAPS[key]


def _round_down(elems: int) -> int:
    if elems < BLOCKSIZE:
        raise QError(f"optimizer page too small: it must hold at least {BLOCKSIZE} elements")
    return elems // BLOCKSIZE * BLOCKSIZE
