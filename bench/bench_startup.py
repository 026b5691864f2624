#!/usr/bin/env python3
"""A lazy ``obd run`` without a trace, with and without the start-up prefetch and the readahead.

The image of ``bench/bench_open.py`` (Debian + python3 in five layers, ``obd convert``'s defaults)
is served by Debian's docker-registry behind ``bench/slow_proxy.py`` (the link). Each run is
``obd run IMAGE -- python3 -c 'print("hello world!")'`` from a cold block cache; the time to the
first output line is measured for three settings, alternating, ``--rounds`` times each:

* the default: the command's start prefetched (``obd/prefetch/startup.py``: its path, ELF loader
  and libraries) and readahead by the bandwidth-delay product on sequential reads;
* without the start-up prefetch (``RunOptions.prefetch_exec=False``);
* without the readahead (``--readahead 0``);
* without verification (``--verify=off``): the cost of checking every block against the image's
  digest tables on a cold start (issue 12: ≤ 3 %).

Beside each median: the bytes and requests the link carried. Boots a VM per run (TCG where KVM is
missing: about 10 s each); run ``bench/bench_open.py`` once first to build the image.

Usage: .venv/bin/python bench/bench_startup.py [--rounds N] [--delay 50ms] [--rate 20Mbit]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import slow_proxy  # noqa: E402
from bench_open import build_image  # noqa: E402
from images import default_cache_dir  # noqa: E402

from frontends.run.launcher import RunOptions, run_image  # noqa: E402
from frontends.run.registry import LocalRegistry  # noqa: E402
from obd.image.remote import RemoteOptions  # noqa: E402
from obd.observability.stats import Stats  # noqa: E402
from obd.registry.blob import READAHEAD_AUTO  # noqa: E402
from obd.registry.client import RegistryClient  # noqa: E402
from obd.registry.loop import default_runner  # noqa: E402
from obd.registry.push import push_layout  # noqa: E402

COMMAND = ["python3", "-c", 'print("hello world!")']
EXPECTED = b"hello world!\n"
#: label, start-up prefetch, readahead, --verify
SETTINGS = (
    ("default (start-up prefetch, readahead auto)", True, READAHEAD_AUTO, "auto"),
    ("without the start-up prefetch", False, READAHEAD_AUTO, "auto"),
    ("without readahead (--readahead 0)", True, 0, "auto"),
    ("without verification (--verify=off)", True, READAHEAD_AUTO, "off"),
)


def one_run(host: str, cache: Path, accel: str, prefetch_exec: bool, readahead: int, verify: str) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    remote = RemoteOptions(
        insecure=True, cache_dir=str(cache), stats=Stats(), readahead=readahead, verify=verify
    )
    out = bytearray()
    opts = RunOptions(remote=remote, accel=accel, on_output=out.extend, prefetch_exec=prefetch_exec)
    try:
        res = run_image(f"{host}/bench/startup:obd", COMMAND, opts)
    finally:
        remote.close()
        shutil.rmtree(cache, ignore_errors=True)
    assert res.exit_code == 0 and bytes(out) == EXPECTED, bytes(out)
    return res.timings["first_output"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="runs per setting, alternating (default 2)")
    ap.add_argument("--delay", default="50ms", help="added to every request (default 50ms)")
    ap.add_argument("--rate", default="20Mbit", help="link bandwidth (default 20Mbit)")
    ap.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="where built images are cached")
    args = ap.parse_args()

    say = lambda m: print(f"# {m}", flush=True)  # noqa: E731
    layout = build_image(Path(args.cache_dir), False, say)
    work = Path(tempfile.mkdtemp(prefix="obd-bench-startup-"))
    results: dict[str, list[tuple[float, int, int]]] = {label: [] for label, *_ in SETTINGS}
    try:
        with LocalRegistry(work / "registry") as reg:
            client = RegistryClient(insecure=True)
            runner = default_runner()
            runner.run(push_layout(client, f"oci:{layout}:obd", f"{reg.host}/bench/startup:obd"), 600)
            runner.run(client.aclose(), 10)
            for _ in range(args.rounds):
                for label, prefetch_exec, readahead, verify in SETTINGS:
                    proc, host = slow_proxy.start(reg.url, delay=args.delay, rate=args.rate)
                    try:
                        t = one_run(host, work / "cache", args.accel, prefetch_exec, readahead, verify)
                    finally:
                        words = slow_proxy.stop(proc).split()
                    n, b = int(words[words.index("requests") + 1]), int(words[words.index("bytes") + 1])
                    say(f"{label}: first output {t:.2f} s, {b / 1e6:.1f} MB in {n} requests")
                    results[label].append((t, b, n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nlink {args.delay} + {args.rate}/s, cold cache, medians of {args.rounds}")
    base = statistics.median(t for t, _, _ in results[SETTINGS[0][0]])
    for label, *_ in SETTINGS:
        rs = results[label]
        t = statistics.median(r[0] for r in rs)
        mb = statistics.median(r[1] for r in rs) / 1e6
        n = statistics.median(r[2] for r in rs)
        print(f"  {label:<46} {t:6.2f} s  {t / base:5.2f}× the default  {mb:5.1f} MB  {n:4.0f} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
