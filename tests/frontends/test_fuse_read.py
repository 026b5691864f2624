"""The FUSE read path in one process, without a kernel: :meth:`DiskFS.read` on a real lz4 stack.

Both ways a read is served: on the trio thread (bytes at hand, decoded on the spot) and on a worker
thread, which a large read takes while more requests wait in ``/dev/fuse``. Here "requests wait" is
a real poll of a pipe holding a byte instead of the session's fd (there is no session). The mounted
file is read the same way, with real queue depths, by ``test_fuse_mount.py``
(``test_concurrent_reads_of_every_size``).
"""

from __future__ import annotations

import os
import random
import select
import threading
import time

import pytest
import trio

from fixtures import materialize, stack
from frontends.fuse.fs import MAX_REQUEST, OFFLOAD_MAX, OFFLOAD_MIN, DiskFS, session_fd
from obd.image.device import DeviceOptions, open_device

L012 = "L0L1L2/lz4"


@pytest.fixture
def disk():
    layers = [str(materialize(rel)) for rel in stack(L012)["layers"]]
    device = open_device(DeviceOptions(image=layers, readonly=True))
    try:
        yield DiskFS(device, threads=4)
    finally:
        device.close()


def expected(fs: DiskFS, off: int, n: int) -> bytes:
    buf = bytearray(min(n, fs.size - off))
    fs.device.read(memoryview(buf), off)
    return bytes(buf)


@pytest.mark.parametrize("waiting", [False, True], ids=["inline", "offloaded"])
def test_reads_of_every_size_match_the_device(disk, waiting):
    """Concurrent reads of 512 B to 1 MiB at any sector, both ways: the bytes of :meth:`Device.read`.

    The reply is copied before the task yields, as pyfuse3 does: the pooled buffer is reused then.
    """
    r, w = os.pipe()
    try:
        if waiting:
            os.write(w, b"x")
            disk._waiting = select.poll()
            disk._waiting.register(r, select.POLLIN)
        assert disk._requests_waiting() is waiting
        rng = random.Random(17)
        sizes = [512, 4096, 65536, OFFLOAD_MIN, MAX_REQUEST - 512, MAX_REQUEST]
        reqs = [(rng.randrange(disk.size // 512) * 512, size) for size in sizes for _ in range(6)]
        reqs.append((disk.size - 4096, MAX_REQUEST))  # cut at the end of the disk
        got: dict[tuple[int, int], bytes] = {}
        # Worker threads read through Device.read; the trio thread through _read_cached.
        read, lock, busy, peak = disk.device.read, threading.Lock(), [0], [0]

        def counted(view, off):
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            try:
                time.sleep(0.002)  # long enough for the other requests to arrive meanwhile
                return read(view, off)
            finally:
                with lock:
                    busy[0] -= 1

        disk.device.read = counted

        async def one(off: int, n: int) -> None:
            got[off, n] = bytes(await disk.read(2, off, n))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                for off, n in reqs:
                    nursery.start_soon(one, off, n)

        trio.run(main)
        del disk.device.read
        # at most OFFLOAD_MAX large reads in workers at once: the rest are decoded on the trio thread
        assert peak[0] == (min(OFFLOAD_MAX, 4) if waiting else 0)
        for off, n in reqs:
            assert got[off, n] == expected(disk, off, n), (off, n)
        assert trio.run(disk.read, 2, disk.size, 4096) == b""
    finally:
        os.close(r)
        os.close(w)


def test_session_fd_is_the_one_open_fuse_device():
    """Outside a FUSE server no fd is open on /dev/fuse: nothing to poll, reads stay on the trio thread."""
    assert session_fd() is None
