"""`qformats.direct_file.DirectFile`: a file written with O_DIRECT through an aligned staging buffer
holds exactly the bytes appended, whatever their sizes; where O_DIRECT is refused (at open or at the
first write) or switched off, the same bytes go through buffered writes."""

from __future__ import annotations

import errno
import fcntl
import itertools
import os

import pytest

from qformats import direct_file
from qformats.direct_file import _STAGE, DirectFile

SIZES = [0, 1, 4095, 4096, 4097, _STAGE - 1, _STAGE, _STAGE + 1, 3 * _STAGE + 12345]


def write_pieces(path, pieces):
    f = DirectFile(path)
    for p in pieces:
        f.write(memoryview(p))
    f.close()
    return f


@pytest.mark.parametrize("total", SIZES)
def test_bytes_are_exactly_what_was_appended(tmp_path, total):
    data = os.urandom(total)
    cuts = sorted({0, total, *(x % (total + 1) for x in (7, 4096, 100_000, _STAGE + 3))})
    pieces = [data[a:b] for a, b in itertools.pairwise(cuts)]
    f = write_pieces(tmp_path / "out.bin", pieces)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert f.size == total


def test_refused_at_open_or_at_write_falls_back_to_buffered(tmp_path, monkeypatch):
    data = os.urandom(2 * _STAGE + 999)
    real_open, real_write = os.open, os.write
    probe = DirectFile(tmp_path / "probe.bin")
    probe.abort()
    assert probe.direct, "this filesystem refuses O_DIRECT: the test needs one that takes it"

    def open_refusing_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_file.os, "open", open_refusing_direct)
    f = write_pieces(tmp_path / "a.bin", [data])
    assert not f.direct and (tmp_path / "a.bin").read_bytes() == data
    monkeypatch.undo()

    def write_refusing_direct(fd, view):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, view)

    monkeypatch.setattr(direct_file.os, "write", write_refusing_direct)
    f = write_pieces(tmp_path / "b.bin", [data[:10], data[10:]])
    assert not f.direct and (tmp_path / "b.bin").read_bytes() == data


def test_switched_off_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMATS_DIRECT_IO", "0")
    data = os.urandom(5000)
    f = write_pieces(tmp_path / "c.bin", [data])
    assert not f.direct and (tmp_path / "c.bin").read_bytes() == data
