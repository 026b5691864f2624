#!/usr/bin/env python3
"""What checking the parts no digest table covers costs: the plain image's base layer (issue 12).

A plain image's device sits on obd's packaged base layer, unpacked into the cache; its cached copy
is now hashed against the packaged sha256 once per process (4.5 MiB). Setup, all local: Debian's
``docker-registry`` holding the two-layer plain image of tests/remote/test_verify_index.py, its
meta layers already in the cache. One "start" is what a new process does: resolve the image, open
the stack from the cached meta, read the first 8 MiB of the device. Measured in one run, the two
modes alternating: the check as shipped (the per-process memo cleared before each start) vs the
check skipped (the baseline); medians of ``--rounds``.

Target (issue 12): verification costs <= 3 % of cold start.

Usage: .venv/bin/python bench/bench_verify_coverage.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers"), str(ROOT / "tests" / "remote")]

from registry_server import RegistryServer  # noqa: E402
from test_verify_index import _push_plain  # noqa: E402

import obd.layer.baselayer as baselayer  # noqa: E402
from obd.image.local import open_config  # noqa: E402
from obd.image.remote import RemoteOptions, registry_config  # noqa: E402
from obd.observability.stats import Stats  # noqa: E402

READ = 8 << 20


def start(image: str, host: str, cache: str) -> float:
    """Seconds for one start: resolve, open the stack, read the first 8 MiB."""
    t = time.perf_counter()
    opts = RemoteOptions(insecure=(host,), cache_dir=cache, stats=Stats(), quiet=True)
    stack = open_config(registry_config(image, opts), readonly=True, remote=opts)
    try:
        stack.pread(0, READ)
    finally:
        stack.close()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="starts of each mode (median kept)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cover-"))
    reg = RegistryServer(tmp / "registry", "noauth").start()
    try:
        _push_plain(reg.host, tmp / "layout")
        image, cache = f"{reg.host}/plain/app:v1", str(tmp / "cache")
        start(image, reg.host, cache)  # builds the meta layers and unpacks the base layer
        real = baselayer._checked_before
        checked, skipped = [], []
        for _ in range(args.rounds):
            baselayer._CHECKED.clear()
            checked.append(start(image, reg.host, cache))
            baselayer._checked_before = lambda _p: True  # type: ignore[assignment]
            try:
                skipped.append(start(image, reg.host, cache))
            finally:
                baselayer._checked_before = real  # type: ignore[assignment]
        a, b = statistics.median(checked), statistics.median(skipped)
        print(f"start with base-layer check  {a * 1000:8.1f} ms (median of {args.rounds})")
        print(f"start without it (baseline)  {b * 1000:8.1f} ms")
        print(f"ratio {a / b:.3f}  (cost {100 * (a - b) / b:+.1f} % of a start)")
    finally:
        reg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
