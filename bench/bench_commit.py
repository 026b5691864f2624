#!/usr/bin/env python3
"""Commit throughput: a 256 MiB RW layer committed plain, ``-z`` (lz4) and ``-z --algorithm zstd``.

The input is the mixed data overlaybd's anchors were measured on (alternating 64 KiB chunks of
random bytes and repetitive text), written into an append-mode RW layer in 1 MiB writes. Measured
in one run, warm page cache, best of ``--runs``:

* ``obd commit`` plain / lz4 / zstd, MB/s of original data;
* baselines from the same run: a plain file copy of the same bytes (the I/O floor of a plain
  commit), and the bare codec compressing the same 4 KiB blocks in a tight loop (the codec ceiling
  of ``-z``);
* overlaybd's own figures on this kind of machine (``../shared/spec/ANCHORS.md``): commit 1636,
  commit -z lz4 1099, commit -z zstd 253 MB/s. Target: lz4 ≥ 50 % of 1099.

Usage: .venv/bin/python bench/bench_commit.py [--size MiB] [--runs N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lz4.block
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from obd.layer.tools import OutputOptions, commit_layer
from obd.lsmt.rw import create_rw, open_rw

MiB = 1 << 20
ANCHORS = {"plain": 1636, "lz4": 1099, "zstd": 253}


def mixed(n: int) -> bytes:
    out = bytearray()
    i = 0
    chunk = 64 * 1024
    while len(out) < n:
        if i % 2 == 0:
            out += hashlib.shake_256(b"rnd%d" % i).digest(chunk)
        else:
            line = b"%08d the quick brown fox jumps over the lazy dog\n" % i
            out += (line * (chunk // len(line) + 1))[:chunk]
        i += 1
    return bytes(out[:n])


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="MiB of data in the layer (default 256)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = args.size * MiB
    tmp = tempfile.mkdtemp(prefix="obd-bench-commit-")
    try:
        data = mixed(size)
        src = os.path.join(tmp, "src.bin")
        with open(src, "wb") as f:
            f.write(data)
        layer = create_rw(os.path.join(tmp, "data"), os.path.join(tmp, "index"), 1 << 30)
        view = memoryview(data)
        for off in range(0, size, MiB):
            layer.pwrite(view[off : off + MiB], off)
        layer.close()
        layer = open_rw(os.path.join(tmp, "data"), os.path.join(tmp, "index"), readonly=True)
        out = os.path.join(tmp, "out.commit")

        copy_s = best(lambda: shutil.copyfile(src, out), args.runs)
        blocks = [view[i : i + 4096] for i in range(0, size, 4096)]
        lz4_s = best(lambda: [lz4.block.compress(b, store_size=False) for b in blocks], 1)
        cctx = zstandard.ZstdCompressor(level=3)
        zstd_s = best(lambda: [cctx.compress(b) for b in blocks], 1)
        print(f"input: {args.size} MiB mixed data; MB/s = 10^6 bytes of original data per second")
        print(f"baseline file copy (shutil.copyfile):      {size / copy_s / 1e6:7.0f} MB/s")
        print(f"baseline bare lz4.block.compress, 4 KiB:   {size / lz4_s / 1e6:7.0f} MB/s")
        print(f"baseline bare zstd level 3, 4 KiB:         {size / zstd_s / 1e6:7.0f} MB/s")
        for name, opts, ceiling in (
            ("plain", OutputOptions(), copy_s),
            ("lz4", OutputOptions(compress="lz4"), lz4_s),
            ("zstd", OutputOptions(compress="zstd"), zstd_s),
        ):
            secs = best(lambda opts=opts: commit_layer(layer, out, options=opts), args.runs)
            rate = size / secs / 1e6
            anchor = ANCHORS[name]
            print(
                f"obd commit {name:5s}: {rate:7.0f} MB/s = {secs / ceiling:4.2f}x the {name} baseline time, "
                f"{rate / anchor:4.0%} of overlaybd-commit's {anchor} MB/s"
                + (f" (target >= 50%: {'OK' if rate >= 0.5 * anchor else 'MISSED'})" if name == "lz4" else "")
            )
        layer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
