#!/usr/bin/env python3
"""``obd convert`` on a Debian + python3 image: time per layer, where it goes, and output size.

The image is built locally by ``bench/images.py`` (debootstrap minbase + python3-minimal, cut into five
gzip layers, the last one deleting caches and docs with whiteouts) and cached. Measured in one run:

* the conversion (``oci:`` → ``oci:``, conversion cache off), per layer: reading (gunzip, tar parsing,
  spooling), ext4 writing (planning + debugfs), ``e2fsck -fn``, finding changed blocks, and committing
  (compaction + lz4/zstd + tar envelope); and the share of ext4 writing vs compression;
* the size of the overlaybd layers against the gzip OCI layers they came from;
* baselines from the same run: gunzip of every layer (the floor any converter pays), and what a
  classic runtime does to get an ext4 root: ``tar -x`` of every layer then ``mke2fs -d`` (the
  pipeline ``../shared/spec/ANCHORS.md`` measured at 1.34 s + 1.25 s for a similar image).

Usage: .venv/bin/python bench/bench_convert.py [--cache DIR] [--algorithm lz4|zstd] [--no-fsck] [--runs N]
Needs root the first time (debootstrap) and the network to the apt mirror.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import DEFAULT_CACHE, debian_python_layout

from obd.convert import ConvertOptions, convert_image

MB = 1e6
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))
    if not found:
        raise SystemExit(f"{name} not found")
    return found


def source_layers(layout: Path) -> list[dict]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_bytes())
    return manifest["layers"]


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def baseline_gunzip(layout: Path, layers: list[dict]) -> tuple[float, int]:
    t0 = time.perf_counter()
    total = 0
    for layer in layers:
        with gzip.open(blob_path(layout, layer["digest"]), "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return time.perf_counter() - t0, total


def baseline_extract_mkfs(layout: Path, layers: list[dict], work: Path) -> tuple[float, float]:
    root = work / "rootfs"
    root.mkdir()
    t0 = time.perf_counter()
    for layer in layers:
        subprocess.run(
            [
                tool("tar"),
                "-xzf",
                str(blob_path(layout, layer["digest"])),
                "-C",
                str(root),
                "--numeric-owner",
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
    extract = time.perf_counter() - t0
    image = work / "mkfs.img"
    t0 = time.perf_counter()
    subprocess.run(
        [tool("mke2fs"), "-q", "-F", "-t", "ext4", "-d", str(root), str(image), "1G"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1"},
    )
    mkfs = time.perf_counter() - t0
    shutil.rmtree(root)
    image.unlink()
    return extract, mkfs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the benchmark image is cached")
    ap.add_argument("--algorithm", default="lz4", choices=("lz4", "zstd"))
    ap.add_argument("--no-fsck", action="store_true", help="convert without the e2fsck check per layer")
    ap.add_argument("--runs", type=int, default=1, help="conversions to run (the best is reported)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    layout = debian_python_layout(args.cache)
    print(f"image: {layout} (ready in {time.perf_counter() - t0:.1f} s)")
    layers = source_layers(layout)
    gz_total = sum(x["size"] for x in layers)

    with tempfile.TemporaryDirectory(prefix="obd-bench-convert-") as tmp:
        work = Path(tmp)
        gunzip_s, tar_total = baseline_gunzip(layout, layers)
        extract_s, mkfs_s = baseline_extract_mkfs(layout, layers, work)
        best = None
        for run in range(args.runs):
            out = work / f"out{run}"
            opts = ConvertOptions(
                algorithm=args.algorithm, use_cache=False, check=not args.no_fsck, workdir=tmp
            )
            t0 = time.perf_counter()
            res = convert_image(f"oci:{layout}:latest", f"oci:{out}:obd", opts)
            wall = time.perf_counter() - t0
            if best is None or wall < best[0]:
                best = (wall, res)
            shutil.rmtree(out)
    assert best is not None
    wall, res = best

    print(f"\nsource: {len(layers)} gzip layers, {gz_total / MB:.1f} MB gzip, {tar_total / MB:.1f} MB of tar")
    hdr = (
        f"{'layer':>5} {'tar MB':>7} {'gz MB':>6} {'entries':>7} {'chg MB':>7} {'obd MB':>7} "
        f"{'read s':>6} {'prep s':>6} {'ext4 s':>6} {'fsck s':>6} {'diff s':>6} {'comp s':>6} {'total s':>7}"
    )
    print(hdr)
    sums = dict.fromkeys(("read", "prep", "ext4", "fsck", "diff", "commit", "changed", "blob", "tar"), 0.0)
    for i, layer in enumerate(res.layers[1:]):
        s = layer.stats
        total = (
            s.read_seconds
            + s.prepare_seconds
            + s.ext4_seconds
            + s.fsck_seconds
            + s.diff_seconds
            + s.commit_seconds
        )
        print(
            f"{i:>5} {s.tar_bytes / MB:>7.1f} {layers[i]['size'] / MB:>6.1f} {s.entries:>7} "
            f"{s.changed_bytes / MB:>7.1f} {layer.size / MB:>7.1f} {s.read_seconds:>6.2f} "
            f"{s.prepare_seconds:>6.2f} {s.ext4_seconds:>6.2f} {s.fsck_seconds:>6.2f} {s.diff_seconds:>6.2f} "
            f"{s.commit_seconds:>6.2f} {total:>7.2f}"
        )
        sums["read"] += s.read_seconds
        sums["prep"] += s.prepare_seconds
        sums["ext4"] += s.ext4_seconds
        sums["fsck"] += s.fsck_seconds
        sums["diff"] += s.diff_seconds
        sums["commit"] += s.commit_seconds
        sums["changed"] += s.changed_bytes
        sums["blob"] += layer.size
        sums["tar"] += s.tar_bytes
    staged = sums["read"] + sums["prep"] + sums["ext4"] + sums["fsck"] + sums["diff"] + sums["commit"]
    print(
        f"{'all':>5} {sums['tar'] / MB:>7.1f} {gz_total / MB:>6.1f} {'':>7} {sums['changed'] / MB:>7.1f} "
        f"{sums['blob'] / MB:>7.1f} {sums['read']:>6.2f} {sums['prep']:>6.2f} {sums['ext4']:>6.2f} "
        f"{sums['fsck']:>6.2f} {sums['diff']:>6.2f} {sums['commit']:>6.2f} {staged:>7.2f}"
    )
    base = res.layers[0]
    print(f"\nbase layer (pushed as layer 0): {base.size / MB:.1f} MB; manifest {res.manifest_digest}")
    print(f"conversion wall time: {wall:.2f} s ({args.algorithm}, fsck {'off' if args.no_fsck else 'on'})")
    print(
        f"  ext4 writing (plan + debugfs) {sums['ext4'] / staged:.0%}, compression/commit "
        f"{sums['commit'] / staged:.0%}, reading tars {sums['read'] / staged:.0%}, "
        f"changed-block scan {sums['diff'] / staged:.0%}, e2fsck {sums['fsck'] / staged:.0%}, "
        f"working copy of the base layer {sums['prep'] / staged:.0%}"
    )
    print("\nbaselines, same run:")
    print(f"  gunzip every layer           {gunzip_s:6.2f} s   convert/gunzip       {wall / gunzip_s:5.2f}x")
    print(
        f"  tar -x + mke2fs -d           {extract_s + mkfs_s:6.2f} s   convert/(extract+mkfs) "
        f"{wall / (extract_s + mkfs_s):5.2f}x  (extract {extract_s:.2f} s, mkfs {mkfs_s:.2f} s)"
    )
    print(
        f"  size: overlaybd layers {sums['blob'] / MB:.1f} MB vs gzip layers {gz_total / MB:.1f} MB "
        f"= {sums['blob'] / gz_total:.2f}x  "
        f"(with the base layer: {(sums['blob'] + base.size) / gz_total:.2f}x)"
    )


if __name__ == "__main__":
    main()
