"""Argument helpers shared by the sub-commands."""

from __future__ import annotations

import argparse

from obd.errors import ObdError
from obd.image.local import open_config, open_layers, open_oci_layout
from obd.lsmt.rw import open_rw
from obd.lsmt.stack import Stack
from obd.progress import Progress

LAYERS_HELP = (
    "layer blobs, lowest first: sealed LSMT files, ZFiles holding one, either in overlaybd's tar envelope; "
    "or one overlaybd image in an OCI layout, oci:DIR[:TAG]"
)


def add_stack_args(parser: argparse.ArgumentParser, *, layers_required: bool = False) -> None:
    """``LAYER...``, ``--config`` and ``--upper``: the ways to name a stack."""
    parser.add_argument(
        "layers", nargs="*" if not layers_required else "+", metavar="LAYER", help=LAYERS_HELP
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="an overlaybd config.v1.json (its lowers, and its upper if any) instead of LAYER arguments",
    )
    parser.add_argument(
        "--upper",
        nargs="+",
        metavar=("DATA", "INDEX"),
        help="an RW layer on top (its data file, and index file unless sparse), opened read-only",
    )


def open_stack_from_args(args: argparse.Namespace, *, readonly: bool = True) -> Stack:
    if args.config and args.layers:
        raise ObdError("give either LAYER arguments or --config, not both")
    if not args.config and not args.layers and not args.upper:
        raise ObdError("no layers given (LAYER... or --config CONFIG)")
    upper_args = args.upper or []
    if len(upper_args) > 2:
        raise ObdError("--upper takes DATA and optionally INDEX")
    if args.config:
        stack = open_config(args.config, readonly=readonly)
        if upper_args:
            if stack.upper is not None:
                stack.close()
                raise ObdError("the config already has an upper; drop --upper")
            upper = open_rw(upper_args[0], upper_args[1] if len(upper_args) > 1 else None, readonly=readonly)
            lowers = stack.lowers
            return Stack(lowers, upper, name=stack.name)
        return stack
    upper = None
    if upper_args:
        upper = open_rw(upper_args[0], upper_args[1] if len(upper_args) > 1 else None, readonly=readonly)
    if any(str(x).startswith("oci:") for x in args.layers):
        if len(args.layers) != 1:
            raise ObdError("an oci:DIR[:TAG] image is a whole stack; give it alone")
        return open_oci_layout(args.layers[0], upper=upper)
    return open_layers(args.layers, upper=upper)


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def progress(args: argparse.Namespace, label: str, total: int | None = None) -> Progress:
    return Progress(label, total, quiet=getattr(args, "quiet", False))
