#!/usr/bin/env python3
"""Time to a ready disk from a registry far away: resolve an image and open its layers.

An image is converted with ``obd convert``'s defaults (lz4 ZFile, 4 KiB blocks, digest tables: what
a user gets) and pushed to a local Debian docker-registry behind ``bench/slow_proxy.py`` (a delay per
request and a bandwidth cap: the link). Each run starts cold (new connections, empty block cache)
and measures, in this process:

* resolve: the token, manifest and config requests (:func:`obd.image.remote.registry_config`);
* open: every layer opened (:func:`obd.image.local.open_config`): tar header, ZFile header and
  trailer, jump table, LSMT index, digest table;
* disk ready: the two together — when ``obd nbd``/``obd run`` could serve the first block.

Layers are opened one by one (``open_parallel=1``, how obd did it before) and all at once (the
default) in the same run, and the ratio is printed. Beside each row: the requests and bytes obd's
``--stats`` counted and what the link (the proxy) saw, which must agree.

Usage: .venv/bin/python bench/bench_open.py [--quick] [--delay 50ms] [--rate 20Mbit] [--runs N]
``--quick`` (< 20 s) uses a busybox root in five layers and one run per mode; the default is the
Debian + python3 root (``bench/images.py``; root and the apt mirror needed the first time), 3 runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import slow_proxy  # noqa: E402
from images import busybox_rootfs, debian_python_rootfs, default_cache_dir, plain_oci_layout  # noqa: E402

from frontends.run.registry import LocalRegistry  # noqa: E402
from obd.convert.image import ConvertOptions, convert_image  # noqa: E402
from obd.image.local import open_config  # noqa: E402
from obd.image.remote import RemoteOptions, registry_config  # noqa: E402
from obd.observability.stats import Stats  # noqa: E402
from obd.registry.client import RegistryClient  # noqa: E402
from obd.registry.loop import default_runner  # noqa: E402
from obd.registry.push import push_layout  # noqa: E402

MODES = (("one by one", 1), ("all at once", 16))


def build_image(cache: Path, quick: bool, say) -> Path:
    """An OCI layout holding the converted image (tag ``obd``), cached under ``cache``."""
    name = "busybox-open" if quick else "debian-python"
    out = cache / "oci" / f"{name}-obd-default"
    if (out / "index.json").is_file():
        return out
    if quick:
        root = cache / "roots" / "busybox-open"
        if not root.is_dir():
            busybox_rootfs(root)
    else:
        root = debian_python_rootfs(cache, progress=say)
    layout = plain_oci_layout(root, cache, name=name, layers=5)
    say(f"converting {layout} with obd convert's defaults")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_image(f"oci:{layout}:latest", f"oci:{tmp}:obd", ConvertOptions(cache_dir=str(cache / "convert")))
    tmp.rename(out)
    return out


def cold_open(host: str, repo: str, cache: Path, parallel: int) -> dict:
    """One cold start: resolve + open every layer with an empty block cache and new connections."""
    shutil.rmtree(cache, ignore_errors=True)
    stats = Stats()
    opts = RemoteOptions(insecure=True, cache_dir=str(cache), stats=stats, open_parallel=parallel)
    try:
        t0 = time.monotonic()
        cfg = registry_config(f"{host}/{repo}", opts)
        t1 = time.monotonic()
        stack = open_config(cfg, readonly=True, remote=opts)
        t2 = time.monotonic()
        layers = len(stack.lowers)
        stack.close()
    finally:
        opts.close()
        shutil.rmtree(cache, ignore_errors=True)
    snap = stats.snapshot()
    return {
        "resolve": t1 - t0,
        "open": t2 - t1,
        "ready": t2 - t0,
        "layers": layers,
        "obd_requests": snap["requests"],
        "obd_bytes": snap["bytes_received"],
    }


def through_link(upstream: str, delay: str, rate: str, fn) -> dict:
    proc, host = slow_proxy.start(upstream, delay=delay, rate=rate)
    try:
        result = fn(host)
    finally:
        counts = slow_proxy.stop(proc).split()
    result["link_requests"] = int(counts[counts.index("requests") + 1])
    result["link_bytes"] = int(counts[counts.index("bytes") + 1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="busybox root, one run per mode (< 20 s)")
    ap.add_argument("--delay", default="50ms", help="added to every request (default 50ms)")
    ap.add_argument("--rate", default="20Mbit", help="link bandwidth (default 20Mbit)")
    ap.add_argument("--runs", type=int, help="runs per mode, medians reported (default 1 quick, 3 full)")
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="where built images are cached")
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)

    say = lambda m: print(f"# {m}", flush=True)  # noqa: E731
    layout = build_image(Path(args.cache_dir), args.quick, say)
    work = Path(tempfile.mkdtemp(prefix="obd-bench-open-"))
    results: dict[str, list[dict]] = {label: [] for label, _ in MODES}
    try:
        with LocalRegistry(work / "registry") as reg:
            client = RegistryClient(insecure=True)
            runner = default_runner()
            runner.run(push_layout(client, f"oci:{layout}:obd", f"{reg.host}/bench/open:obd"), 600)
            runner.run(client.aclose(), 10)
            for _ in range(runs):
                for label, parallel in MODES:
                    results[label].append(
                        through_link(
                            reg.url,
                            args.delay,
                            args.rate,
                            lambda h, p=parallel: cold_open(h, "bench/open:obd", work / "cache", p),
                        )
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rtt = slow_proxy.parse_delay(args.delay)
    rate = slow_proxy.parse_rate(args.rate)
    layers = results[MODES[0][0]][0]["layers"]
    print(f"\nlink {args.delay} + {args.rate}/s, {layers} layers, medians of {runs} run(s)")
    print(
        f"  {'layers opened':<14} {'resolve':>8} {'open':>8} {'disk ready':>11} {'limit':>8} {'RTTs':>5}"
        f" {'requests obd/link':>18} {'bytes obd/link':>22}"
    )
    for label, _ in MODES:
        rs = results[label]

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        # the physical limit: the bytes at the link's rate plus the one round trip nothing can hide
        limit = (med("link_bytes") / rate if rate else 0.0) + rtt
        print(
            f"  {label:<14} {med('resolve'):>6.2f} s {med('open'):>6.2f} s {med('ready'):>9.2f} s "
            f"{limit:>6.2f} s {med('ready') / rtt:>5.1f} {med('obd_requests'):>8.0f} / "
            f"{med('link_requests'):<8.0f} {med('obd_bytes'):>10.0f} / {med('link_bytes'):<10.0f}"
        )
    serial = statistics.median(r["ready"] for r in results[MODES[0][0]])
    concurrent = statistics.median(r["ready"] for r in results[MODES[1][0]])
    print(f"  disk ready, all at once vs one by one: {serial / concurrent:.2f}× faster")
    exact = all(
        (r["obd_requests"], r["obd_bytes"]) == (r["link_requests"], r["link_bytes"])
        for rs in results.values()
        for r in rs
    )
    print(f"  --stats requests and bytes match the link's: {'yes' if exact else 'NO'}")
    print("  (limit: the link's bytes at its rate + one round trip; RTTs: disk ready in round trips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
