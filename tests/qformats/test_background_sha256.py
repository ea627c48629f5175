"""`qformats.manifest.BackgroundSha256`: the source files' sha256 computed by a thread beside the
quantizer; equal to `sha256_file`, bounded ahead of the caller, refusing files changed meanwhile."""

from __future__ import annotations

import os
import time

import pytest

from qformats.errors import QError
from qformats.manifest import _HASH_CHUNK, BackgroundSha256, sha256_file


def files(tmp_path, sizes):
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    return paths


def test_digests_equal_sha256_file(tmp_path):
    """Empty, small and several-buffer files (one over four chunks: the thread's buffer), looked up
    by another spelling of the same path; a path it was not given answers None."""
    paths = files(tmp_path, [0, 1, 5 * _HASH_CHUNK + 3, 1000])
    hashes = BackgroundSha256(paths)
    for p in reversed(paths):
        assert hashes.digest(tmp_path / ".." / tmp_path.name / p.name) == sha256_file(p)
    assert hashes.digest(tmp_path / "other.bin") is None


def test_stays_within_its_window_until_the_caller_advances(tmp_path):
    """With a window of one byte the thread hashes one buffer and waits; `advance` lets it go on;
    `digest` lifts the window."""
    (a,) = files(tmp_path, [9 * _HASH_CHUNK])
    hashes = BackgroundSha256([a], window=1)
    time.sleep(0.3)
    assert hashes._hashed == 4 * _HASH_CHUNK  # one buffer, then it waits
    hashes.advance(4 * _HASH_CHUNK)
    deadline = time.monotonic() + 10
    while hashes._hashed < 8 * _HASH_CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hashes._hashed == 8 * _HASH_CHUNK
    assert hashes.digest(a) == sha256_file(a)


def test_a_file_changed_while_hashing_is_refused(tmp_path):
    a, b = files(tmp_path, [100, 100])
    hashes = BackgroundSha256([a, b])
    assert hashes.digest(a) == sha256_file(a)
    b.write_bytes(b"other bytes")  # after the thread started: its stamp changed
    with pytest.raises(QError, match="f1.bin: changed while it was being read"):
        hashes.digest(b)


def test_unreadable_and_stopped(tmp_path):
    (a,) = files(tmp_path, [10 * _HASH_CHUNK])
    hashes = BackgroundSha256([tmp_path / "missing.bin"])
    with pytest.raises(QError, match="missing.bin: unreadable"):
        hashes.digest(tmp_path / "missing.bin")
    hashes = BackgroundSha256([a], window=1)
    hashes.stop()
    with pytest.raises(QError, match="hashing was stopped"):
        hashes.digest(a)
