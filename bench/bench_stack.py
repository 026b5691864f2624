#!/usr/bin/env python3
"""Stack open time and 4 KiB random-read latency through a merged index of 1,000,000 entries.

Builds LAYERS uncompressed sealed layers whose indexes hold ENTRIES mappings in total (interleaved,
so the merge has real work), then measures in one run:

* opening the stack (read + validate every index, merge them): target < 1.5 s;
* 4 KiB random reads through ``Stack.readinto`` (index lookup + pread, warm page cache): target
  median < 20 µs; the baseline is a bare ``os.preadv`` of 4 KiB from one layer file, the floor any
  reader pays, and the ratio says what obd adds.

Usage: .venv/bin/python bench/bench_stack.py [--entries 1000000] [--layers 4] [--reads 200000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from obd.image.local import open_layers
from obd.layer.writer import BlobWriter
from obd.lsmt.commit import layer_info
from obd.lsmt.format import (
    FLAGS_SEALED_HEADER,
    FLAGS_SEALED_TRAILER,
    HT_SPACE,
    INVALID_ENTRY,
    MappingColumns,
    encode_mappings,
)

DATA_SECTORS = 64 * 2048  # 64 MiB data area per layer


def build_layer(path: str, layer: int, layers: int, n: int, vsize: int) -> None:
    """``n`` 8-sector mappings at offsets ``(k * layers + layer) * 16``: interleaved across layers.

    Their moffsets point pseudo-randomly into a shared 64 MiB data area (overlaps in the backing
    file are legal and keep the file small).
    """
    rng = np.random.default_rng(layer)
    k = np.arange(n, dtype=np.int64)
    offset = (k * layers + layer) * 16
    length = np.full(n, 8, np.int64)
    moffset = 8 + rng.integers(0, DATA_SECTORS - 8, n)
    cols = MappingColumns(offset, length, moffset, np.zeros(n, bool), np.zeros(n, np.int64))
    header = layer_info(vsize).with_(flags=FLAGS_SEALED_HEADER)
    with BlobWriter(path) as out:
        out.write(header.pack())
        chunk = os.urandom(1 << 20)
        for _ in range(DATA_SECTORS * 512 // len(chunk)):
            out.write(chunk)
        out.write(encode_mappings(cols))
        pad = (-n) % 256
        out.write(INVALID_ENTRY * pad)
        trailer = header.with_(
            flags=FLAGS_SEALED_TRAILER, index_offset=HT_SPACE + DATA_SECTORS * 512, index_size=n + pad
        )
        out.write(trailer.pack())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reads", type=int, default=200_000)
    ap.add_argument("--dir", default=None, help="where to build the layers (default: a temp dir)")
    args = ap.parse_args()
    per = args.entries // args.layers
    vsize = per * args.layers * 16 * 512
    tmp = args.dir or tempfile.mkdtemp(prefix="obd-bench-stack-")
    os.makedirs(tmp, exist_ok=True)
    paths = [os.path.join(tmp, f"layer{i}.commit") for i in range(args.layers)]
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        if not os.path.exists(p):
            build_layer(p, i, args.layers, per, vsize)
    print(f"built {args.layers} layers x {per} entries in {time.perf_counter() - t0:.1f} s ({tmp})")
    for p in paths:  # warm the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass

    opens = []
    for _ in range(3):
        t0 = time.perf_counter()
        stack = open_layers(paths)
        opens.append(time.perf_counter() - t0)
        if len(opens) < 3:
            stack.close()
    open_s = statistics.median(opens)
    print(
        f"open: {len(stack.lower_index)} merged entries, median {open_s * 1000:.0f} ms of 3 "
        f"(target < 1500 ms) {'OK' if open_s < 1.5 else 'MISSED'}"
    )

    rng = random.Random(1)
    sectors = vsize // 512
    offsets = [rng.randrange(0, sectors - 8) * 512 for _ in range(args.reads)]
    buf = memoryview(bytearray(4096))
    times = []
    clock = time.perf_counter_ns
    readinto = stack.readinto
    for off in offsets:
        t = clock()
        readinto(buf, off)
        times.append(clock() - t)
    times.sort()
    med = times[len(times) // 2] / 1000
    p99 = times[int(len(times) * 0.99)] / 1000

    fd = os.open(paths[0], os.O_RDONLY)
    size = os.fstat(fd).st_size
    base = []
    for off in offsets:
        o = off % (size - 4096)
        t = clock()
        os.preadv(fd, [buf], o)
        base.append(clock() - t)
    os.close(fd)
    base.sort()
    bmed = base[len(base) // 2] / 1000
    print(
        f"4 KiB random read via the stack: median {med:.1f} µs, p99 {p99:.1f} µs (target median < 20 µs) "
        f"{'OK' if med < 20 else 'MISSED'}"
    )
    print(
        f"baseline bare os.preadv 4 KiB: median {bmed:.1f} µs -> obd adds {med - bmed:.1f} µs "
        f"({med / bmed:.1f}x the bare read)"
    )
    stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
