#!/usr/bin/env python3
"""The FUSE frontend against its ceilings, in one run: the exported raw image read directly, a trivial
pyfuse3 file serving the same bytes from memory (the FUSE + pyfuse3 ceiling, in this file:
``--serve-ram``), and ``obd mount`` of an uncompressed stack and of an lz4 ZFile stack of those bytes.

The data is bench_nbd.py's (SIZE MiB alternating 64 KiB of random bytes and of repetitive text,
committed plain and lz4). Warm cache: every file is read once before it is measured (the layer
files sit in the page cache, as does the raw image). Then, per file:

* sequential, buffered: the FUSE file's own page cache is dropped (fio ``--invalidate``, the
  backing files stay cached) and the whole file read with 1 MiB reads (``psync``); the mount's
  ``read_ahead_kb`` is 1024, so the kernel asks for 1 MiB at a time, several at once (read-ahead);
* sequential, ``O_DIRECT``, 1 MiB reads, each one FUSE request: the whole file with fio
  ``--ioengine=psync`` (QD1) and ``--ioengine=libaio --iodepth=4`` (QD4);
* 4 KiB random reads, ``O_DIRECT``: COUNT reads with fio ``psync`` (QD1) and ``libaio`` at
  ``--iodepth`` 4 and 16.

The raw image is read buffered only (``O_DIRECT`` would measure the disk, not the warm cache).
Everything is mounted at once and measured round-robin (``--rounds``, medians kept), so that a
busy moment of a shared machine hits the ceiling and obd alike. Beside the rates, the CPU time the
serving process used per request (from ``/proc/PID/stat``), which a loaded machine moves less.

Targets: obd ≥ 50 % of the in-memory pyfuse3 ceiling for uncompressed layers, warm cache (issue 5);
lz4 ZFile layers ≥ 60 % at QD1 (sequential and 4 KiB) and at every queue depth, scaling with it
(issue 17). The last lines say met or MISSED for each.

Usage: .venv/bin/python bench/bench_fuse.py [--size 512] [--count 20000] [--threads 16] [--rounds 3]
[--dir DIR] [--quick]
(as root, with fio)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_nbd import build  # noqa: E402

from frontends.fuse import mount_entry, server_pid  # noqa: E402

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
#: (key, column title, unit, scale, block size, fio engine, queue depth); ``seq`` is buffered
KINDS = (
    ("seq", "seq buffered", "MiB/s", 1.0, MiB, "psync", 1),
    ("seq_d1", "1M O_DIRECT QD1", "MiB/s", 1.0, MiB, "psync", 1),
    ("seq_d4", "1M O_DIRECT QD4", "MiB/s", 1.0, MiB, "libaio", 4),
    ("rand1", "4K QD1", "K", 1e-3, 4096, "psync", 1),
    ("rand4", "4K QD4", "K", 1e-3, 4096, "libaio", 4),
    ("rand16", "4K QD16", "K", 1e-3, 4096, "libaio", 16),
)


def seq_buffered(path: Path) -> None:
    """Read the file once with 1 MiB preads: its bytes (or the layer files behind it) in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(MiB)
        pos = 0
        while pos < size:
            pos += os.preadv(fd, [buf], pos)
    finally:
        os.close(fd)


def fio(
    path: Path, bs: int, engine: str, depth: int, count: int, direct: bool, drop: bool = False
) -> tuple[float, int]:
    """fio reading ``path``: MiB/s for 1 MiB sequential reads of the whole file, else IOPS of
    ``count`` random ``bs``-byte reads; and the number of reads made. ``drop``: drop the file's
    page cache first (``--invalidate``; for a FUSE file its backing files stay cached)."""
    seq = bs >= MiB
    cmd = [
        "fio",
        "--name=b",
        f"--filename={path}",
        "--readonly",
        f"--rw={'read' if seq else 'randread'}",
        f"--bs={bs}",
        f"--ioengine={engine}",
        f"--iodepth={depth}",
        f"--direct={int(direct)}",
        f"--invalidate={int(drop)}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]
    if not seq:
        cmd.append(f"--number_ios={count}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    if seq:
        return float(job["bw_bytes"]) / MiB, int(job["total_ios"])
    return float(job["iops"]), int(job["total_ios"])


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds the process ``pid`` has used (0 if unknown)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(path: Path, raw: bool, kind: tuple, count: int) -> tuple[float, int] | None:
    key, _, _, _, bs, engine, depth = kind
    if key == "seq":
        return fio(path, bs, engine, depth, count, direct=False, drop=not raw)
    if raw and (bs >= MiB or depth > 1):
        return None  # the page cache: only its sequential and 4 KiB QD1 figures are of interest
    return fio(path, bs, engine, depth, count, direct=not raw)


Target = tuple[Path, bool, int | None]  # file, is the raw image, pid of the serving process


def measure_all(targets: dict[str, Target], count: int, rounds: int) -> tuple[dict, dict]:
    """Medians of ``rounds`` of every measurement of every target, and the server's CPU µs per read.

    Round-robin: each round measures every target once, one kind of measurement after the other,
    so that a busy moment of a shared machine hits all of them alike.
    """
    for path, _, _ in targets.values():
        seq_buffered(path)  # warm: backing files (and the raw image) in the page cache
    rates: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
    # CPU seconds and reads, summed over the rounds (/proc counts in clock ticks: sums are finer)
    cpu: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
    for _ in range(rounds):
        for kind in KINDS:
            for name, (path, raw, pid) in targets.items():
                c0 = cpu_seconds(pid)
                got = measure(path, raw, kind, count)
                if got is None:
                    continue
                rates[name].setdefault(kind[0], []).append(got[0])
                if pid is not None:
                    total = cpu[name].setdefault(kind[0], [0.0, 0.0])
                    total[0] += cpu_seconds(pid) - c0
                    total[1] += got[1]
    med = statistics.median
    return (
        {n: {k: med(v) for k, v in r.items()} for n, r in rates.items()},
        {n: {k: s / reads * 1e6 for k, (s, reads) in r.items() if reads} for n, r in cpu.items()},
    )


# --- servers -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ram_mount(raw: Path, mnt: Path):
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-ram", str(raw), str(mnt)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield mnt / "disk.img", proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(30)


@contextlib.contextmanager
def obd_mount(layer: Path, mnt: Path, *extra: str):
    mnt.mkdir(exist_ok=True)
    subprocess.run([*OBD, "mount", str(layer), str(mnt), *extra], check=True, stderr=subprocess.DEVNULL)
    try:
        yield mnt / "disk.img", server_pid(mnt)
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
    if os.geteuid() != 0 or not shutil.which("fusermount3") or not shutil.which("fio"):
        sys.exit("bench_fuse: run as root, with fuse3 and fio installed")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = build(work, args.size)
        thr = ["--threads", str(args.threads)]
        with contextlib.ExitStack() as mounts:

            def served(ctx: contextlib.AbstractContextManager[tuple[Path, int | None]]) -> Target:
                path, pid = mounts.enter_context(ctx)
                return path, False, pid

            targets: dict[str, Target] = {
                "raw file (page cache)": (files["raw"], True, None),
                "pyfuse3 RAM file (ceiling)": served(ram_mount(files["raw"], work / "mnt-ram")),
                "obd mount, uncompressed": served(obd_mount(files["plain"], work / "mnt-plain", *thr)),
                "obd mount, lz4 ZFile": served(obd_mount(files["lz4"], work / "mnt-lz4", *thr)),
            }
            results, cpu = measure_all(targets, args.count, args.rounds)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    report(results, cpu, args.size)
    return 0


def report(results: dict[str, dict[str, float]], cpu: dict[str, dict[str, float]], size: int) -> None:
    """Print the table, the server CPU per read, and met/MISSED for each target."""
    ceiling = results["pyfuse3 RAM file (ceiling)"]
    width = 17
    print(f"\n{size} MiB, warm cache, {os.cpu_count()} CPUs; ratio = vs the pyfuse3 RAM ceiling")
    print(f"{'':28} " + " ".join(f"{title:>{width}}" for _, title, *_ in KINDS))
    for name, r in results.items():
        cells = []
        for key, _, unit, scale, *_ in KINDS:
            if key not in r:
                cells.append(f"{'-':>{width}}")
                continue
            ratio = f" {r[key] / ceiling[key]:4.0%}" if name.startswith("obd") else ""
            digits = 1 if scale != 1 else 0
            cells.append(f"{r[key] * scale:>{width - len(ratio) - len(unit) - 1}.{digits}f} {unit}{ratio}")
        print(f"{name:28} " + " ".join(cells))
    print("\nserver CPU per read (µs; a loaded machine moves it less than the rates):")
    for name, c in cpu.items():
        if c:
            print(
                f"{name:28} "
                + " ".join(f"{c[k]:>{width}.1f}" if k in c else f"{'-':>{width}}" for k, *_ in KINDS)
            )

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    plain = results["obd mount, uncompressed"]
    worst = min(plain[k] / ceiling[k] for k in ceiling)
    print(f"\nuncompressed: worst ratio to the ceiling {worst:.0%} (target ≥ 50 %): {verdict(worst >= 0.5)}")
    lz4 = results["obd mount, lz4 ZFile"]
    ratios = {k: lz4[k] / ceiling[k] for k in ceiling}
    qd1 = min(ratios[k] for k in ("seq", "seq_d1", "rand1"))
    print(
        f"lz4 ZFile, QD1: seq buffered {ratios['seq']:.0%}, 1M O_DIRECT {ratios['seq_d1']:.0%}, "
        f"4K {ratios['rand1']:.0%}; worst {qd1:.0%} (target ≥ 60 %): {verdict(qd1 >= 0.6)}"
    )
    deep = min(ratios[k] for k in ("seq_d4", "rand4", "rand16"))
    print(
        f"lz4 ZFile, QD>1: 1M QD4 {ratios['seq_d4']:.0%}, 4K QD4 {ratios['rand4']:.0%}, "
        f"4K QD16 {ratios['rand16']:.0%}; worst {deep:.0%} (target ≥ 60 %, the ratio holding as "
        f"the depth grows): {verdict(deep >= 0.6)}"
    )
    print(
        f"scaling, 4K QD1 → QD16: obd lz4 ×{lz4['rand16'] / lz4['rand1']:.2f}, "
        f"ceiling ×{ceiling['rand16'] / ceiling['rand1']:.2f}; 1M QD1 → QD4: "
        f"obd lz4 ×{lz4['seq_d4'] / lz4['seq_d1']:.2f}, ceiling ×{ceiling['seq_d4'] / ceiling['seq_d1']:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
