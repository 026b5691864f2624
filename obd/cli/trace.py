"""``obd trace``: show or replay a prefetch trace (overlaybd's trace format)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from obd.cli.common import add_remote_args, print_stats, remote_options
from obd.errors import ObdError
from obd.image.acceltrace import load_image_trace
from obd.image.local import open_config
from obd.image.resolve import image_config
from obd.observability.progress import human_bytes
from obd.prefetch.trace import MAX_TRACE_BYTES, TARGET_FILE, load, replay, split_key

DESCRIPTION = """\
A prefetch trace lists the ranges a workload read from each layer of an image (overlaybd's binary
trace format, so traces move between obd and overlaybd). Record one while serving an image:

  nbdkit python frontends/nbd/plugin.py image=REF record-trace=boot.trace     (or obd nbd ... )

then, on a cold machine, prefetch those ranges before or while the workload starts:

  obd trace replay REF boot.trace        many ranged GETs in flight, neighbours coalesced
  nbdkit python frontends/nbd/plugin.py image=REF trace=boot.trace            (replays in background)

  obd trace show boot.trace              what a trace holds

or ship it inside the image, as an overlaybd acceleration layer that every client replays by
itself when it opens the image (obd nbd/mount/run, overlaybd's snapshotter):

  obd trace attach REF boot.trace REF-accel
  obd trace replay REF-accel             (no TRACE: the image's own)
"""

ATTACH_DESCRIPTION = """\
Push registry image REF again as DEST (another tag of the same repository) with TRACE as an
overlaybd acceleration layer on top, replacing one it has: a tar holding the file `trace`,
annotated containerd.io/snapshot/overlaybd/acceleration-layer=yes, as accelerated-container-image's
`ctr record-trace` makes. The device is unchanged; obd (nbd, mount, run) and overlaybd's
snapshotter replay the trace by themselves when they open DEST.

example:
  obd run REG/app:1 --record-trace boot.trace -- ./start
  obd trace attach REG/app:1 boot.trace REG/app:1-accel
  obd run REG/app:1-accel -- ./start          # prefetches what ./start reads
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
    rep.add_argument("trace", metavar="TRACE", nargs="?", help="default: the image's acceleration layer")
    rep.add_argument("--workers", type=int, default=16, metavar="N", help="reads in flight (default 16)")
    add_remote_args(rep)
    rep.set_defaults(func=run_replay)
    att = actions.add_parser(
        "attach",
        help="push a registry image again with a trace as its acceleration layer",
        description=ATTACH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    att.add_argument("image", metavar="REF", help="the overlaybd image the trace was recorded on")
    att.add_argument("trace", metavar="TRACE")
    att.add_argument("dest", metavar="DEST", help="where to push it: another tag of REF's repository")
    add_remote_args(att)
    att.set_defaults(func=run_attach)


def run_show(args: argparse.Namespace) -> int:
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
    for key in sorted(per):
        count, nbytes = per[key]
        layer, file = split_key(key)
        what = " target" if file == TARGET_FILE else f" file {file}" if file else ""
        print(f"  layer {layer:3d}{what:<8} (0 = bottom): {count:7d} records, {human_bytes(nbytes)}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    remote = remote_options(args)
    cfg = image_config(args.image, platform=remote.platform, remote=remote)
    if args.trace:
        records = load(args.trace)
    else:
        found = load_image_trace(cfg, remote)
        if found is None:
            raise ObdError("the image has no acceleration layer: give a TRACE file", path=args.image)
        records = found
    stack = open_config(cfg, readonly=True, remote=remote)
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


def run_attach(args: argparse.Namespace) -> int:
    # lazy: obd.image.assemble pulls the registry client (aiohttp, ~110 ms) into every obd command
    from obd.image.assemble import push_trace_image

    if os.path.getsize(args.trace) > MAX_TRACE_BYTES:
        raise ObdError("too large for a trace", path=args.trace, field="size")
    with open(args.trace, "rb") as f:
        trace = f.read()
    remote = remote_options(args)
    res = remote.runner.run(
        push_trace_image(remote.client(), args.image, trace, args.dest, platform=remote.platform), 600
    )
    print(f"pushed {res.reference}@{res.digest} with {args.trace} as its acceleration layer", file=sys.stderr)
    print_stats(args)
    return 0
