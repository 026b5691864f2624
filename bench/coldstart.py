#!/usr/bin/env python3
"""Cold start of ``python3 -c 'print("hello world!")'`` in a microVM, from a registry far away.

One image — a Debian bookworm minbase root with python3 (``bench/images.py``) — is pushed to a
local registry twice: as a plain OCI image (five gzip tar layers) and as an overlaybd image. The
overlaybd image is what a user gets by default (issue 17): ``obd convert`` of the plain image with
its defaults — one overlaybd layer per source layer on the standard base layer, lz4 ZFile of 4 KiB
blocks (``--layout converted``). ``--layout single`` is the one-layer form (``mke2fs -d`` of the
whole root, tar envelope) earlier figures used; ``--compress`` and ``--block-size`` apply to both
(``--layout single --compress zstd --block-size 32`` is the old default).
The registry sits behind ``bench/slow_proxy.py``, which adds a delay to every request and caps the
bandwidth (no tc netem on our machines). For each link the time from "go" to the command's first
output byte is measured for:

(a) what a user does today: pull every layer of the plain image (in parallel), extract them with
    GNU tar, ``mke2fs -d`` an ext4 root, boot it, run the command;
(b) ``obd run`` lazily, cold block cache (it also records a prefetch trace);
(c) ``obd run`` with the trace recorded by (b) replayed from the start, cold block cache;
(c') the same trace attached to the image as an acceleration layer (``obd trace attach``): a plain
     ``obd run`` of that image, which replays it by itself;
(d) the floor: boot and run from a ready local ext4 disk file (no network at all), once in every
    round of every link, so that the distances to it compare runs made in the same minutes;
(e) ``obd run`` of the *plain* image, lazily, no conversion: its index artifact (``obd index
    --link``) is in the registry and found through the strong link; cold block and index caches
    (it also records a trace);
(f) the same with the trace recorded by (e) replayed from the start;
(w) (b) again with the block cache a first run left (the manifest is still resolved over the link).

Each row also shows its distance to the floor and its physical limit: the floor, plus the bytes
it fetched at the link's bandwidth, plus one round trip (issue 17: lazy ≤ floor + 2 s, trace or
acceleration layer ≤ floor + 0.3 s, warm ≤ floor + 0.2 s).

Bytes and requests are the proxy's own counts (everything that crossed the "link"). Targets
(issue 7): at 50 ms + 20 Mbit/s (c) ≥ 5× faster than (a) and (b) ≥ 3×; at 25 ms + 100 Mbit/s (c)
within 1 s of (d). Issue 14, plain image at 50 ms + 20 Mbit/s: (e) ≥ 3×, (f) ≥ 5×, (e) fetching
≤ 25 % of the compressed layers. ``--cases`` picks the cases ((a) is always run: it is the
baseline; (d) too), e.g. ``--cases e,f`` for the plain image alone.

Usage: .venv/bin/python bench/coldstart.py [--links 25ms:100Mbit,50ms:20Mbit] [--runs N]
       [--cases b,c,c-accel,w,e,f] [--layout converted|single] [--compress lz4|zstd]
       [--block-size KIB] [--cache-dir DIR] [--ablation] [--json OUT]
Needs root the first time (debootstrap) and the apt mirror; afterwards everything is cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import slow_proxy  # noqa: E402
from images import (  # noqa: E402
    debian_python_rootfs,
    default_cache_dir,
    overlaybd_layer,
    plain_oci_layout,
    python_config,
    raw_ext4,
)

from frontends.run.images import mkfs_ext4, push_image  # noqa: E402
from frontends.run.launcher import RunOptions, run_image  # noqa: E402
from frontends.run.registry import LocalRegistry  # noqa: E402
from frontends.run.vm import boot, ensure_assets, resolve_accel  # noqa: E402
from obd.convert.image import ConvertOptions, convert_image  # noqa: E402
from obd.image.assemble import push_trace_image  # noqa: E402
from obd.image.remote import RemoteOptions  # noqa: E402
from obd.observability.stats import Stats  # noqa: E402
from obd.registry.client import RegistryClient  # noqa: E402
from obd.registry.loop import default_runner  # noqa: E402
from obd.registry.push import push_layout  # noqa: E402
from obd.registry.reference import parse_reference  # noqa: E402
from obd.turbo.artifact import push_index_artifact, push_link  # noqa: E402
from obd.turbo.remote import ensure_meta  # noqa: E402

COMMAND = ["python3", "-c", 'print("hello world!")']
#: What ``obd convert`` writes by default (issue 17: the benches measure what users get).
CONVERT_DEFAULTS = ConvertOptions()
#: The cases ``--cases`` can pick; (a) and (d) always run.
CASES = ("b", "c", "c-accel", "w", "e", "f")
EXPECTED = b"hello world!\n"
MB = 1e6


class FirstOutput:
    """An ``on_output`` callback that notes when the first byte arrived."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.at: float | None = None
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        if self.at is None:
            self.at = time.monotonic() - self.t0
        self.data += chunk


def floor(assets, raw: Path, accel: str) -> float:
    t0 = time.monotonic()
    seen = FirstOutput(t0)
    res = boot(assets, str(raw), COMMAND, accel=accel, on_output=seen, timeout=300)
    assert res.exit_code == 0 and res.output == EXPECTED, res.output
    return seen.at or res.timings["total"]


def full_pull(assets, host: str, repo: str, work: Path, accel: str) -> dict:
    """(a): pull every layer in parallel, tar -x, mke2fs -d, boot, run; seconds per step."""
    work.mkdir(parents=True)
    runner = default_runner()
    client = RegistryClient(insecure=True)
    t0 = time.monotonic()
    steps: dict[str, float] = {}
    try:
        image = runner.run(client.get_image(f"{host}/{repo}"), 120)

        async def pull_all() -> list[int]:
            return await asyncio.gather(
                *(
                    client.download_blob(image.reference, d.digest, work / f"layer{i}")
                    for i, d in enumerate(image.layers)
                )
            )

        sizes = runner.run(pull_all(), 1800)
    finally:
        runner.run(client.aclose(), 10)
    steps["pull"] = time.monotonic() - t0
    root = work / "rootfs"
    root.mkdir()
    t = time.monotonic()
    tar = shutil.which("tar") or "/bin/tar"
    for i in range(len(sizes)):
        subprocess.run([tar, "-xzf", str(work / f"layer{i}"), "-C", str(root)], check=True)
    steps["extract"] = time.monotonic() - t
    t = time.monotonic()
    raw = mkfs_ext4(root, work / "root.ext4")
    steps["mkfs"] = time.monotonic() - t
    t = time.monotonic()
    seen = FirstOutput(t)
    res = boot(assets, str(raw), COMMAND, accel=accel, on_output=seen, timeout=300)
    assert res.exit_code == 0 and res.output == EXPECTED, res.output
    steps["boot+run"] = seen.at or res.timings["total"]
    steps["total"] = steps["pull"] + steps["extract"] + steps["mkfs"] + steps["boot+run"]
    shutil.rmtree(work, ignore_errors=True)
    return steps


def lazy(
    host: str, repo: str, cache: Path, accel: str, *, fresh: bool = True, keep: bool = False, **kw
) -> dict:
    """(b)/(c): ``obd run`` of the overlaybd image with a cold block cache (``fresh``: emptied first;
    ``keep``: left for a warm run after)."""
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    remote = RemoteOptions(insecure=True, cache_dir=str(cache), stats=Stats())
    out = bytearray()
    res = run_image(
        f"{host}/{repo}", COMMAND, RunOptions(remote=remote, accel=accel, on_output=out.extend, **kw)
    )
    assert res.exit_code == 0 and bytes(out) == EXPECTED, bytes(out)
    if not keep:
        shutil.rmtree(cache, ignore_errors=True)
    t = res.timings
    return {
        "total": t["first_output"],
        "resolve": t["resolve"],
        "server": t["server"] - t["resolve"],
        "boot+run": t["first_output"] - t["server"],
        # on-demand reads waiting on the registry, summed (the network's share of the boot)
        "waited": (res.stats.get("timers") or {}).get("waited", 0.0),
        "server_requests": res.stats.get("requests", 0),
        "server_bytes": res.stats.get("bytes_fetched", 0),
    }


def through_proxy(upstream: str, delay: str, rate: str, fn) -> dict:
    proc, host = slow_proxy.start(upstream, delay=delay, rate=rate)
    try:
        result = fn(host)
    finally:
        counts = slow_proxy.stop(proc).split()
    # "requests N bytes M"
    result["requests"] = int(counts[counts.index("requests") + 1])
    result["bytes"] = int(counts[counts.index("bytes") + 1])
    return result


def converted_layout(layout: Path, cache: Path, *, algorithm: str, block_size: int, say) -> Path:
    """``obd convert`` of the plain layout ``layout`` into an OCI layout (tag ``obd``), cached.

    With convert's defaults the result is ``CACHE/oci/debian-python-obd-default``, the image
    ``bench/bench_open.py`` and ``bench/bench_startup.py`` build too.
    """
    default = algorithm == CONVERT_DEFAULTS.algorithm and block_size == CONVERT_DEFAULTS.block_size
    suffix = "default" if default else f"{algorithm}-{block_size >> 10}k"
    out = cache / "oci" / f"{layout.name}-obd-{suffix}"
    index = out / "index.json"
    if index.is_file() and index.stat().st_mtime >= (layout / "index.json").stat().st_mtime:
        return out
    say(f"converting {layout} with obd convert ({algorithm}, {block_size >> 10} KiB blocks)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    opts = ConvertOptions(algorithm=algorithm, block_size=block_size, cache_dir=str(cache / "convert"))
    convert_image(f"oci:{layout}:latest", f"oci:{tmp}:obd", opts)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def layout_bytes(layout: Path, tag_index: int = 0) -> int:
    """The compressed size of the layers of the image an OCI layout's index lists first."""
    blobs = layout / "blobs" / "sha256"
    digest = json.loads((layout / "index.json").read_text())["manifests"][tag_index]["digest"]
    return sum(d["size"] for d in json.loads((blobs / digest[7:]).read_bytes())["layers"])


def push_plain_index(client: RegistryClient, host: str, cache: Path) -> int:
    """Build the plain image's index (``obd index --link oci-lazy``) and push it; its size."""
    opts = RemoteOptions(insecure=True, cache_dir=str(cache), quiet=True)
    ref = parse_reference(f"{host}/bench/python:oci")
    image = default_runner().run(client.get_image(ref), 120)
    metas = ensure_meta(ref, image, opts)
    pushed = default_runner().run(push_index_artifact(client, ref, image, metas), 600)
    default_runner().run(
        push_link(client, ref, image, {image.manifest_digest: pushed.digest}, "oci-lazy"), 120
    )
    shutil.rmtree(cache, ignore_errors=True)
    return pushed.bytes


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--links", default="25ms:100Mbit,50ms:20Mbit", help="DELAY:RATE,... (default: both targets)"
    )
    ap.add_argument("--runs", type=int, default=1, help="runs per case (medians are reported)")
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="where built images are cached")
    ap.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"cases to run besides (a) and (d), comma-separated from {','.join(CASES)} (default: all)",
    )
    ap.add_argument(
        "--layout",
        default="converted",
        choices=("converted", "single"),
        help="the overlaybd image: obd convert of the five-layer plain image (default, what users get), "
        "or one mke2fs -d layer of the whole root",
    )
    ap.add_argument(
        "--compress",
        default=CONVERT_DEFAULTS.algorithm,
        choices=("lz4", "zstd"),
        help=f"ZFile codec of the overlaybd layers (default {CONVERT_DEFAULTS.algorithm}, as obd convert)",
    )
    ap.add_argument(
        "--block-size",
        type=int,
        default=CONVERT_DEFAULTS.block_size >> 10,
        metavar="KIB",
        help=f"ZFile block size (default {CONVERT_DEFAULTS.block_size >> 10}, as obd convert)",
    )
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="also (b) without the ext4 metadata prefetch, and without the start-up prefetch "
        "(the command's path, ELF loader and libraries)",
    )
    ap.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = ap.parse_args()
    cases = {c for c in args.cases.split(",") if c}
    if cases - set(CASES):
        ap.error(f"--cases: unknown {','.join(sorted(cases - set(CASES)))}; choose from {','.join(CASES)}")
    if "c-accel" in cases or "c" in cases:
        cases.add("b")  # they replay the trace (b) records
    if "f" in cases:
        cases.add("e")

    say = lambda m: print(f"# {m}", flush=True)  # noqa: E731
    cache = Path(args.cache_dir)
    root = debian_python_rootfs(cache, progress=say)
    layout = plain_oci_layout(root, cache, name="debian-python", layers=5, config=python_config())
    raw = raw_ext4(root, cache, name="debian-python")
    plain_bytes = layout_bytes(layout)
    if args.layout == "single":
        layer = overlaybd_layer(
            root, cache, name="debian-python", compress=args.compress, block_size=args.block_size << 10
        )
        converted = None
        obd_bytes = layer.stat().st_size
        what = f"one overlaybd layer ({args.compress}, {args.block_size} KiB blocks)"
    else:
        converted = converted_layout(
            layout, cache, algorithm=args.compress, block_size=args.block_size << 10, say=say
        )
        obd_bytes = layout_bytes(converted)
        what = f"obd convert's image ({args.compress}, {args.block_size} KiB blocks)"
    say(f"{what}: {obd_bytes / MB:.1f} MB; plain OCI layers {plain_bytes / MB:.1f} MB")
    assets = ensure_assets(progress=say)
    accel = resolve_accel(assets, args.accel)
    work = Path(tempfile.mkdtemp(prefix="obd-coldstart-"))
    results: dict = {"accel": accel, "links": {}}
    try:
        with LocalRegistry(work / "registry") as reg:
            runner = default_runner()
            client = RegistryClient(insecure=True)
            if converted is None:
                push_image([layer], f"{reg.host}/bench/python:obd", config=python_config(), insecure=True)
            else:
                runner.run(push_layout(client, f"oci:{converted}:obd", f"{reg.host}/bench/python:obd"), 600)
            runner.run(push_layout(client, f"oci:{layout}:latest", f"{reg.host}/bench/python:oci"), 600)
            say(f"images pushed to {reg.url}; accelerator {accel}")
            if "e" in cases:
                index_bytes = push_plain_index(client, reg.host, work / "index-cache")
                say(f"plain image's index artifact ({index_bytes} bytes) linked as bench/python:oci-lazy")

            results["floor"] = {}
            obd_tag, plain_tag, lazy_cache = "bench/python:obd", "bench/python:oci-lazy", work / "cache"
            for link in args.links.split(","):
                delay, rate = link.split(":")
                runs: dict[str, list[dict]] = {
                    "a": [],
                    "b": [],
                    "c": [],
                    "c-accel": [],
                    "b-nometa": [],
                    "b-noexec": [],
                    "w": [],
                    "e": [],
                    "f": [],
                }

                def go(fn, delay=delay, rate=rate) -> dict:
                    return through_proxy(reg.url, delay, rate, fn)

                # the floor is measured in every round, beside the cases: this machine's boot time
                # drifts by more than the distances to the floor that issue 17 sets
                floors: list[float] = []
                for i in range(max(1, args.runs)):
                    floors.append(floor(assets, raw, accel))
                    trace = str(work / f"boot-{i}.trace")
                    runs["a"].append(
                        go(lambda h, i=i: full_pull(assets, h, "bench/python:oci", work / f"pull{i}", accel))
                    )
                    if "b" in cases:
                        runs["b"].append(
                            go(lambda h, t=trace: lazy(h, obd_tag, lazy_cache, accel, record_trace=t))
                        )
                    if "c" in cases:
                        runs["c"].append(go(lambda h, t=trace: lazy(h, obd_tag, lazy_cache, accel, trace=t)))
                    if "c-accel" in cases:
                        # the same trace shipped in the image as an acceleration layer (obd trace attach)
                        accel_tag = f"bench/python:obd-accel-{i}"
                        obd_ref = f"{reg.host}/{obd_tag}"
                        trace_bytes = Path(trace).read_bytes()
                        runner.run(
                            push_trace_image(client, obd_ref, trace_bytes, f"{reg.host}/{accel_tag}"), 120
                        )
                        runs["c-accel"].append(go(lambda h, tag=accel_tag: lazy(h, tag, lazy_cache, accel)))
                    if "w" in cases:
                        # warm: the block cache a first run (straight to the registry) left
                        warm_cache = work / "warm-cache"
                        lazy(reg.host, obd_tag, warm_cache, accel, keep=True)
                        runs["w"].append(go(lambda h, c=warm_cache: lazy(h, obd_tag, c, accel, fresh=False)))
                    plain_trace = str(work / f"plain-{i}.trace")
                    if "e" in cases:
                        runs["e"].append(
                            go(lambda h, t=plain_trace: lazy(h, plain_tag, lazy_cache, accel, record_trace=t))
                        )
                    if "f" in cases:
                        runs["f"].append(
                            go(lambda h, t=plain_trace: lazy(h, plain_tag, lazy_cache, accel, trace=t))
                        )
                    if args.ablation:
                        runs["b-nometa"].append(
                            go(lambda h: lazy(h, obd_tag, lazy_cache, accel, prefetch_meta=False))
                        )
                        runs["b-noexec"].append(
                            go(lambda h: lazy(h, obd_tag, lazy_cache, accel, prefetch_exec=False))
                        )
                results["links"][link] = runs
                results["floor"][link] = floors
                d = statistics.median(floors)
                print(
                    f"\n(d) floor, boot + run from a local ext4 file, one per round: {d:.2f} s "
                    f"(runs: {', '.join(f'{x:.2f}' for x in floors)})"
                )
                report(link, runs, d, plain_bytes, rtt=_seconds(delay), bandwidth=_bits(rate))
            runner.run(client.aclose(), 10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _seconds(delay: str) -> float:
    """``50ms`` -> 0.05."""
    return float(delay.removesuffix("ms")) / 1000


def _bits(rate: str) -> float:
    """``20Mbit`` -> 20e6 (bits per second)."""
    return float(rate.removesuffix("Mbit")) * 1e6


def report(
    link: str, runs: dict[str, list[dict]], d: float, plain_bytes: int, *, rtt: float, bandwidth: float
) -> None:
    """The table of one link. ``limit`` is the physical limit of each case (issue 17): the floor,
    plus the bytes it fetched at the link's bandwidth, plus one round trip."""
    a = median(runs["a"], "total")
    print(f"\nlink {link.replace(':', ' + ')}/s  (medians of {len(runs['a'])} run(s))")
    print(
        f"  {'case':<46} {'first output':>12} {'vs (a)':>7} {'fetched':>10} {'requests':>9} "
        f"{'vs floor':>9} {'limit':>8}"
    )
    rows = [
        ("a", "(a) pull + extract + mke2fs + boot + run"),
        ("b", "(b) obd run, lazy, cold cache"),
        ("b-nometa", "(b') obd run, lazy, no metadata prefetch"),
        ("b-noexec", "(b'') (b) without the start-up prefetch"),
        ("c", "(c) obd run + recorded trace, cold cache"),
        ("c-accel", "(c') the trace as an acceleration layer"),
        ("w", "(w) (b) again, warm block cache"),
        ("e", "(e) obd run of the plain image, index in reg."),
        ("f", "(f) (e) + recorded trace"),
    ]
    for key, label in rows:
        if not runs[key]:
            continue
        t = median(runs[key], "total")
        fetched = median(runs[key], "bytes")
        limit = d + fetched * 8 / bandwidth + rtt
        print(
            f"  {label:<46} {t:>10.2f} s {a / t:>6.1f}× {fetched / MB:>7.1f} MB "
            f"{median(runs[key], 'requests'):>9.0f} {t - d:>+7.2f} s {limit:>6.2f} s"
        )
    print(f"  {'(d) floor: boot + run from a local disk':<46} {d:>10.2f} s {a / d:>6.1f}×")
    steps = runs["a"][0]
    print(
        "  (a) steps: " + ", ".join(f"{k} {steps[k]:.2f} s" for k in ("pull", "extract", "mkfs", "boot+run"))
    )
    for key in ("b", "c", "w", "e", "f"):
        if not runs[key]:
            continue
        r = runs[key][0]
        print(
            f"  ({key}) steps: resolve {r['resolve']:.2f} s, nbd server {r['server']:.2f} s, "
            f"boot to output {r['boot+run']:.2f} s; guest reads waited {median(runs[key], 'waited'):.2f} s"
        )
    if runs["e"]:
        e = median(runs["e"], "total")
        share = median(runs["e"], "bytes") / plain_bytes
        plain = f"(e) {a / e:.1f}× (a), fetched {share:.0%} of the layers"
        met = a / e >= 3 and share <= 0.25
        if runs["f"]:
            f = median(runs["f"], "total")
            plain += f"; (f) {a / f:.1f}× (a), fetched {median(runs['f'], 'bytes') / plain_bytes:.0%}"
            met = met and a / f >= 5
        verdict = f"{'met' if met else 'MISSED'} — " if link == "50ms:20Mbit" else ""
        print(f"  plain image (issue 14 at 50 ms + 20 Mbit/s: (e) ≥ 3×, (f) ≥ 5×, ≤ 25 %): {verdict}{plain}")
    if not (runs["b"] and runs["c"]):
        return
    b, c = median(runs["b"], "total"), median(runs["c"], "total")
    # issue 7 sets speed-up targets on the slow link and a distance-to-floor target on the fast one
    speedups = f"(b) {a / b:.1f}× (a), (c) {a / c:.1f}× (a)"
    floor = f"(c) - (d) = {c - d:+.2f} s"
    if link == "50ms:20Mbit":
        print(
            f"  targets on this link: (b) ≥ 3× (a): {'met' if a / b >= 3 else 'MISSED'}, "
            f"(c) ≥ 5× (a): {'met' if a / c >= 5 else 'MISSED'} — {speedups}"
        )
    elif link == "25ms:100Mbit":
        print(f"  target on this link: (c) within 1 s of (d): {'met' if c - d <= 1 else 'MISSED'} — {floor}")
    else:
        print(f"  {speedups}; {floor}")


if __name__ == "__main__":
    sys.exit(main())
