"""``obd trace``: show or replay a prefetch trace (overlaybd's trace format)."""

from __future__ import annotations

import argparse
import json
import sys

from obd.cli.common import add_remote_args, print_stats, remote_options
from obd.progress import human_bytes

DESCRIPTION = """\
A prefetch trace lists the ranges a workload read from each layer of an image (overlaybd's binary
trace format, so traces move between obd and overlaybd). Record one while serving an image:

  nbdkit python frontends/nbd/plugin.py image=REF record-trace=boot.trace     (or obd nbd ... )

then, on a cold machine, prefetch those ranges before or while the workload starts:

  obd trace replay REF boot.trace        many ranged GETs in flight, neighbours coalesced
  nbdkit python frontends/nbd/plugin.py image=REF trace=boot.trace            (replays in background)

  obd trace show boot.trace              what a trace holds
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace",
        help="show or replay a prefetch trace",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="summarise a trace file")
    show.add_argument("trace", metavar="TRACE")
    show.add_argument("--json", action="store_true", help="every record as JSON")
    show.set_defaults(func=run_show)
    rep = actions.add_parser("replay", help="prefetch a trace's ranges of an image into the cache")
    rep.add_argument(
        "image", metavar="IMAGE", help="the image the trace was recorded on (usually a registry ref)"
    )
    rep.add_argument("trace", metavar="TRACE")
    rep.add_argument("--workers", type=int, default=16, metavar="N", help="reads in flight (default 16)")
    add_remote_args(rep)
    rep.set_defaults(func=run_replay)


def run_show(args: argparse.Namespace) -> int:
    from obd.trace import load

    records = load(args.trace)
    if args.json:
        json.dump([{"layer": la, "offset": o, "count": n} for la, o, n in records], sys.stdout)
        sys.stdout.write("\n")
        return 0
    per: dict[int, list[int]] = {}
    for layer, _off, n in records:
        per.setdefault(layer, [0, 0])
        per[layer][0] += 1
        per[layer][1] += n
    total = sum(n for _la, _o, n in records)
    print(f"{args.trace}: {len(records)} read records, {human_bytes(total)} ({total} bytes)")
    for layer in sorted(per):
        count, nbytes = per[layer]
        print(f"  layer {layer:3d} (0 = bottom): {count:7d} records, {human_bytes(nbytes)}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from obd.image.local import open_config
    from obd.image.resolve import image_config
    from obd.trace import load, replay

    records = load(args.trace)
    remote = remote_options(args)
    stack = open_config(
        image_config(args.image, platform=remote.platform, remote=remote), readonly=True, remote=remote
    )
    try:
        res = replay(stack, records, workers=args.workers)
    finally:
        stack.close()
    print(
        f"replayed {res.records} records as {res.ranges} reads, {human_bytes(res.bytes)} "
        f"in {res.seconds:.2f} s",
        file=sys.stderr,
    )
    print_stats(args)
    return 0
