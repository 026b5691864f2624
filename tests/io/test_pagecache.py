"""Page-cache reads that keep the GIL (obd.io.pagecache) and the sources that use them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from obd.cache.layout import preadv_full
from obd.io import pagecache
from obd.io.pagecache import MAX_HELD, read_cached
from obd.io.source import FileSource


def _file(tmp_path: Path, size: int = 1 << 20) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


def _evict(fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def test_cached_bytes_are_read_holding_the_gil(tmp_path: Path) -> None:
    assert pagecache._preadv2 is not None  # glibc ≥ 2.26: every Debian 12 system
    path, data = _file(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(4096)
        assert read_cached(fd, memoryview(buf), 8192) == 4096
        assert buf == data[8192 : 8192 + 4096]
        tail = bytearray(100)
        assert read_cached(fd, memoryview(tail), len(data) - 10) == 10  # short only at the end
        assert tail[:10] == data[-10:]
    finally:
        os.close(fd)


def test_what_it_declines_goes_to_the_ordinary_read(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    fd = os.open(path, os.O_RDWR)
    try:
        assert read_cached(fd, memoryview(bytes(16)), 0) == -1  # read-only buffer
        assert read_cached(fd, memoryview(bytearray(MAX_HELD + 1)), 0) == -1  # large: releases
        assert read_cached(fd, memoryview(bytearray(0)), 0) == -1
        assert read_cached(-1, memoryview(bytearray(16)), 0) == -1  # an error: the read reports it
        # Not in the page cache: refused (EAGAIN) rather than read from the disk holding the GIL.
        _evict(fd)
        buf = bytearray(4096)
        assert read_cached(fd, memoryview(buf), 1 << 19) == -1
        src = FileSource(path)
        try:
            _evict(src.fd)
            assert src.readinto_nowait(memoryview(buf), 1 << 19) is None
            assert src.readinto(memoryview(buf), 1 << 19) == 4096  # the releasing read
            assert buf == data[1 << 19 : (1 << 19) + 4096]
        finally:
            src.close()
    finally:
        os.close(fd)


def test_sources_read_the_same_bytes_from_many_threads(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    src = FileSource(path)
    fd = os.open(path, os.O_RDONLY)
    errors: list[str] = []
    readers = (src.readinto, src.readinto_nowait, lambda view, off: preadv_full(fd, [view], off))

    def work(k: int) -> None:
        buf = bytearray(4096)
        view = memoryview(buf)
        for i in range(200):
            off = ((k * 7919 + i * 104729) % 256) * 4096 + k
            want = data[off : off + 4096]
            for read in readers:
                buf[:] = bytes(len(buf))
                got = read(view, off)
                if got != len(want) or buf[: len(want)] != want:
                    errors.append(f"thread {k} read {i} by {read}: {got} bytes at {off}")

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        src.close()
        os.close(fd)
    assert not errors, errors[:3]
