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


#: Title of the registry option group, the same in every command's --help.
REGISTRY_GROUP = "registry options (see docs/registry.md)"


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off) as Go's flag package spells booleans."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def registry_host(text: str) -> str:
    """A ``HOST[:PORT]`` for ``--insecure-registry``; an image reference there is refused, so that
    ``--insecure-registry HOST/app:1`` cannot silently take the image as the host."""
    if not text or text.startswith("-") or "/" in text or "@" in text:
        raise argparse.ArgumentTypeError(
            f"takes a registry HOST[:PORT], not {text!r}: write `--insecure-registry HOST IMAGE`, "
            "or `--tls-verify=false` for every registry"
        )
    return text


def add_remote_args(parser: argparse.ArgumentParser, *, stats: bool = True) -> None:
    """The registry option group every command that takes an image has: how to reach registries,
    the block cache, and (unless ``stats`` is False) the ``--stats`` counters."""
    g = parser.add_argument_group(REGISTRY_GROUP)
    g.add_argument("--platform", metavar="OS/ARCH", help="platform to pick from a multi-platform image")
    g.add_argument(
        "--insecure-registry",
        metavar="HOST",
        action="append",
        type=registry_host,
        help="as in docker: reach registry HOST[:PORT] over HTTPS without certificate checks, or over "
        "plain HTTP when it does not speak TLS; repeatable",
    )
    g.add_argument(
        "--tls-verify",
        metavar="BOOL",
        type=parse_bool,
        default=None,
        help="as in skopeo: true (the default) requires HTTPS and verified certificates; "
        "--tls-verify=false uses HTTPS without certificate checks, and plain HTTP for a registry "
        "that does not speak TLS",
    )
    g.add_argument(
        "--no-tls-verify",
        dest="tls_verify",
        action="store_false",
        default=None,
        help="the same as --tls-verify=false",
    )
    g.add_argument(
        "--creds",
        metavar="USER[:PASSWORD]",
        help="registry credentials (else $OBD_REGISTRY_USER/_PASSWORD, else ~/.docker/config.json)",
    )
    g.add_argument("--ca-file", metavar="PEM", help="extra CA certificates for registry TLS")
    g.add_argument(
        "--hosts-dir",
        metavar="DIR",
        action="append",
        help="containerd-style hosts.toml directory for mirrors and per-host TLS; repeatable "
        "(default: /etc/containerd/certs.d if present, then ~/.config/obd/certs.d)",
    )
    g.add_argument(
        "--proxy", metavar="URL", help="HTTP proxy for registry requests (default: $HTTP_PROXY/$HTTPS_PROXY)"
    )
    g.add_argument(
        "--p2p-proxy",
        metavar="URL",
        help="Dragonfly dfdaemon's proxy (e.g. http://127.0.0.1:65001) for blob reads, with a health "
        "check and direct reads while it is down (docs/fleet.md)",
    )
    g.add_argument(
        "--p2p-ping-url",
        metavar="URL",
        help="health check of --p2p-proxy, a URL answering 2xx (default: a TCP connect to the proxy)",
    )
    g.add_argument(
        "--p2p-address",
        metavar="URL",
        help="overlaybd's p2pConfig.address: blob URLs become URL/<blob URL> while it is reachable",
    )
    g.add_argument("--cache-dir", metavar="DIR", help="the block cache directory (default: see `obd cache`)")
    g.add_argument("--cache-limit", metavar="SIZE", help="block cache size limit, e.g. 512M, 10G")
    g.add_argument("--no-cache", action="store_true", help="read registry blobs without the persistent cache")
    g.add_argument(
        "--verify",
        choices=("require", "auto", "off"),
        default="auto",
        help="check every block read against the digest tables the manifest pins (docs/verify.md): "
        "auto (the default) where the image has them, require refuses an image without, off never",
    )
    g.add_argument(
        "--verify-signature",
        metavar="KEY",
        help="refuse an image whose manifest has no cosign signature that the PEM public key KEY "
        "(cosign.pub) verifies",
    )
    g.add_argument(
        "--allow-referrers",
        action="store_true",
        help="for a plain image, use an index artifact (`obd index --push`) found through the referrers "
        "tag fallback sha256-<digest>, a weak, mutable link (docs/index.md)",
    )
    if stats:
        g.add_argument(
            "--stats", action="store_true", help="print fetch/cache counters and latencies at the end"
        )
        g.add_argument(
            "--profile",
            action="store_true",
            help="print where the time went at the end: resolving the image, opening its layers, range "
            "GETs in flight, requests and bytes on the wire (docs/performance.md)",
        )


def _insecure(args: argparse.Namespace) -> bool | tuple[str, ...]:
    """True (every registry over plain HTTP: ``--insecure-registry '*'``) or docker's insecure
    registries (HTTPS without certificate checks, then plain HTTP)."""
    hosts = getattr(args, "insecure_registry", None) or []
    if "*" in hosts:
        return True
    return tuple(hosts)


def remote_options(args: argparse.Namespace):
    """A :class:`~obd.image.remote.RemoteOptions` from the registry options of ``args``."""
    # the registry client costs ~80 ms to import: only once a command runs
    from obd.cache.store import parse_size
    from obd.image.remote import RemoteOptions, parse_readahead, set_default_remote_options
    from obd.registry.auth import Credentials
    from obd.registry.blob import READAHEAD_AUTO
    from obd.registry.dragonfly import P2PConfig

    creds = None
    if getattr(args, "creds", None):
        user, _, password = args.creds.partition(":")
        creds = Credentials(user, password or os.environ.get("OBD_REGISTRY_PASSWORD", ""), source="flags")
    limit = getattr(args, "cache_limit", None)
    opts = RemoteOptions(
        credentials=creds,
        insecure=_insecure(args),
        tls_verify=getattr(args, "tls_verify", None) is not False,
        ca_file=getattr(args, "ca_file", None),
        cache_dir=getattr(args, "cache_dir", None),
        cache_limit=parse_size(limit) if limit else None,
        no_cache=getattr(args, "no_cache", False),
        platform=getattr(args, "platform", None),
        readahead=parse_readahead(args.readahead) if getattr(args, "readahead", None) else READAHEAD_AUTO,
        hosts_dirs=tuple(args.hosts_dir) if getattr(args, "hosts_dir", None) else None,
        proxy=getattr(args, "proxy", None),
        allow_referrers=getattr(args, "allow_referrers", False),
        p2p=P2PConfig.from_options(
            getattr(args, "p2p_proxy", None),
            getattr(args, "p2p_address", None),
            getattr(args, "p2p_ping_url", None),
        ),
        verify=getattr(args, "verify", "auto"),
        verify_signature=getattr(args, "verify_signature", None),
        quiet=bool(getattr(args, "quiet", False)),
    )
    set_default_remote_options(opts)  # for code paths that do not take options explicitly
    return opts


def remote_params(args: argparse.Namespace) -> list[str]:
    """The registry options of ``args`` as the nbd plugin's ``key=value`` parameters (docs/nbd.md).

    Credentials are not among them: a command line is visible to every user (``ps``), so they
    travel in the environment (:func:`remote_env`).
    """
    params: list[str] = []
    insecure = _insecure(args)
    if isinstance(insecure, tuple):
        params += [f"insecure-registry={h}" for h in insecure]
    elif insecure:
        params.append("insecure-registry=true")
    if getattr(args, "tls_verify", None) is False:
        params.append("tls-verify=false")
    for key, value in (("ca-file", args.ca_file), ("cache-dir", args.cache_dir)):
        if value:
            params.append(f"{key}={os.path.abspath(value)}")
    if args.cache_limit:
        params.append(f"cache-limit={args.cache_limit}")
    if args.no_cache:
        params.append("no-cache=true")
    if args.platform:
        params.append(f"platform={args.platform}")
    params += [f"hosts-dir={os.path.abspath(d)}" for d in getattr(args, "hosts_dir", None) or []]
    if getattr(args, "verify", "auto") != "auto":
        params.append(f"verify={args.verify}")
    if getattr(args, "verify_signature", None):
        params.append(f"verify-signature={os.path.abspath(args.verify_signature)}")
    if getattr(args, "allow_referrers", False):
        params.append("allow-referrers=true")
    for key, value in _network_options(args):
        params.append(f"{key}={value}")
    return params


def _network_options(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--proxy`` and the Dragonfly options of ``args`` that are set, as (name, value)."""
    names = ("proxy", "p2p-proxy", "p2p-ping-url", "p2p-address")
    return [(n, v) for n in names if (v := getattr(args, n.replace("-", "_"), None))]


def remote_argv(args: argparse.Namespace) -> list[str]:
    """The registry options of ``args`` as command-line options again (for a child ``obd``), paths
    absolute and credentials left out (:func:`remote_env` carries them)."""
    argv = [f"--insecure-registry={h}" for h in getattr(args, "insecure_registry", None) or [] if h != "*"]
    if getattr(args, "tls_verify", None) is False:
        argv.append("--tls-verify=false")
    for flag, value in (("--ca-file", args.ca_file), ("--cache-dir", args.cache_dir)):
        if value:
            argv += [flag, os.path.abspath(value)]
    for flag, value in (("--platform", args.platform), ("--cache-limit", args.cache_limit)):
        if value:
            argv += [flag, value]
    if args.no_cache:
        argv.append("--no-cache")
    if getattr(args, "verify", "auto") != "auto":
        argv.append(f"--verify={args.verify}")
    if getattr(args, "verify_signature", None):
        argv += ["--verify-signature", os.path.abspath(args.verify_signature)]
    if getattr(args, "allow_referrers", False):
        argv.append("--allow-referrers")
    for d in getattr(args, "hosts_dir", None) or []:
        argv += ["--hosts-dir", os.path.abspath(d)]
    for key, value in _network_options(args):
        argv += [f"--{key}", value]
    if getattr(args, "stats", False):
        argv.append("--stats")
    if getattr(args, "profile", False):
        argv.append("--profile")
    return argv


def remote_env(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``--creds`` as ``$OBD_REGISTRY_USER``/``_PASSWORD``, for a child process that
    reaches registries: the environment is private to its process, unlike its command line."""
    if getattr(args, "creds", None):
        user, _, password = args.creds.partition(":")
        env["OBD_REGISTRY_USER"] = user
        env["OBD_REGISTRY_PASSWORD"] = password or env.get("OBD_REGISTRY_PASSWORD", "")
    return env


def print_stats(args: argparse.Namespace) -> None:
    """The ``--stats`` block on stderr, if asked for."""
    if getattr(args, "stats", False):
        print(default_stats().format(), file=sys.stderr)
    if getattr(args, "profile", False):
        print(default_stats().format_profile(), file=sys.stderr)


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
