"""``obd create``: a new, empty RW layer (overlaybd-create)."""

from __future__ import annotations

import argparse
import sys

from obd.errors import ObdError
from obd.layer.tools import create_layer, gib

DESCRIPTION = """\
Create an empty writable (RW) layer, as overlaybd-create does.

Append mode (default) uses two files: DATA (a header, then sectors appended in write order) and
INDEX (a header, then one record per write or discard). Sparse mode (-s) keeps the device image
itself in DATA at offset 4096 and needs no index: the file's holes are the unmapped ranges (INDEX
is created empty, as overlaybd does). A new layer gets a random uuid unless --uuid is given.

examples:
  obd create data index 64            # 64 GiB, append mode
  obd create -s -u PARENT_UUID data index 64
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "create",
        help="create an empty RW layer",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", help="data file to create")
    p.add_argument("index", metavar="INDEX", help="index file to create")
    p.add_argument(
        "vsize", metavar="VSIZE_GB", type=float, help="virtual size in GiB (0 = inherit from lowers)"
    )
    p.add_argument("-s", "--sparse", action="store_true", help="sparse RW layer (overlaybd-create -s)")
    p.add_argument("-u", "--parent-uuid", metavar="UUID", help="parent layer's uuid")
    p.add_argument("--uuid", metavar="UUID", help="this layer's uuid (default: random)")
    p.add_argument("--bytes", action="store_true", help="VSIZE_GB is a byte count, not GiB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vsize = int(args.vsize) if args.bytes else gib(args.vsize)
    if args.vsize < 0:
        raise ObdError("the virtual size must not be negative", field="VSIZE_GB", value=args.vsize)
    try:
        layer = create_layer(
            args.data, args.index, vsize, sparse=args.sparse, uuid=args.uuid, parent_uuid=args.parent_uuid
        )
    except ValueError as e:
        raise ObdError(str(e)) from e
    print(
        f"created {'sparse' if layer.sparse else 'append'} RW layer {args.data} "
        f"(uuid {layer.uuid}, {vsize} bytes)",
        file=sys.stderr,
    )
    layer.close()
    return 0
