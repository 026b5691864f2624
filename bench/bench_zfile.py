#!/usr/bin/env python3
"""ZFile throughput: obd's writer and reader against the bare codec calls, in one run.

Input: ``--size`` MiB of alternating 64 KiB chunks of random bytes and repetitive text, the same
bytes as ``fixtures/overlaybd/make_inputs.py OUT --perf`` makes for 256 MiB (the input of the
overlaybd anchors in ``ANCHORS.md``). For lz4 and zstd this measures, best of ``--repeat`` runs:

- compress: :class:`ZFileWriter` from memory to a file (``--block-size`` blocks, verify on);
- decompress: :class:`ZFileReader` over that file, reading the whole original in large reads;
- ceiling: a tight loop calling only ``lz4.block.decompress`` / ``ZstdDecompressor.decompress`` on
  the already-split compressed blocks: what Python can do at best, with no I/O, CRC or copying.
  Reader and ceiling runs alternate, so that a busy moment of a shared machine hits both alike.

It prints MB/s of original data, the reader's ratio to the ceiling and the overlaybd anchors
(C++ tools on the same kind of machine). Timings vary between machines; the ratios are the point.

    .venv/bin/python bench/bench_zfile.py [--size 256] [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lz4.block  # noqa: E402
import zstandard  # noqa: E402

from obd.io.source import FileSource  # noqa: E402
from obd.zfile import ZFileReader, ZFileWriter, default_threads  # noqa: E402

MiB = 1 << 20
CHUNK = 64 << 10
READ_SIZE = 4 * MiB

#: overlaybd C++ tools, 256 MiB of this input, 4 KiB blocks, 2 vCPUs (ANCHORS.md).
ANCHORS = {
    ("compress", "lz4"): 854,
    ("decompress", "lz4"): 931,
    ("compress", "zstd"): 240,
    ("decompress", "zstd"): 289,
}
TARGETS = {("decompress", "lz4"): 600, ("decompress", "zstd"): 290}
#: The reader's share of the bare codec's speed (issue 17).
CEILING_RATIO_TARGETS = {"lz4": 0.70, "zstd": 0.85}


def _text(tag: str, n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"%08d %s the quick brown fox jumps over the lazy dog\n" % (i, tag.encode())
        i += 1
    return bytes(out[:n])


def mixed_input(size: int) -> bytes:
    """``make_inputs.perf_mixed(size)``: the fixture generator when present, else the same recipe."""
    script = ROOT / "fixtures" / "overlaybd" / "make_inputs.py"
    if script.exists():
        spec = importlib.util.spec_from_file_location("make_inputs", script)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return bytes(mod.perf_mixed(size))
    r = hashlib.shake_256(b"perf.rand").digest(size // 2)
    t = _text("perf.text", size // 2)
    out = bytearray()
    for i in range(0, size // 2, CHUNK):
        out += r[i : i + CHUNK]
        out += t[i : i + CHUNK]
    return bytes(out)


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="input size in MiB (default 256)")
    ap.add_argument("--block-size", type=int, default=4096, help="ZFile block size (default 4096)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best is kept")
    ap.add_argument("--threads", type=int, default=None, help=f"writer threads (default {default_threads()})")
    ap.add_argument("--algorithms", default="lz4,zstd")
    ap.add_argument("--dir", default=None, help="where to put the compressed files (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: --size 16 --repeat 2")
    args = ap.parse_args(argv)
    if args.quick:  # the quick sizes become the defaults; flags given still win
        ap.set_defaults(size=16, repeat=2)
        args = ap.parse_args(argv)

    size = args.size * MiB
    bs = args.block_size
    t0 = time.perf_counter()
    data = mixed_input(size)
    made = time.perf_counter() - t0
    threads = args.threads or default_threads()
    print(f"input: {args.size} MiB mixed (random/text 64 KiB chunks), made in {made:.1f} s")
    print(f"block size {bs}, writer threads {threads}, best of {args.repeat}, CPUs {os.cpu_count()}")
    mv = memoryview(data)
    rows = []
    failed = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for algo in args.algorithms.split(","):
            path = os.path.join(tmp, f"bench.{algo}.zfile")

            def compress(path: str = path, algo: str = algo) -> None:
                with open(path, "wb") as out:
                    w = ZFileWriter(out, algorithm=algo, block_size=bs, threads=args.threads)
                    for a in range(0, size, READ_SIZE):
                        w.write(mv[a : a + READ_SIZE])
                    w.close()

            t_comp = best_of(args.repeat, compress)
            csize = os.path.getsize(path)

            reader = ZFileReader(FileSource(path))
            buf = bytearray(READ_SIZE)
            out = memoryview(buf)

            def decompress(reader: ZFileReader = reader, out: memoryview = out) -> None:
                pos = 0
                while pos < reader.size:
                    pos += reader.readinto(out, pos)

            # Correctness of what was timed: one more pass, hashed.
            h = hashlib.sha256()
            pos = 0
            while pos < reader.size:
                n = reader.readinto(out, pos)
                h.update(out[:n])
                pos += n
            if h.digest() != hashlib.sha256(data).digest():
                print(f"ERROR: {algo} round trip differs", file=sys.stderr)
                return 1

            # The ceiling: only codec calls over blocks split beforehand.
            blob = Path(path).read_bytes()
            crc = 4 if reader.verify_flag else 0
            offs = reader.offsets.tolist()
            comps = [blob[offs[i] : offs[i + 1] - crc] for i in range(reader.block_count)]
            if algo == "lz4":

                def ceiling(comps: list[bytes] = comps) -> None:
                    dec = lz4.block.decompress
                    for c in comps:
                        dec(c, bs)

            else:
                dctx = zstandard.ZstdDecompressor()

                def ceiling(comps: list[bytes] = comps, dctx: zstandard.ZstdDecompressor = dctx) -> None:
                    dec = dctx.decompress
                    for c in comps:
                        dec(c, bs)

            # Interleaved, so that a busy moment of a shared machine hits both sides alike.
            t_dec = t_ceil = float("inf")
            for _ in range(args.repeat):
                t_dec = min(t_dec, best_of(1, decompress))
                t_ceil = min(t_ceil, best_of(1, ceiling))
            reader.close()
            del comps, blob

            mbps = {
                k: size / t / 1e6
                for k, t in (("compress", t_comp), ("decompress", t_dec), ("ceiling", t_ceil))
            }
            rows.append((algo, csize, mbps))
            ratio = mbps["decompress"] / mbps["ceiling"]
            goal = CEILING_RATIO_TARGETS.get(algo, 0.70)
            if ratio < goal:
                failed.append(f"{algo} decompress {ratio:.0%} of the ceiling < {goal:.0%}")
            target = TARGETS.get(("decompress", algo))
            if target and mbps["decompress"] < target:
                failed.append(f"{algo} decompress {mbps['decompress']:.0f} MB/s < {target}")

    print()
    head = ("algo", "ratio", "compress", "vs C++", "decompress", "vs C++", "ceiling", "dec/ceil")
    print("{:5} {:>6} {:>10} {:>7} {:>11} {:>7} {:>9} {:>9}".format(*head))
    for algo, csize, m in rows:
        comp, dec, ceil = m["compress"], m["decompress"], m["ceiling"]
        print(
            f"{algo:5} {csize / size:6.3f} {comp:8.0f}MB/s {comp / ANCHORS[('compress', algo)]:6.2f}x"
            f" {dec:9.0f}MB/s {dec / ANCHORS[('decompress', algo)]:6.2f}x {ceil:7.0f}MB/s {dec / ceil:8.0%}"
        )
    print()
    print("anchors (overlaybd C++, MB/s): " + ", ".join(f"{op} {a} {v}" for (op, a), v in ANCHORS.items()))
    print(
        "targets: decompress >= "
        + ", ".join(f"{a} {v:.0%}" for a, v in CEILING_RATIO_TARGETS.items())
        + " of the ceiling, "
        + ", ".join(f"{a} >= {v} MB/s" for (_, a), v in TARGETS.items())
    )
    for f in failed:
        print("MISSED:", f)
    if not failed:
        print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
