"""The NF4 + double-quantization codec: the torch reference every other part of the toolkit calls.

Semantics are those of bitsandbytes (`quantize_4bit(quant_type="nf4", compress_statistics=True)`),
checked byte for byte in tests/qformats/test_nf4.py:
- blocks of `blocksize` consecutive elements of the row-major flattened weight, fp32 absmax per
  block over real elements only (a partial last block is allowed);
- code index = number of fp32 midpoints strictly below `w * (1/absmax)`;
- element 2k in the high nibble of byte k, packed as uint8 `[ceil(numel/2), 1]`;
- double quantization: `offset = mean(absmax)`, `absmax - offset` in blocks of 256 coded with
  the signed 8-bit dynamic map (nearest value), one fp32 `nested_absmax` per 256 blocks.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from qformats.errors import QError

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

# Midpoints between neighbouring codes, computed in fp32 as bitsandbytes does.
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


class _CellCodebook:
    """`bucketize(nan_to_num(x), midpoints)` for fp32 `x`, by table lookup instead of a binary search.

    A cell is the set of fp32 values sharing their top 16 bits (a bf16 truncation): an interval of
    reals, since within one sign and exponent the value is monotonic in the low bits. bucketize is
    monotonic, so when a cell's two end values get the same index every value inside does; when
    they differ by one, exactly one midpoint lies inside and `x > midpoint` decides (a value equal to
    it takes the lower index, as bucketize does). Building the tables checks that no cell holds two midpoints
    (true for the NF4 code and the 8-bit dynamic map). Exponent-255 cells: cell 0x7F80 / 0xFF80 hold
    +inf / -inf (the codes of +-FLT_MAX, as nan_to_num makes them; the signalling NaNs that share
    these cells never come out of arithmetic, which always sets the quiet bit); the others are NaN,
    coded as 0.0. tests/qconvert/test_quantize.py checks every value of every two-code cell against bucketize.
    """

    def __init__(self, midpoints: torch.Tensor):
        self.midpoints = midpoints
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @functools.cached_property
    def _cpu_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, threshold), built on first use: only the torch reference needs them, and building
        both codebooks would cost every command's start a few tenths of a second."""
        midpoints = self.midpoints
        cells = torch.arange(1 << 16, dtype=torch.int32)
        lo = (cells << 16).view(torch.float32)
        hi = ((cells << 16) | 0xFFFF).view(torch.float32)
        special = ((cells >> 7) & 0xFF) == 0xFF  # exponent all ones: inf or NaN
        hi = torch.where(special, lo, hi)  # +-inf and NaN cells: one code for the whole cell
        a = torch.bucketize(torch.nan_to_num(lo), midpoints)
        b = torch.bucketize(torch.nan_to_num(hi), midpoints)
        assert (a - b).abs().max() <= 1, "a cell holds two midpoints"
        low = torch.minimum(a, b)
        inside = midpoints[low.clamp(max=midpoints.numel() - 1)]
        base = low.to(torch.uint8)  # the index of the cell's lower part
        threshold = torch.where(a != b, inside, torch.tensor(float("inf")))  # above it: base + 1
        return base, threshold

    @property
    def base(self) -> torch.Tensor:
        return self._cpu_tables[0]

    @property
    def threshold(self) -> torch.Tensor:
        return self._cpu_tables[1]

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.base.to(device), self.threshold.to(device))
        return self._on[device]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 index per element of the contiguous fp32 tensor `x` (flattened)."""
        base, threshold = self.tables(x.device)
        x = x.reshape(-1)
        if x.device.type == "cpu":  # the high halves of little-endian fp32, widened: one op
            cell = x.view(torch.uint16)[1::2].to(torch.int32)
        else:
            cell = x.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
        codes = base.index_select(0, cell)
        codes += (x > threshold.index_select(0, cell)).view(torch.uint8)  # bool is one byte, 0 or 1
        return codes


_NF4_CELLS = _CellCodebook(_NF4_MIDPOINTS)

# How the quantizer spreads work over CPU threads. It is ~12 short ops per chunk of ~1M elements
# (temporaries that fit in cache). ATen splits each op over its threads and waits for all of them
# after every op; on a busy machine each wait costs a descheduled thread's time slice (many times the
# work itself on small linears; bench/RESULTS.md). So chunks go to a pool of
# `torch.get_num_threads()` Python threads whose ATen ops run single-threaded: each worker sets its
# own thread count to 1 (OpenMP keeps it per thread), then the process-wide setting is restored.
# One thread: chunks run inline. A GPU takes the tensor as one chunk.
_CHUNK_ELEMENTS = 1 << 20
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool): a forked child makes its own


def _single_threaded_worker(started: threading.Barrier) -> None:
    torch.get_num_threads()  # ATen sets a thread up on its first call; do it now so that 1 sticks
    torch.set_num_threads(1)
    started.wait()


def _worker_pool(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[:2] != (os.getpid(), threads):
        started = threading.Barrier(threads + 1)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="qformats-nf4", initializer=_single_threaded_worker,
                                  initargs=(started,))  # fmt: skip
        for _ in range(threads):
            pool.submit(int)  # every submit while the others wait in the barrier starts one more worker
        started.wait()
        torch.set_num_threads(threads)  # the setter is also process-wide (threads started later): restore it
        _pool = (os.getpid(), threads, pool)
    return _pool[2]


def _for_chunks(fn, n: int, unit: int, device: torch.device) -> None:
    """Call `fn(start, end)` over `[0, n)` in chunks of whole units of `unit` elements."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    step = max(1, min(_CHUNK_ELEMENTS // unit, -(-n // threads))) if device.type == "cpu" else max(n, 1)
    starts = range(0, n, step)
    if threads == 1 or len(starts) <= 1:
        for start in starts:
            fn(start, min(start + step, n))
        return
    for _ in _worker_pool(threads).map(lambda start: fn(start, min(start + step, n)), starts):
        pass


def _stored_map(file: str) -> torch.Tensor:
    """A 256-entry 8-bit dynamic map of bitsandbytes (`create_dynamic_map`) from its exact fp32 words,
    one hex word each in `file` next to this module; tests check that it equals bitsandbytes' own."""
    words = b"".join(int(w, 16).to_bytes(4, "little") for w in Path(__file__).with_name(file).read_text().split())
    return torch.frombuffer(bytearray(words), dtype=torch.int32).view(torch.float32).clone()


# The signed map codes the double-quantized scales (docs/format.md records its sha256, e732639a...);
# both maps code the 8-bit optimizer state (qconvert/paged_adamw.py: first and second moments).
DYNAMIC_MAP_SIGNED = _stored_map("dynamic_map_signed.hex")
DYNAMIC_MAP_UNSIGNED = _stored_map("dynamic_map_unsigned.hex")
_DYNAMIC_CELLS = _CellCodebook((DYNAMIC_MAP_SIGNED[:-1] + DYNAMIC_MAP_SIGNED[1:]) / 2)

SUPPORTED_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NESTED_BLOCKSIZE = 256

# The safetensors names of a 4-bit weight `P.weight`: the packed bytes under `P.weight` itself, the
# rest under `P.weight` + a suffix; the quant state (a JSON blob) is what marks a weight as NF4.
QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
FP4_STATE_SUFFIX = ".quant_state.bitsandbytes__fp4"
NF4_PART_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", QUANT_STATE_SUFFIX)


def read_quant_state(blob: torch.Tensor) -> dict:
    """The quant-state JSON stored as a uint8 tensor; ValueError when it is not JSON."""
    return json.loads(bytes(blob.to(torch.uint8).numpy().tobytes()))


def valid_blocksize(blocksize: int) -> bool:
    """The NF4 blocksizes bitsandbytes writes and every kernel here takes: a power of two from 32 to 4096
    (so a packed byte never straddles two blocks)."""
    return 32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0


@dataclass
class NF4Weight:
    """A quantized weight exactly as stored on disk (bitsandbytes' `Params4bit` layout)."""

    packed: torch.Tensor  # uint8 [ceil(numel/2), 1]
    absmax: torch.Tensor  # uint8 codes (double-quant) or fp32 per block
    quant_map: torch.Tensor  # fp32 [16]
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the weight dequantizes to
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # fp32 per 256 blocks (double-quant only)
    nested_quant_map: torch.Tensor | None = None  # fp32 [256]
    offset: float | None = None  # mean of the first-level absmax
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def quant_state_json(self) -> dict:
        """The JSON stored under `P.weight` + QUANT_STATE_SUFFIX."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                 "shape": list(self.shape)}  # fmt: skip
        if self.double_quant:
            state.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                         nested_offset=float(self.offset))  # fmt: skip
        return state

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The safetensors entries for weight `prefix` (e.g. `model.layers.0.mlp.up_proj.weight`)."""
        out = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.quant_map,
        }
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_quant_map
        blob = json.dumps(self.quant_state_json()).encode()
        out[prefix + QUANT_STATE_SUFFIX] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor]) -> NF4Weight:
        """Rebuild a weight from its safetensors entries; raises QError naming the missing key."""

        def get(key: str) -> torch.Tensor:
            if key not in tensors:
                raise QError(f"{prefix}: missing tensor {key!r} of a 4-bit weight")
            return tensors[key]

        state_key = prefix + QUANT_STATE_SUFFIX
        if state_key not in tensors:
            if prefix + FP4_STATE_SUFFIX in tensors:
                raise QError(f"{prefix}: FP4 weights are not supported, only NF4")
            get(state_key)
        try:
            state = read_quant_state(tensors[state_key])
            shape = tuple(int(s) for s in state["shape"])
            blocksize = int(state["blocksize"])
            dtype = _dtype_from_name(state["dtype"])
        except (ValueError, KeyError, TypeError) as e:
            raise QError(f"{state_key}: unreadable quant state ({e})") from None
        if state.get("quant_type", "nf4") != "nf4":
            raise QError(f"{state_key}: quant_type {state.get('quant_type')!r} is not supported, only nf4")
        w = cls(packed=get(prefix), absmax=get(f"{prefix}.absmax"), quant_map=get(f"{prefix}.quant_map").float(),
                shape=shape, dtype=dtype, blocksize=blocksize)  # fmt: skip
        if "nested_offset" in state:
            w.nested_absmax = get(f"{prefix}.nested_absmax").float()
            w.nested_quant_map = get(f"{prefix}.nested_quant_map").float()
            w.offset = float(state["nested_offset"])
            w.nested_blocksize = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
        w.validate(prefix)
        return w

    def validate(self, name: str) -> None:
        """Check that the stored sizes agree with the shape; a lying file fails here, not later."""
        n_blocks = -(-self.numel // self.blocksize)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != -(-self.numel // 2):
            raise QError(f"{name}: packed weight has {self.packed.numel()} bytes of {self.packed.dtype}, "
                         f"expected {-(-self.numel // 2)} uint8 for shape {list(self.shape)}")  # fmt: skip
        if self.absmax.numel() != n_blocks:
            raise QError(f"{name}: absmax has {self.absmax.numel()} entries, expected {n_blocks}")
        if self.quant_map.numel() != 16:
            raise QError(f"{name}: quant_map has {self.quant_map.numel()} entries, expected 16")
        if self.double_quant:
            n_nested = -(-n_blocks // self.nested_blocksize)
            if self.absmax.dtype != torch.uint8 or self.nested_absmax.numel() != n_nested:
                raise QError(f"{name}: nested_absmax has {self.nested_absmax.numel()} entries, expected {n_nested}")
            if self.nested_quant_map.numel() != 256:
                raise QError(f"{name}: nested_quant_map has {self.nested_quant_map.numel()} entries, expected 256")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if dtype not in SUPPORTED_INPUT_DTYPES:
        raise ValueError(f"dtype {name!r}")
    return dtype


def check_blocksize(blocksize: int) -> None:
    if not valid_blocksize(blocksize):
        raise QError(f"blocksize {blocksize} is not supported: use a power of two from 32 to 4096")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 absmax of each block; the partial last block counts real elements only."""
    n = flat.numel()
    n_full = n // blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    if n_full:
        absmax[:n_full] = flat[: n_full * blocksize].view(n_full, blocksize).abs().amax(dim=1).float()
    if n % blocksize:
        absmax[n_full] = flat[n_full * blocksize :].abs().amax().float()
    return absmax


def _pad_to_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)) if pad else flat


def quantize_absmax_dq(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """Double quantization of fp32 block scales: (uint8 codes, fp32 nested_absmax, offset).

    The 8-bit code is the exact nearest value of the dynamic map (ties take the lower index);
    bitsandbytes' CPU build approximates this search and differs by one code on ~0.2%.
    """
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    blocks = _pad_to_blocks(centered, nested_blocksize).view(-1, nested_blocksize)
    nested_absmax = _blockwise_absmax(centered, nested_blocksize)
    recip = 1.0 / nested_absmax
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=absmax.device)

    def chunk(start: int, end: int) -> None:
        scaled = blocks[start:end] * recip[start:end].unsqueeze(1)  # all-equal block: 0 * inf = NaN, coded as 0
        # Nearest value = number of midpoints strictly below the value (a tie takes the lower index).
        codes[start:end] = _DYNAMIC_CELLS.codes(scaled).view(-1, nested_blocksize)

    _for_chunks(chunk, blocks.shape[0], nested_blocksize, absmax.device)
    return codes.view(-1)[:n], nested_absmax, float(offset)


def dequantize_absmax(w: NF4Weight) -> torch.Tensor:
    """The fp32 per-block absmax of a weight, undoing double quantization if present."""
    if not w.double_quant:
        return w.absmax.float()
    idx = torch.arange(w.absmax.numel(), device=w.absmax.device) // w.nested_blocksize
    scaled = w.nested_quant_map[w.absmax.long()] * w.nested_absmax[idx]
    return scaled + torch.tensor(w.offset, dtype=torch.float32)


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> NF4Weight:
    """Quantize a fp16/bf16/fp32 tensor of any shape and numel to NF4 (+ double-quantized scales)."""
    check_blocksize(blocksize)
    if weight.dtype not in SUPPORTED_INPUT_DTYPES:
        raise QError(f"cannot quantize a {weight.dtype} tensor: NF4 takes float16, bfloat16 or float32")
    if weight.numel() == 0:
        raise QError("cannot quantize an empty tensor")
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    n_full = n // blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=flat.device)
    # Whole blocks in chunks; blocksize is even, so each chunk fills whole bytes.
    blocks = flat[: n_full * blocksize].view(n_full, blocksize)
    half = blocksize // 2

    def chunk(start: int, end: int) -> None:
        _quantize_blocks(blocks[start:end], absmax[start:end], packed[start * half : end * half])

    _for_chunks(chunk, n_full, blocksize, flat.device)
    if n % blocksize:
        # The partial last block, padded with zeros: they leave its absmax alone and take code 7,
        # which is also what the unused low nibble of an odd-length weight holds (as in bitsandbytes).
        tail = flat.new_zeros(blocksize)
        tail[: n - n_full * blocksize] = flat[n_full * blocksize :]
        tail_packed = packed.new_empty(half)
        _quantize_blocks(tail.view(1, blocksize), absmax[n_full:], tail_packed)
        packed[n_full * half :] = tail_packed[: packed.numel() - n_full * half]
    packed = packed.unsqueeze(1)
    w = NF4Weight(packed=packed, absmax=absmax, quant_map=NF4_CODE.to(flat.device).clone(),
                  shape=tuple(weight.shape), dtype=weight.dtype, blocksize=blocksize)  # fmt: skip
    if double_quant:
        w.absmax, w.nested_absmax, w.offset = quantize_absmax_dq(absmax)
        w.nested_quant_map = DYNAMIC_MAP_SIGNED.to(flat.device).clone()
    return w


# abs() of a float is its bit pattern with the sign cleared, and non-negative floats order like
# their patterns as integers (NaN patterns above inf), so the block absmax is an integer max.
_MAGNITUDE_BITS = {torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF),
                   torch.float32: (torch.int32, 0x7FFFFFFF)}  # fmt: skip


def _quantize_blocks(blocks: torch.Tensor, absmax_out: torch.Tensor, packed_out: torch.Tensor) -> None:
    """NF4 codes of whole blocks `[rows, blocksize]`, packed two per byte into `packed_out`."""
    int_dtype, magnitude = _MAGNITUDE_BITS[blocks.dtype]
    # Exact, and faster than a float reduction on fp16/bf16; widened to fp32 by the copy.
    absmax_out.copy_((blocks.view(int_dtype) & magnitude).amax(dim=1).view(blocks.dtype))
    # Multiply by the fp32 reciprocal, as bitsandbytes' `1.0 / absmax` does (torch computes that as
    # reciprocal() * 1.0; a division would round differently); the source dtype is widened to fp32 by
    # type promotion first, exactly like `.float()`.
    normed = blocks * torch.reciprocal(absmax_out).unsqueeze(1)
    codes = _NF4_CELLS.codes(normed)
    torch.add(codes[1::2], codes[0::2], alpha=16, out=packed_out)  # element 2k in the high nibble of byte k


def unpack_nf4_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 code indices 0..15, one per element, from the packed nibbles."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight: `quant_map[code] * absmax[block]`, cast to `dtype` (default: w.dtype)."""
    n = w.numel
    absmax = dequantize_absmax(w)
    values = w.quant_map[unpack_nf4_codes(w.packed, n).long()]
    values = _pad_to_blocks(values, w.blocksize).view(-1, w.blocksize) * absmax.unsqueeze(1)
    return values.reshape(-1)[:n].view(w.shape).to(dtype or w.dtype)
