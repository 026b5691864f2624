"""``obd commit``: compact an RW layer into a sealed blob (overlaybd-commit)."""

from __future__ import annotations

import argparse
import sys

from obd.cli.common import progress
from obd.cli.output_args import add_output_args, output_options
from obd.errors import ObdError
from obd.image.local import open_layers
from obd.layer.tools import commit_layer, commit_sealed, commit_warp_layer, seal_layer
from obd.lsmt.rw import open_rw
from obd.lsmt.warp import open_warp_rw
from obd.observability.progress import human_bytes

DESCRIPTION = """\
Commit an RW layer into a sealed, read-only layer blob, as overlaybd-commit does: the live data is
copied in index order and packed right after the header, the index is compacted and padded, and the
result is byte-identical to overlaybd's for the same input and options.

  obd commit DATA INDEX OUT        append-mode RW layer (DATA OUT for a sparse one)
  obd commit --seal DATA INDEX     seal the RW data file in place (overlaybd-commit --seal)
  obd commit --commit-sealed SEALED OUT
                                   re-compact a sealed file (overlaybd-commit --commit_sealed)
  obd commit --turbo-oci FSMETA INDEX OUT
                                   seal a turboOCI layer (overlaybd-commit --turboOCI/--fastoci)

The new layer's uuid is the null uuid unless --uuid is given (overlaybd does not carry the RW
layer's uuid over); its parent is the RW layer's parent unless --parent-uuid is given. Registry
layers are usually written with -z -t (ZFile lz4, 4 KiB blocks, in the tar envelope).

examples:
  obd commit data index layer.commit
  obd commit -z -t --uuid U --parent-uuid P data index overlaybd.commit
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "commit",
        help="commit an RW layer into a sealed blob",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="DATA INDEX OUT (see above)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--seal", action="store_true", help="seal the RW data file in place")
    mode.add_argument("--commit-sealed", action="store_true", help="commit an already sealed file")
    mode.add_argument(
        "--turbo-oci",
        "--fastoci",
        dest="turbo",
        action="store_true",
        help="commit a turboOCI (warp) RW layer: DATA is its fs-meta file; remote mappings stay "
        "pointing into the target (overlaybd-commit --turboOCI)",
    )
    add_output_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    files = args.files
    if args.seal:
        if len(files) not in (1, 2):
            raise ObdError("--seal takes DATA [INDEX]")
        layer = open_rw(files[0], files[1] if len(files) > 1 else None)
        trailer = seal_layer(layer)
        print(f"sealed {files[0]} in place: {trailer.index_size} index entries", file=sys.stderr)
        return 0
    opts = output_options(args)
    if args.turbo:
        if len(files) != 3:
            raise ObdError("--turbo-oci takes FSMETA INDEX OUT")
        warp = open_warp_rw(files[1], files[0], readonly=True)
        try:
            with progress(args, "commit") as prog:
                res = commit_warp_layer(
                    warp,
                    files[2],
                    uuid=args.uuid,
                    parent_uuid=args.parent_uuid,
                    options=opts,
                    progress=prog.update,
                )
        finally:
            warp.close()
    elif args.commit_sealed:
        if len(files) != 2:
            raise ObdError("--commit-sealed takes SEALED OUT")
        stack = open_layers([files[0]])
        try:
            with progress(args, "commit") as prog:
                res = commit_sealed(
                    stack,
                    files[1],
                    uuid=args.uuid,
                    parent_uuid=args.parent_uuid,
                    message=args.message,
                    options=opts,
                    progress=prog.update,
                )
        finally:
            stack.close()
    else:
        if len(files) == 3:
            data, index, out = files
        elif len(files) == 2:
            (data, out), index = files, None
        else:
            raise ObdError("expected DATA INDEX OUT (or DATA OUT for a sparse layer)")
        layer = open_rw(data, index, readonly=True)
        try:
            with progress(args, "commit") as prog:
                res = commit_layer(
                    layer,
                    out,
                    uuid=args.uuid,
                    parent_uuid=args.parent_uuid,
                    message=args.message,
                    options=opts,
                    progress=prog.update,
                )
        finally:
            layer.close()
    if not args.quiet:
        print(
            f"wrote {res.path}: {human_bytes(res.file_bytes)}, {res.info.entries} index entries, "
            f"{human_bytes(res.info.data_bytes)} of data, uuid {res.info.header.uuid}",
            file=sys.stderr,
        )
    return 0
