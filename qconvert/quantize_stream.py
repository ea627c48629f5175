"""How `qconvert quantize` moves bytes: a scan that makes each output shard's header known before
its data, then reading, quantizing and writing in a pipeline (a scan thread a shard ahead, a reader
thread, the kernel on the calling thread, a writer thread), every byte written once, straight into
the final shard file. QCONVERT_QUANTIZE_TIMES=1 prints the wall and CPU seconds of every stage.

Why a scan: every output tensor's size follows from its source shape but one, the quant state JSON
of a double-quantized weight, which prints `nested_offset` (the mean of the block absmax) with as
many digits as it needs. Its length, so every later offset in the shard's header, depends on the
data; writing the header first means knowing those means first. For each output shard the scan
reads its source tensors in chunks and computes only their block absmax (the C++ `block_absmax`,
memory-bound), and from it the means; it also refuses non-finite tensors, before anything is
written; the kernel reuses those offsets. The scan of shard k+1 runs while shard k is quantized
(so the pipeline never drains between shards), and the main pass reads the same bytes again, from
the page cache when a shard's source fits in memory. Output bytes are hashed as the writer writes
them; source files by a thread of their own (qformats.manifest.BackgroundSha256, started by the
caller, by the CLI before torch is imported), so the reader only reads.

Memory: the reader fills one of two buffers the size of the largest quantized source tensor (kept
tensors pass through in chunks of that size) and the kernel's outputs wait in a queue of two, so
memory holds about two tensors whatever the shard size.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from qformats.checkpoint import Checkpoint
from qformats.errors import QError
from qformats.nf4 import NESTED_BLOCKSIZE, NF4Weight, valid_blocksize
from qformats.safetensors_file import TensorInfo, add_header_entry, read_into
from qformats.sharded_writer import ShardedWriter, starts_new_shard
from qkernels import cpu_quantize
from qkernels.cpu_quantize import block_absmax, double_quant_offset
from qkernels.ops import quantize_nf4

_SCAN_CHUNK = 16 * 1024 * 1024  # bytes the scan reads at a time: a multiple of every block of any dtype
_CHECK_BLOCK = 4096  # block of the finiteness check on kept tensors (any size works; large is cheap)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class StageTimes:
    """Wall and thread-CPU seconds spent per stage of the pipeline, summed over its threads: where
    the time of a run goes (printed to stderr when QCONVERT_QUANTIZE_TIMES=1)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.enabled = os.environ.get("QCONVERT_QUANTIZE_TIMES") == "1"

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        w, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[stage] += time.perf_counter() - w
            self.cpu[stage] += time.thread_time() - c

    def report(self) -> None:
        if self.enabled:
            for stage in self.wall:
                print(f"quantize stage {stage:<24} wall {self.wall[stage]:7.2f} s  cpu {self.cpu[stage]:7.2f} s",
                      file=sys.stderr)  # fmt: skip


TIMES = StageTimes()


@dataclass
class Job:
    """One source tensor: what becomes of it ("nf4" or "kept") and, once scanned, its output tensors."""

    info: TensorInfo
    kind: str
    outputs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    offset: float | None = None  # the double-quant offset the scan found (the header prints it)

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.outputs.values())


@dataclass
class Settings:
    blocksize: int
    double_quant: bool
    device: torch.device
    allow_nonfinite: bool
    # The kernel's threads: torch's, less the reader's and the writer's (hashing keeps each busy).
    # Oversubscribed OpenMP threads spin, burning CPU time that the reader and writer need.
    kernel_threads: int = field(default_factory=lambda: max(1, torch.get_num_threads() - 2))


def planned_nf4_outputs(name: str, info: TensorInfo, s: Settings, offset: float | None) -> dict:
    """The (dtype, shape) of every stored tensor of weight `name`, in stored order: those of
    `NF4Weight.to_tensors` on a weight of this shape (meta tensors; `validate` checks the sizes)."""
    n_blocks = -(-info.numel // s.blocksize)

    def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    w = NF4Weight(packed=meta(-(-info.numel // 2), 1, dtype=torch.uint8),
                  absmax=meta(n_blocks, dtype=torch.uint8 if s.double_quant else torch.float32),
                  quant_map=meta(16, dtype=torch.float32), shape=info.shape, dtype=info.dtype,
                  blocksize=s.blocksize)  # fmt: skip
    if s.double_quant:
        w.nested_absmax = meta(-(-n_blocks // NESTED_BLOCKSIZE), dtype=torch.float32)
        w.nested_quant_map = meta(256, dtype=torch.float32)
        w.offset = offset
    w.validate(name)
    return {k: (t.dtype, tuple(t.shape)) for k, t in w.to_tensors(name).items()}


def _scan_chunks(f, info: TensorInfo, buf: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first element, 1-D chunk) of a tensor, read into `buf` a chunk at a time."""
    item = info.dtype.itemsize
    step = buf.numel() // item
    for first in range(0, info.numel, step):
        n = min(step, info.numel - first)
        view = buf[: n * item]
        read_into(f, memoryview(view.numpy()), info, info.start + first * item)
        yield first, view.view(info.dtype)


def scan(f, job: Job, s: Settings, buf: torch.Tensor) -> float | None:
    """Read one source tensor once: refuse it if non-finite (unless allowed); for a weight to
    quantize with double quantization, return the offset its quant state will store."""
    info, nf4 = job.info, job.kind == "nf4"
    fast = info.dtype in _FLOATS and cpu_quantize.fast_path_available(torch.empty(1, dtype=info.dtype))
    if nf4 and not (fast and s.device.type == "cpu" and valid_blocksize(s.blocksize)):
        # Off the C++ path the offset is the whole quantizer's (rare: no extension, or CUDA).
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        read_into(f, memoryview(buf.numpy()), info, info.start)
        weight = buf.view(info.dtype).view(info.shape)
        if not s.allow_nonfinite and not torch.isfinite(weight).all():
            raise _nonfinite(info)
        return quantize_nf4(weight.to(s.device), s.blocksize, s.double_quant).offset
    if not nf4 and (s.allow_nonfinite or not info.dtype.is_floating_point or not info.numel):
        return None
    if not fast:  # a kept float tensor of another dtype (F64, F8)
        for _, chunk in _scan_chunks(f, info, buf):
            if not torch.isfinite(chunk.float()).all():
                raise _nonfinite(info)
        return None
    blocksize = s.blocksize if nf4 else _CHECK_BLOCK
    absmax = torch.empty(-(-info.numel // blocksize), dtype=torch.float32)
    nonfinite = 0
    for first, chunk in _scan_chunks(f, info, buf):
        b0 = first // blocksize
        nonfinite += block_absmax(chunk, blocksize, absmax[b0 : b0 + -(-chunk.numel() // blocksize)],
                                  s.kernel_threads)  # fmt: skip
    if nonfinite and not s.allow_nonfinite:
        raise _nonfinite(info)
    return double_quant_offset(absmax) if nf4 and s.double_quant else None


def _nonfinite(info: TensorInfo) -> QError:
    return QError(f"{info.file}: tensor {info.name!r} has non-finite values (NaN or inf); "
                  "--allow-nonfinite quantizes it anyway")  # fmt: skip


def plan_shards(ckpt: Checkpoint, jobs: list[Job], s: Settings, shard_size: int) -> Iterator[list[Job]]:
    """Scan the jobs in order and yield them grouped in output shards (the `ShardedWriter` rule), each
    shard's jobs with their outputs known (the pipeline runs it in its own thread, a shard ahead)."""
    buf = torch.empty(_SCAN_CHUNK, dtype=torch.uint8)
    files = {shard.path: open(shard.path, "rb") for shard in ckpt.shards}  # noqa: SIM115 (closed below)
    try:
        shard: list[Job] = []
        size = 0
        for job in jobs:
            with TIMES("scan"):
                job.offset = scan(files[job.info.file], job, s, buf)
            if job.kind == "nf4":
                job.outputs = planned_nf4_outputs(job.info.name, job.info, s, job.offset)
            else:
                job.outputs = {job.info.name: (job.info.dtype, job.info.shape)}
            if starts_new_shard(size, job.output_bytes, shard_size):
                yield shard
                shard, size = [], 0
            shard.append(job)
            size += job.output_bytes
        if shard:
            yield shard
    finally:
        for f in files.values():
            f.close()


def header_entries(shard: list[Job]) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    at = 0
    for job in shard:
        for name, (dtype, shape) in job.outputs.items():
            at = add_header_entry(entries, name, dtype, shape, at)
    return entries


class _Failed(Exception):
    """Another stage of the pipeline failed; it raises the real error."""


class _Pipe:
    """Queues between the stages that give up when any stage has failed."""

    def __init__(self) -> None:
        self.failed = threading.Event()
        self.errors: list[BaseException] = []

    def put(self, q: queue.Queue, item) -> None:
        while True:
            if self.failed.is_set():
                raise _Failed
            try:
                return q.put(item, timeout=0.05)
            except queue.Full:
                pass

    def get(self, q: queue.Queue):
        while True:
            if self.failed.is_set():
                raise _Failed
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass

    def thread(self, fn: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except _Failed:
                pass
            except BaseException as e:  # noqa: BLE001 (handed to the calling thread, which raises it)
                self.errors.append(e)
                self.failed.set()

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t


def read_items(ckpt: Checkpoint, jobs: list[Job], take_buffer: Callable[[], torch.Tensor]
               ) -> Iterator[tuple[Job, torch.Tensor, torch.Tensor | None, bool]]:  # fmt: skip
    """Read every source tensor in file order into buffers from `take_buffer` (a kept tensor in
    chunks of a buffer's size). Yields `(job, bytes read, the buffer holding them, whether the
    job's last chunk)`."""
    by_file: dict = {}
    for job in jobs:
        by_file.setdefault(job.info.file, []).append(job)
    for shard in ckpt.shards:
        with open(shard.path, "rb") as f:
            for job in by_file.get(shard.path, []):
                info = job.info
                if not info.nbytes:
                    yield job, torch.empty(0, dtype=torch.uint8), None, True
                    continue
                at = info.start
                while at < info.end:
                    with TIMES("reader waits for a buffer"):
                        buf = take_buffer()
                    view = buf[: min(buf.numel(), info.end - at)]
                    if job.kind == "nf4" and view.numel() != info.nbytes:
                        raise QError(f"{info.name}: larger than the read buffer (internal error)")
                    with TIMES("read"):
                        read_into(f, memoryview(view.numpy()), info, at)
                    at += view.numel()
                    yield job, view, buf, at == info.end


def quantize_item(job: Job, data: torch.Tensor, s: Settings) -> list[torch.Tensor]:
    """The output buffers of one read item: a kept chunk as it is, a weight quantized (checked
    against the plan the header was written from)."""
    if job.kind == "kept":
        return [data]
    weight = data.view(job.info.dtype).view(job.info.shape)
    if s.device.type == "cpu":  # the offset the header was planned with, not computed again
        w = cpu_quantize.quantize_nf4_cpu(weight, s.blocksize, s.double_quant, s.kernel_threads, job.offset)
    else:
        w = quantize_nf4(weight.to(s.device, non_blocking=True), blocksize=s.blocksize,
                         double_quant=s.double_quant, threads=s.kernel_threads)  # fmt: skip
    tensors = w.to_tensors(job.info.name)
    got = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    if got != job.outputs:
        raise QError(f"{job.info.name}: quantized tensors {got} differ from the planned {job.outputs} (internal error)")
    return [t.cpu() for t in tensors.values()]


class WriteStage:
    """Writes items in order: ("open", header entries), ("data", buffers, source buffer to free or
    None), ("close",)."""

    def __init__(self, writer: ShardedWriter, free: queue.Queue):
        self.writer, self.free = writer, free
        self.stream = None

    def handle(self, item: tuple) -> None:
        if item[0] == "open":
            self.stream = self.writer.open_shard(item[1])
        elif item[0] == "data":
            self.stream.write(item[1])
            if item[2] is not None:
                self.free.put(item[2])
        else:
            self.writer.close_shard()


def run(ckpt: Checkpoint, jobs: list[Job], s: Settings, writer: ShardedWriter, progress: Callable[[int], None],
        pipelined: bool = True) -> None:  # fmt: skip
    """Quantize `jobs` into `writer`, shard by shard; `progress(n)` hears of n more source bytes done.

    `pipelined=False` runs the same stages one after the other on this thread (the reference the
    tests compare the pipeline with)."""
    pipe = _Pipe()
    free: queue.Queue = queue.Queue()  # the reader's two buffers, back when their bytes are done with
    largest = max([j.info.nbytes for j in jobs if j.kind == "nf4"] + [1])
    for _ in range(2):
        free.put(torch.empty(largest, dtype=torch.uint8))
    stage = WriteStage(writer, free)
    # The threads below iterate these two; the main loop reads `shards` and `items`, rebound to
    # their queues when pipelined (a thread closing over a rebound name would read its own queue).
    planned = plan_shards(ckpt, jobs, s, writer.shard_size)
    source = read_items(ckpt, jobs, lambda: pipe.get(free))
    shards, items, write = planned, source, stage.handle
    threads = []
    if pipelined:
        # The scan runs a shard ahead of the kernel: its pass over the next shard's source no
        # longer drains the pipeline between shards.
        scan_q, read_q, write_q = queue.Queue(maxsize=1), queue.Queue(maxsize=2), queue.Queue(maxsize=2)

        def scanner() -> None:
            for shard in planned:
                pipe.put(scan_q, shard)
            pipe.put(scan_q, None)

        def reader() -> None:
            for item in source:
                pipe.put(read_q, item)
            pipe.put(read_q, None)

        def writer_loop() -> None:
            while True:
                with TIMES("writer waits"):
                    item = pipe.get(write_q)
                if item is None:
                    return
                with TIMES("write + hash output"):
                    stage.handle(item)

        threads = [pipe.thread(scanner, "qconvert-scan"), pipe.thread(reader, "qconvert-read"),
                   pipe.thread(writer_loop, "qconvert-write")]  # fmt: skip
        shards = iter(lambda: pipe.get(scan_q), None)
        items = iter(lambda: pipe.get(read_q), None)
        write = lambda item: pipe.put(write_q, item)
    try:
        for shard in shards:
            write(("open", header_entries(shard)))
            for _ in shard:
                last = False
                while not last:
                    with TIMES("kernel waits for reads"):
                        job, data, buf, last = next(items)
                    with TIMES("kernel"):
                        buffers = quantize_item(job, data, s)
                    if job.kind == "nf4":  # the source bytes are done with
                        free.put(buf)
                        buf = None
                    with TIMES("kernel waits for writer"):
                        write(("data", buffers, buf))
                    progress(data.numel())
            write(("close",))
        if pipelined:
            write(None)
    except _Failed:
        pass  # a thread failed: its error is raised below
    except BaseException:
        pipe.failed.set()
        raise
    finally:
        for t in threads:
            t.join()
    TIMES.report()
    if pipe.errors:
        raise pipe.errors[0]
