"""Options shared by commands that write a sealed blob: compression, block size, tar envelope."""

from __future__ import annotations

import argparse

from obd.errors import ObdError
from obd.layer.tools import OutputOptions

BLOCK_SIZES_KIB = (4, 8, 16, 32, 64)


def add_output_args(parser: argparse.ArgumentParser, *, compress_default: bool = False) -> None:
    g = parser.add_argument_group("output")
    if compress_default:
        g.add_argument(
            "--no-compress",
            dest="compress",
            action="store_false",
            help="write a plain LSMT blob instead of a ZFile",
        )
    else:
        g.add_argument("-z", "--compress", action="store_true", help="ZFile-compress the output")
    g.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile codec (default lz4)")
    g.add_argument(
        "--bs",
        type=int,
        default=4,
        metavar="KIB",
        choices=BLOCK_SIZES_KIB,
        help="ZFile block size in KiB: 4, 8, 16, 32 or 64 (default 4)",
    )
    g.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="no per-block CRC32C in the ZFile (overlaybd always writes one)",
    )
    g.add_argument("-t", "--tar", action="store_true", help="wrap the output in overlaybd's tar envelope")
    g.add_argument("--uuid", metavar="UUID", help="uuid of the new layer (default: the null uuid)")
    g.add_argument("--parent-uuid", metavar="UUID", help="parent uuid (default: the source's)")
    g.add_argument("-m", "--message", default="", help="commit message stored in the user tag (≤ 256 bytes)")


def output_options(args: argparse.Namespace, *, overwrite_header: bool = True) -> OutputOptions:
    """``overwrite_header``: rewrite the ZFile header at the end (commit -z does, overlaybd-merge not)."""
    if not args.compress and (args.algorithm != "lz4" or args.bs != 4):
        raise ObdError("--algorithm/--bs need a compressed output (-z)")
    return OutputOptions(
        compress=args.algorithm if args.compress else None,
        block_size=args.bs * 1024,
        verify=args.verify,
        tar=args.tar,
        overwrite_header=overwrite_header,
    )
