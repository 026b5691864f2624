"""``obd pull``: download a registry image's layers into the block cache."""

from __future__ import annotations

import argparse
import sys

from obd.cache.store import parse_size
from obd.cli.common import add_remote_args, print_stats, progress, remote_options
from obd.errors import ObdError
from obd.observability.progress import human_bytes
from obd.oci.layout import parse_oci_reference

DESCRIPTION = """\
Download every layer blob of an overlaybd image from its registry into obd's block cache, so that
later reads (obd export, obd nbd, obd run) need no network. Nothing is unpacked: the cache holds
the blobs exactly as the registry serves them. Several ranged GETs run in parallel; --max-rate
caps the average download rate; each blob's digest is verified once complete.

obd reads images lazily anyway; pull is for warming a cache ahead of time (e.g. before going
offline, or in the background while a VM starts).

With a destination oci:DIR[:TAG] the image is also written into that OCI image layout, byte for
byte (same manifest digest; TAG defaults to the reference's tag): an offline copy that obd export,
nbd, mount and run read as oci:DIR:TAG, and that `obd push oci:DIR:TAG REF` sends back.

examples:
  obd pull registry.example.com/app:1.0
  obd pull registry.example.com/app:1.0 oci:./images:app
  obd pull --max-rate 20M --parallel 2 localhost:5000/app:1.0 --insecure-registry localhost:5000
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="download an image's layers into the block cache",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("reference", metavar="REF", help="the image: [HOST/]REPO[:TAG|@DIGEST]")
    p.add_argument(
        "destination", nargs="?", metavar="oci:DIR[:TAG]", help="also write the image into this OCI layout"
    )
    p.add_argument("--parallel", type=int, default=4, metavar="N", help="ranged GETs in flight (default 4)")
    p.add_argument("--max-rate", metavar="RATE", help="average download cap in bytes/s, e.g. 20M")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_remote_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: obd.image.remote costs ~80 ms to import into every obd command that lists its options
    from obd.image.remote import pull_image, pull_to_layout

    opts = remote_options(args)
    rate = parse_size(args.max_rate) if args.max_rate else None
    layout = tag = None
    if args.destination is not None:
        if not args.destination.startswith("oci:"):
            raise ObdError("the destination must be an OCI layout, oci:DIR[:TAG]", value=args.destination)
        layout, tag = parse_oci_reference(args.destination)
    with progress(args, "pull") as prog:

        def report(done: int, total: int) -> None:
            prog.total = total
            prog.update(done)

        kwargs = {"parallel": args.parallel, "max_rate": rate, "progress": report}
        if layout is None:
            res = pull_image(args.reference, opts, **kwargs)
        else:
            res = pull_to_layout(args.reference, opts, layout, tag=tag, **kwargs)
    if not args.quiet:
        print(
            f"pulled {res.reference}: {res.layers} layers, {human_bytes(res.total_bytes)} "
            f"({human_bytes(res.fetched_bytes)} fetched, the rest already cached) in {res.seconds:.1f} s; "
            "digests verified",
            file=sys.stderr,
        )
        if layout is not None:
            print(f"written to the OCI layout {layout} ({res.manifest_digest})", file=sys.stderr)
    print_stats(args)
    return 0
