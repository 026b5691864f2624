#!/usr/bin/env python3
"""The FUSE frontend against its ceilings, in one run: the exported raw image read directly, a trivial
pyfuse3 file serving the same bytes from memory (the FUSE + pyfuse3 ceiling, in this file:
``--serve-ram``), and ``obd mount`` of an uncompressed stack and of an lz4 ZFile stack of those bytes.

The data is bench_nbd.py's (SIZE MiB alternating 64 KiB of random bytes and of repetitive text,
committed plain and lz4). Warm cache: every file is read once before it is measured (the layer
files sit in the page cache, as does the raw image). Then, per file:

* sequential, buffered: the FUSE file's own page cache is dropped (``POSIX_FADV_DONTNEED``, the
  backing files stay cached) and the file read with 1 MiB ``pread``; the mount's ``read_ahead_kb``
  is 1024, so the kernel asks for 1 MiB at a time (median of 3);
* sequential, ``O_DIRECT``: 1 MiB reads, each one FUSE request (median of 3);
* 4 KiB random reads, ``O_DIRECT``, one thread (QD1) and 8 threads (QD8), COUNT reads each.

Everything is mounted at once and measured round-robin (``--rounds``, medians kept), so that a
busy moment of a shared machine hits the ceiling and obd alike.

The raw image is read buffered only (``O_DIRECT`` would measure the disk, not the warm cache).
Targets: obd ≥ 50 % of the in-memory pyfuse3 ceiling for uncompressed layers, warm cache (issue 5);
lz4 ZFile layers ≥ 60 % at QD1 (sequential and 4 KiB), and no worse a ratio at QD8 (issue 17).

Usage: .venv/bin/python bench/bench_fuse.py [--size 512] [--count 20000] [--threads 16] [--rounds 3]
[--dir DIR]
(as root)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import mmap
import os
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_nbd import build  # noqa: E402

from frontends.fuse import mount_entry  # noqa: E402

MiB = 1 << 20
OBD = [sys.executable, "-m", "obd"]


# --- the ceiling: a trivial pyfuse3 file served from memory ------------------------------------------
def serve_ram(image: str, mountpoint: str) -> None:
    """Mount one read-only file holding ``image``'s bytes (read into memory) and serve it until unmounted."""
    import pyfuse3
    import trio

    from frontends.fuse.fs import set_readahead

    mountpoint = os.path.realpath(mountpoint)  # not after mounting: a stat would wait for this process
    data = Path(image).read_bytes()
    view = memoryview(data)
    name = b"disk.img"

    class RamFS(pyfuse3.Operations):
        def attrs(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.entry_timeout = a.attr_timeout = 3600
            a.st_mode = (stat.S_IFDIR | 0o555) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
            a.st_size = 0 if inode == pyfuse3.ROOT_INODE else len(data)
            return a

        async def getattr(self, inode, ctx=None):
            return self.attrs(inode)

        async def lookup(self, parent, nm, ctx=None):
            if nm != name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.attrs(2)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start, token):
            if start == 0:
                pyfuse3.readdir_reply(token, name, self.attrs(2), 1)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh, off, size):
            return view[off : off + size]

    ready = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pyfuse3.main)
            await trio.sleep(0.2)  # INIT answered
            set_readahead(mountpoint, 1024)
            print("ready", flush=True)
            ready.set()

    pyfuse3.init(RamFS(), mountpoint, {"fsname=ramfs", "ro", "default_permissions"})
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


# --- measurements -------------------------------------------------------------------------------------
def aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)


def seq_buffered(path: Path) -> float:
    """MiB/s of one pass of 1 MiB preads after dropping the file's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if not str(path).endswith(".raw"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(MiB)
        t = time.perf_counter()
        pos = 0
        while pos < size:
            pos += os.preadv(fd, [buf], pos)
        return size / MiB / (time.perf_counter() - t)
    finally:
        os.close(fd)


def seq_direct(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        buf = aligned(MiB)
        t = time.perf_counter()
        pos = 0
        while pos < size:
            pos += os.preadv(fd, [buf], pos)
        return size / MiB / (time.perf_counter() - t)
    finally:
        os.close(fd)


def rand_4k(path: Path, count: int, threads: int, direct: bool) -> float:
    """IOPS of ``count`` 4 KiB reads at random aligned offsets from ``threads`` threads."""
    size = path.stat().st_size
    per = count // threads

    def worker(seed: int) -> None:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        buf = aligned(4096)
        rng = random.Random(seed)
        offs = [rng.randrange(size // 4096) * 4096 for _ in range(per)]
        start.wait()
        try:
            for off in offs:
                os.preadv(fd, [buf], off)
        finally:
            os.close(fd)

    start = threading.Barrier(threads + 1)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for th in ts:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in ts:
        th.join()
    return per * threads / (time.perf_counter() - t)


def measure_all(
    targets: dict[str, tuple[Path, bool]], count: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median of ``rounds`` of every measurement of every target (name → (file, is the raw image)).

    Round-robin: each round measures every target once, one kind of measurement after the other,
    so that a busy moment of a shared machine hits all of them alike.
    """
    for path, _ in targets.values():
        seq_buffered(path)  # warm: backing files (and the raw image) in the page cache
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
    kinds = (
        ("seq", lambda p, raw: seq_buffered(p)),
        ("seq_direct", lambda p, raw: None if raw else seq_direct(p)),
        ("rand1", lambda p, raw: rand_4k(p, count, 1, direct=not raw)),
        ("rand8", lambda p, raw: rand_4k(p, count, 8, direct=not raw)),
    )
    for _ in range(rounds):
        for key, fn in kinds:
            for name, (path, raw) in targets.items():
                v = fn(path, raw)
                if v is not None:
                    samples[name].setdefault(key, []).append(v)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


# --- servers -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ram_mount(raw: Path, mnt: Path):
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-ram", str(raw), str(mnt)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield mnt / "disk.img"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(30)


@contextlib.contextmanager
def obd_mount(layer: Path, mnt: Path, *extra: str):
    mnt.mkdir(exist_ok=True)
    subprocess.run([*OBD, "mount", str(layer), str(mnt), *extra], check=True, stderr=subprocess.DEVNULL)
    try:
        yield mnt / "disk.img"
    finally:
        if mount_entry(mnt) is not None:
            subprocess.run([*OBD, "umount", str(mnt)], check=True, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="MiB of data (default 512)")
    ap.add_argument("--count", type=int, default=20000, help="random reads per run (default 20000)")
    ap.add_argument("--threads", type=int, default=16, help="obd mount --threads (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of measurements; medians kept (default 3)")
    ap.add_argument("--dir", help="work directory (kept; default: a temporary one)")
    ap.add_argument("--serve-ram", nargs=2, metavar=("IMAGE", "MNT"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run in seconds: --size 16 --count 1000 --rounds 1"
    )
    args = ap.parse_args()
    if args.quick:  # the quick sizes become the defaults; flags given still win
        ap.set_defaults(size=16, count=1000, rounds=1)
        args = ap.parse_args()
    if args.serve_ram:
        serve_ram(*args.serve_ram)
        return 0
    if os.geteuid() != 0 or not shutil.which("fusermount3"):
        sys.exit("bench_fuse: run as root, with fuse3 installed")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = build(work, args.size)
        thr = ["--threads", str(args.threads)]
        with contextlib.ExitStack() as mounts:
            targets = {
                "raw file (page cache)": (files["raw"], True),
                "pyfuse3 RAM file (ceiling)": (
                    mounts.enter_context(ram_mount(files["raw"], work / "mnt-ram")),
                    False,
                ),
                "obd mount, uncompressed": (
                    mounts.enter_context(obd_mount(files["plain"], work / "mnt-plain", *thr)),
                    False,
                ),
                "obd mount, lz4 ZFile": (
                    mounts.enter_context(obd_mount(files["lz4"], work / "mnt-lz4", *thr)),
                    False,
                ),
            }
            results = measure_all(targets, args.count, args.rounds)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    ceiling = results["pyfuse3 RAM file (ceiling)"]
    print(f"\n{args.size} MiB, warm cache, {os.cpu_count()} CPUs; ratio = vs the pyfuse3 RAM ceiling")
    print(f"{'':28} {'seq buffered':>18} {'seq O_DIRECT 1M':>18} {'4K rand QD1':>16} {'4K rand QD8':>16}")
    for name, r in results.items():
        cells = []
        for key, unit, scale in (
            ("seq", "MiB/s", 1),
            ("seq_direct", "MiB/s", 1),
            ("rand1", "K", 1e-3),
            ("rand8", "K", 1e-3),
        ):
            if key not in r:
                cells.append(f"{'-':>18}" if key.startswith("seq") else f"{'-':>16}")
                continue
            ratio = f" {r[key] / ceiling[key]:4.0%}" if name.startswith("obd") else ""
            width = 18 if key.startswith("seq") else 16
            digits = 1 if scale != 1 else 0
            cells.append(f"{r[key] * scale:>{width - len(ratio) - len(unit) - 1}.{digits}f} {unit}{ratio}")
        print(f"{name:28} " + " ".join(cells))
    plain = results["obd mount, uncompressed"]
    worst = min(plain[k] / ceiling[k] for k in ceiling)
    print(f"\nuncompressed: worst ratio to the ceiling {worst:.0%} (target ≥ 50 %)")
    lz4 = results["obd mount, lz4 ZFile"]
    qd1 = min(lz4[k] / ceiling[k] for k in ("seq", "seq_direct", "rand1"))
    qd8 = lz4["rand8"] / ceiling["rand8"]
    print(
        f"lz4 ZFile: worst QD1 ratio {qd1:.0%} (target ≥ 60 %): {'met' if qd1 >= 0.6 else 'MISSED'}; "
        f"QD8 {qd8:.0%} vs QD1 4K {lz4['rand1'] / ceiling['rand1']:.0%} "
        f"({'scales' if qd8 >= 0.6 else 'MISSED: < 60 %'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
