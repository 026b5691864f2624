"""The ``obd`` command line.

Each sub-command lives in its own module under ``obd.cli`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed namespace; returns an exit code).
Errors from the engine are :class:`obd.errors.ObdError`: they are printed as one line on stderr and
the command exits 1, with no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from obd import __version__
from obd.cli.config import configure
from obd.errors import ObdError

#: Sub-command modules, in the order ``obd --help`` lists them.
COMMAND_MODULES = [
    "demo",
    "run",
    "export",
    "inspect",
    "create",
    "commit",
    "merge",
    "zfile",
    "nbd",
    "mount",
    "snapshot",
    "cache",
    "push",
    "pull",
    "convert",
    "index",
    "trace",
]

EPILOG = """\
Layers are given lowest first, as in overlaybd's config.v1.json "lowers". A layer may be a sealed
LSMT blob, a ZFile holding one, either wrapped in overlaybd's tar envelope, or a config.v1.json via
--config. Run `obd COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="obd",
        description="obd: read, write, merge and serve overlaybd block-device images in pure Python.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"obd {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument(
        "--config",
        dest="settings_file",
        metavar="FILE",
        help="obd's configuration file: registry, Dragonfly and cache settings (default: $OBD_CONFIG, "
        "else ~/.config/obd/config.toml, else /etc/obd/config.toml; docs/fleet.md)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"obd.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="obd: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        configure(args)
        return int(args.func(args) or 0)
    except ObdError as e:
        if args.debug:
            raise
        print(f"obd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("obd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
