#!/usr/bin/env python3
"""Trace replay over a slow link: obd's concurrent, coalesced fetching vs the same reads one by one.

Setup, all local: Debian's ``docker-registry`` with the ext4 fixture image (base + l1 + l2, tar-
wrapped lz4 ZFiles, pushed byte for byte), behind ``bench/slow_proxy.py`` adding ``--delay`` per
request. The workload is "boot-like": the filesystem's superblock and group descriptors, then
every block of every file of the image (found with ``debugfs``), read 4 KiB at a time — recorded
as an overlaybd trace on the local layer files (the same coordinates as the remote blobs).

Measured in one run, each on a cold cache:

* **one by one**: every trace record read in order, one at a time, no coalescing — the way a
  synchronous reader (overlaybd's registryfs) fetches;
* **obd replay**: :func:`obd.prefetch.trace.replay` — records merged, 16 reads in flight, RemoteBlob
  coalescing neighbours into one ranged GET.

It also reports bytes fetched against the compressed bytes the workload needs (the ZFile records
of every block it touches). Targets: replay >= 5x faster; fetched <= 2x needed.

Usage: .venv/bin/python bench/bench_prefetch.py [--delay 20ms]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers"), str(ROOT / "bench")]

import slow_proxy  # noqa: E402
from ext4tree import read_tree  # noqa: E402
from registry_server import RegistryServer  # noqa: E402

from fixtures import materialize  # noqa: E402
from obd.cli import main as obd  # noqa: E402
from obd.image.local import open_config, open_layers  # noqa: E402
from obd.image.remote import RemoteOptions, registry_config  # noqa: E402
from obd.layer.export import export_stack  # noqa: E402
from obd.observability.stats import Stats  # noqa: E402
from obd.prefetch.trace import TraceRecorder, replay  # noqa: E402

EXT4 = [
    "overlaybd/ext4/base/ext4_64",
    "overlaybd/ext4/l1/overlaybd.commit",
    "overlaybd/ext4/l2/overlaybd.commit",
]


def file_blocks(image: str) -> list[int]:
    """Every 4 KiB block of every regular file in the ext4 image (via debugfs)."""
    paths = [e["path"] for e in read_tree(image) if e["type"] == "file"]
    cmds = "\n".join(f'blocks "{p}"' for p in paths)
    res = subprocess.run(["debugfs", "-f", "-", image], input=cmds, capture_output=True, text=True).stdout
    blocks = []
    for line in res.splitlines():
        blocks += [int(b) for b in line.split() if b.isdigit()]
    return blocks


def needed_bytes(stack, records) -> int:  # type: ignore[no-untyped-def]
    """Compressed bytes of the distinct ZFile blocks the records touch."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for layer, off, n in records:
        z = stack.lowers[layer].blob.zfile
        if z is None:
            total += n
            continue
        for b in range(off // z.block_size, (off + n - 1) // z.block_size + 1):
            if (layer, b) not in seen:
                seen.add((layer, b))
                total += int(z.record_lengths[b])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay", default="20ms")
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="obd-bench-prefetch-"))
    reg = RegistryServer(work / "registry", "noauth").start()
    proxy = None
    try:
        layers = [str(materialize(r)) for r in EXT4]
        assert obd(["push", *layers, f"{reg.host}/bench/ext4:v1", "--insecure-registry", reg.host]) == 0

        local = open_layers(layers)
        raw = str(work / "local.img")
        export_stack(local, raw)
        blocks = file_blocks(raw)
        recorder = TraceRecorder(local)
        local.pread(0, 64 * 1024)  # superblock, group descriptors
        for b in blocks:
            local.pread(b * 4096, 4096)
        records = list(recorder.records)
        print(
            f"workload: {len(blocks)} file blocks ({len(blocks) * 4 // 1024} MiB of files), "
            f"{len(records)} trace records"
        )

        proxy, host = slow_proxy.start(f"http://{reg.host}", delay=args.delay)
        results = {}
        for mode in ("one by one", "obd replay"):
            cache = work / f"cache-{mode.replace(' ', '-')}"
            opts = RemoteOptions(insecure=(host,), cache_dir=str(cache), stats=Stats())
            t0 = time.monotonic()
            stack = open_config(registry_config(f"{host}/bench/ext4:v1", opts), readonly=True, remote=opts)
            opened = time.monotonic() - t0
            base_bytes = opts.stats["bytes_fetched"]
            base_req = opts.stats["requests"]
            t0 = time.monotonic()
            if mode == "one by one":
                buf = memoryview(bytearray(1 << 20))
                for layer, off, n in records:
                    stack.files[layer_slot(stack, layer)].readinto(buf[:n], off)
            else:
                replay(stack, records, workers=args.workers)
            secs = time.monotonic() - t0
            fetched = opts.stats["bytes_fetched"] - base_bytes
            requests = opts.stats["requests"] - base_req
            need = needed_bytes(stack, records)
            results[mode] = secs
            print(
                f"{mode:11s}: open {opened:5.2f} s, workload {secs:6.2f} s, {requests:5d} requests, "
                f"{fetched / 1e6:7.2f} MB fetched = {fetched / need:4.2f}x the {need / 1e6:.2f} MB of "
                f"compressed blocks needed"
            )
            stack.close()
            opts.close()
        speedup = results["one by one"] / results["obd replay"]
        print(
            f"obd replay is {speedup:.1f}x faster than one by one at {args.delay} per request "
            f"(target >= 5x) {'OK' if speedup >= 5 else 'MISSED'}"
        )
    finally:
        if proxy is not None:
            print("proxy:", slow_proxy.stop(proxy))
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def layer_slot(stack, layer: int) -> int:  # type: ignore[no-untyped-def]
    return stack.slot_layer.index(layer)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
