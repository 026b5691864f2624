#!/usr/bin/env python3
"""What the seek points of a plain image's layers cost: index size and random 4 KiB read time.

A layer tar is made from Python's own library (``/usr/lib/python3.*``, up to ``--mb`` MB of it) and
compressed as a real image layer would be: gzip, indexed with the ``ddgzidx`` gzip index at several
spans (turboOCI's is 1 MiB), and zstd in frames of several sizes (zstd:chunked style), indexed with
obd's frame index. For each, ``--reads`` random 4 KiB reads of the tar stream are timed, cold (a new
reader per read, so nothing decoded earlier helps), against the baseline of the same reads from
the uncompressed tar in the same run. Local files: this is the CPU cost of a seek point, the
network cost is about half a span (gzip) or one frame (zstd) of compressed bytes per cold read.

Usage: .venv/bin/python bench/plain_index.py [--mb 64] [--reads 200]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import zstandard  # noqa: E402

from obd.formats.gzindex import GzipIndexedSource, build_gzip_index  # noqa: E402
from obd.io.source import FileSource  # noqa: E402
from obd.turbo.zstd import ZstdFramedSource, scan_frames  # noqa: E402

BLOCK = 4096


def make_tar(limit: int) -> bytes:
    """A tar of Python library files, up to ``limit`` bytes of file data."""
    lib = next(Path("/usr/lib").glob("python3.*"))
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(lib.rglob("*")):
            if total >= limit:
                break
            if path.is_file() and not path.is_symlink():
                tar.add(str(path), arcname=str(path.relative_to("/")), recursive=False)
                total += path.stat().st_size
    return buf.getvalue()


def timed_reads(open_source, offsets: list[int]) -> float:
    """Mean seconds per cold 4 KiB read (a fresh source per read)."""
    t0 = time.perf_counter()
    for off in offsets:
        src = open_source()
        try:
            src.pread(off, BLOCK)
        finally:
            src.close()
    return (time.perf_counter() - t0) / len(offsets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="MB of file data in the layer tar (default 64)")
    ap.add_argument("--reads", type=int, default=200, help="random 4 KiB reads per case (default 200)")
    args = ap.parse_args()
    tar = make_tar(args.mb << 20)
    rnd = random.Random(14)
    offsets = [rnd.randrange(0, len(tar) - BLOCK) // BLOCK * BLOCK for _ in range(args.reads)]
    with tempfile.TemporaryDirectory(prefix="obd-plain-index-") as work:
        raw = os.path.join(work, "layer.tar")
        Path(raw).write_bytes(tar)
        base = timed_reads(lambda: FileSource(raw), offsets)
        gz = os.path.join(work, "layer.tar.gz")
        Path(gz).write_bytes(gzip.compress(tar, compresslevel=6, mtime=0))
        gz_size = os.path.getsize(gz)
        print(
            f"layer tar {len(tar) / 1e6:.1f} MB; gzip {gz_size / 1e6:.1f} MB; {args.reads} cold 4 KiB reads"
        )
        print(f"baseline, uncompressed tar: {base * 1e3:.3f} ms per read")
        print(f"{'index':<26} {'seek points':>11} {'index size':>18} {'per read':>10} {'vs tar':>8}")
        for span in (256 << 10, 1 << 20, 4 << 20):
            idx = os.path.join(work, f"gz-{span}.meta")
            header = build_gzip_index(gz, idx, span=span)
            t = timed_reads(lambda idx=idx: GzipIndexedSource(FileSource(gz), FileSource(idx)), offsets)
            size = os.path.getsize(idx)
            print(
                f"gzip, span {span >> 10:>5} KiB{'':6} {header.index_num:>11} "
                f"{size / 1e6:>7.2f} MB ({100 * size / gz_size:4.1f} %) {t * 1e3:>7.2f} ms {t / base:>7.0f}×"
            )
        z = zstandard.ZstdCompressor(level=3)
        for frame in (256 << 10, 1 << 20, 4 << 20):
            zst = os.path.join(work, f"layer-{frame}.tar.zst")
            Path(zst).write_bytes(b"".join(z.compress(tar[i : i + frame]) for i in range(0, len(tar), frame)))
            index = scan_frames(zst)
            size = len(index.to_bytes())
            zsize = os.path.getsize(zst)
            t = timed_reads(lambda zst=zst, index=index: ZstdFramedSource(FileSource(zst), index), offsets)
            print(
                f"zstd, frames of {frame >> 10:>5} KiB {len(index.frames):>11} "
                f"{size / 1e3:>7.2f} kB ({100 * size / zsize:5.2f} %) {t * 1e3:>7.2f} ms {t / base:>7.0f}× "
                f"(blob {zsize / 1e6:.1f} MB)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
