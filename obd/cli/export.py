"""``obd export``: write the merged virtual device of a stack to a sparse raw image."""

from __future__ import annotations

import argparse
import sys

from obd.cli.common import add_progress_arg, add_stack_args, open_stack_from_args, print_stats, progress
from obd.layer.export import export_stack, stream_stack
from obd.observability.progress import human_bytes

#: An export reads every layer start to end: with readahead a few large GETs fetch a layer, without it
#: one GET per ZFile span (~530 for a 640 KB layer).
READAHEAD = "4M"

DESCRIPTION = """\
Write the merged virtual block device of a layer stack to OUT as a raw disk image.

The image is sparse: it has the device's full size, but only ranges that some layer maps to data
are written; unmapped and discarded (trimmed) ranges stay holes. `-o -` streams every byte to
standard output instead (zeros included). A registry image is read lazily, in order, with 4 MiB
of readahead per range GET (--readahead): a layer costs a few large GETs, not one per ZFile block.

examples:
  obd export base.commit layer1.commit -o disk.img
  obd export --config config.v1.json -o disk.img
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a stack's merged device as a sparse raw image",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_stack_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the raw image to write (- = stdout)")
    p.add_argument(
        "--readahead",
        metavar="SIZE",
        default=READAHEAD,
        help=f"registry readahead per miss: a size (default: {READAHEAD}), 0 (none) or auto (as obd run); "
        "an export reads the whole device in order, so each GET brings the following bytes of the blob too",
    )
    add_progress_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    stack = open_stack_from_args(args, readonly=True)
    try:
        if args.output == "-":
            with progress(args, "export") as prog:
                stream_stack(stack, sys.stdout.buffer, progress=prog)
            return 0
        with progress(args, "export") as prog:
            res = export_stack(stack, args.output, progress=prog)
    finally:
        stack.close()
    if not args.quiet:
        print(
            f"wrote {res.path}: {human_bytes(res.virtual_size)} device ({res.virtual_size} bytes), "
            f"{human_bytes(res.data_bytes)} of data in {res.data_extents} extents "
            f"({human_bytes(res.written_bytes)} written, its blocks of zeros left holes), "
            f"{human_bytes(res.zero_bytes)} trimmed, the rest unmapped (holes)",
            file=sys.stderr,
        )
    print_stats(args)
    return 0
