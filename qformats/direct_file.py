"""A new file written front to back with O_DIRECT: the bytes go from an aligned staging buffer to the
disk, without passing through the page cache.

Why: writing a multi-GB shard through the page cache costs a page allocation per 4 KiB, and on some
machines (VMs whose guest memory is backed lazily) that is most of the time of `qconvert quantize`;
the output also evicts the source it is reading from the cache. Direct writes skip both. Where the
filesystem refuses O_DIRECT (tmpfs, some network filesystems: EINVAL at open or at the first write)
or `QFORMATS_DIRECT_IO=0`, the same bytes go through ordinary buffered writes.

The staging buffer (4 MiB, page-aligned) is copied into and written whole; the last partial block
is written padded to the alignment, then the file is truncated to its real length.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

_ALIGN = 4096  # a multiple of every block size O_DIRECT asks for here (512 or 4096)
_STAGE = 4 << 20  # staging buffer: large writes, a small footprint


def direct_io_enabled() -> bool:
    return os.environ.get("QFORMATS_DIRECT_IO", "1") != "0" and hasattr(os, "O_DIRECT")


class DirectFile:
    """`write(view)` appends bytes; `close()` flushes and sets the final length; `abort()` just closes."""

    def __init__(self, path: Path):
        self.path = path
        self.size = 0  # bytes appended so far
        self._flushed = 0  # bytes on disk (a multiple of _ALIGN while direct)
        self._fd = -1
        if direct_io_enabled():
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        self.direct = self._fd >= 0
        if not self.direct:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._stage = mmap.mmap(-1, _STAGE) if self.direct else None  # anonymous mmap: page-aligned
        self._staged = 0

    def write(self, view: memoryview) -> None:
        if not self.direct:
            self._write_all(view)
            self.size += view.nbytes
            return
        at = 0
        while at < view.nbytes:
            n = min(view.nbytes - at, _STAGE - self._staged)
            self._stage[self._staged : self._staged + n] = view[at : at + n]
            self._staged += n
            at += n
            if self._staged == _STAGE:
                self._flush(_STAGE)
        self.size += view.nbytes

    def close(self) -> None:
        """Write what is staged (padded to the alignment, then truncated away) and close."""
        try:
            if self._staged:  # only while direct: the tail, padded
                padded = -(-self._staged // _ALIGN) * _ALIGN
                self._stage[self._staged : padded] = bytes(padded - self._staged)
                self._flush(padded)
                os.ftruncate(self._fd, self.size)
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._stage is not None:
            self._stage.close()
            self._stage = None

    def _flush(self, n: int) -> None:
        view = memoryview(self._stage)[:n]
        try:
            self._write_all(view)
        except OSError as e:  # accepted at open, refused at write: the same bytes, buffered
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self._to_buffered()
            self._write_all(view)
        finally:
            view.release()
        self._flushed += n
        self._staged = 0

    def _to_buffered(self) -> None:
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        os.lseek(self._fd, self._flushed, os.SEEK_SET)
        self.direct = False

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            n = os.write(self._fd, view)
            view = view[n:]
