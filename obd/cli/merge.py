"""``obd merge``: flatten a stack into one sealed layer (overlaybd-merge)."""

from __future__ import annotations

import argparse
import sys

from obd.cli.common import add_stack_args, open_stack_from_args, print_stats, progress
from obd.cli.output_args import add_output_args, output_options
from obd.layer.tools import merge_stack
from obd.observability.progress import human_bytes

DESCRIPTION = """\
Merge a stack of layers into one sealed layer, as overlaybd-merge does: for every sector the
top-most layer wins, the data is copied once, and the result reads exactly like the stack. Like
overlaybd-merge the output is ZFile-compressed (lz4) unless --no-compress is given; its virtual
size comes from the top layer and its parent uuid from the bottom one. Each index entry keeps the
number of the layer it came from (0 = top) in its tag byte, which readers ignore.

examples:
  obd merge L0.commit L1.commit L2.commit -o merged.commit
  obd merge --config config.v1.json -o merged.commit --no-compress
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="flatten a stack into one sealed layer",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_stack_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the merged layer to write")
    add_output_args(p, compress_default=True)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    stack = open_stack_from_args(args, readonly=True)
    try:
        with progress(args, "merge") as prog:
            res = merge_stack(
                stack,
                args.output,
                uuid=args.uuid,
                parent_uuid=args.parent_uuid,
                message=args.message,
                options=output_options(args, overwrite_header=False),
                progress=prog.update,
            )
    finally:
        stack.close()
    if not args.quiet:
        print(
            f"wrote {res.path}: {human_bytes(res.file_bytes)}, {res.info.entries} index entries, "
            f"{human_bytes(res.info.data_bytes)} of data",
            file=sys.stderr,
        )
    print_stats(args)
    return 0
