"""Argument helpers shared by the sub-commands: naming a stack, reaching registries, progress."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from obd.errors import ObdError
from obd.observability.progress import Progress
from obd.observability.stats import default_stats

LAYERS_HELP = (
    "the image: layer blobs, lowest first (sealed LSMT files, ZFiles holding one, either in overlaybd's tar "
    "envelope); or one overlaybd image in an OCI layout, oci:DIR[:TAG]; or a registry reference such as "
    "registry.example.com/app:1.0 (read lazily)"
)


class _SplitAtDashDash(argparse.ArgumentParser):
    """Sub-parser that keeps everything after ``--`` in ``args.after_dashdash`` instead of parsing it."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        after: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, after = args[:i], args[i + 1 :]
        ns, rest = super().parse_known_args(args, namespace)
        ns.after_dashdash = after
        return ns, rest


def add_dashdash_parser(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """``sub.add_parser(name, **kwargs)`` whose words after ``--`` are kept unparsed in
    ``args.after_dashdash`` (the command ``obd run`` starts, extra arguments ``obd nbd`` gives nbdkit)."""
    saved = sub._parser_class
    sub._parser_class = _SplitAtDashDash
    try:
        parser = sub.add_parser(name, **kwargs)
    finally:
        sub._parser_class = saved
    parser.set_defaults(after_dashdash=[])
    return parser


def add_stack_args(parser: argparse.ArgumentParser, *, layers_required: bool = False) -> None:
    """``IMAGE...``, ``--config`` and ``--upper`` (the ways to name a stack) plus the registry options."""
    parser.add_argument("layers", nargs="+" if layers_required else "*", metavar="IMAGE", help=LAYERS_HELP)
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="an overlaybd config.v1.json (its lowers, and its upper if any) instead of IMAGE arguments",
    )
    parser.add_argument(
        "--upper",
        nargs="+",
        metavar=("DATA", "INDEX"),
        help="an RW layer on top (its data file, and index file unless sparse), opened read-only",
    )
    add_remote_args(parser)


def add_remote_args(parser: argparse.ArgumentParser) -> None:
    """Registry, cache and statistics options for commands that may read remote images."""
    g = parser.add_argument_group("registry images (see docs/registry.md)")
    g.add_argument("--platform", metavar="OS/ARCH", help="platform to pick from a multi-platform image")
    g.add_argument(
        "--insecure-registry",
        metavar="HOST",
        action="append",
        nargs="?",
        const="*",
        help="reach HOST (or, without HOST, every registry) over plain HTTP; repeatable",
    )
    g.add_argument(
        "--creds",
        metavar="USER[:PASSWORD]",
        help="registry credentials (else $OBD_REGISTRY_USER/_PASSWORD, else ~/.docker/config.json)",
    )
    g.add_argument("--no-tls-verify", action="store_true", help="do not verify registry TLS certificates")
    g.add_argument("--ca-file", metavar="PEM", help="extra CA certificates for registry TLS")
    g.add_argument("--cache-dir", metavar="DIR", help="the block cache directory (default: see `obd cache`)")
    g.add_argument("--cache-limit", metavar="SIZE", help="block cache size limit, e.g. 512M, 10G")
    g.add_argument("--no-cache", action="store_true", help="read registry blobs without the persistent cache")
    g.add_argument("--stats", action="store_true", help="print fetch/cache counters and latencies at the end")


def remote_options(args: argparse.Namespace):
    """A :class:`~obd.image.remote.RemoteOptions` from the registry options of ``args``."""
    from obd.cache.store import parse_size
    from obd.image.remote import RemoteOptions, set_default_remote_options
    from obd.registry.auth import Credentials

    creds = None
    if getattr(args, "creds", None):
        user, _, password = args.creds.partition(":")
        creds = Credentials(user, password or os.environ.get("OBD_REGISTRY_PASSWORD", ""), source="flags")
    insecure: bool | tuple[str, ...] = False
    hosts = getattr(args, "insecure_registry", None) or []
    if "*" in hosts:
        insecure = True
    elif hosts:
        insecure = tuple(hosts)
    limit = getattr(args, "cache_limit", None)
    opts = RemoteOptions(
        credentials=creds,
        insecure=insecure,
        tls_verify=not getattr(args, "no_tls_verify", False),
        ca_file=getattr(args, "ca_file", None),
        cache_dir=getattr(args, "cache_dir", None),
        cache_limit=parse_size(limit) if limit else None,
        no_cache=getattr(args, "no_cache", False),
        platform=getattr(args, "platform", None),
    )
    set_default_remote_options(opts)  # for code paths that do not take options explicitly
    return opts


def print_stats(args: argparse.Namespace) -> None:
    """The ``--stats`` block on stderr, if asked for."""
    if getattr(args, "stats", False):
        print(default_stats().format(), file=sys.stderr)


def open_stack_from_args(args: argparse.Namespace, *, readonly: bool = True):
    """The stack ``args`` name (IMAGE..., --config, --upper), local or remote."""
    from obd.image.local import open_config
    from obd.image.resolve import image_config
    from obd.lsmt.rw import open_rw
    from obd.lsmt.stack import Stack

    if args.config and args.layers:
        raise ObdError("give either IMAGE arguments or --config, not both")
    if not args.config and not args.layers and not args.upper:
        raise ObdError("no image given (IMAGE... or --config CONFIG)")
    upper_args = args.upper or []
    if len(upper_args) > 2:
        raise ObdError("--upper takes DATA and optionally INDEX")
    remote = remote_options(args)
    if args.config:
        stack = open_config(args.config, readonly=readonly, remote=remote)
    elif args.layers:
        stack = open_config(
            image_config(args.layers, platform=remote.platform, remote=remote),
            readonly=readonly,
            remote=remote,
        )
    else:
        stack = Stack([])
    if not upper_args:
        return stack
    if stack.upper is not None:
        stack.close()
        raise ObdError("the image already has an upper layer; drop --upper")
    upper = open_rw(upper_args[0], upper_args[1] if len(upper_args) > 1 else None, readonly=readonly)
    return Stack(stack.lowers, upper, name=stack.name)


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def progress(args: argparse.Namespace, label: str, total: int | None = None) -> Progress:
    return Progress(label, total, quiet=getattr(args, "quiet", False))
