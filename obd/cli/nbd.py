"""``obd nbd``: serve an image as an NBD disk through nbdkit's Python plugin (docs/nbd.md)."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import socket
import stat
import subprocess
import sys

from obd.cli.common import LAYERS_HELP, add_dashdash_parser, add_remote_args, remote_env, remote_params
from obd.errors import ObdError
from obd.host.nbdkit import find_nbdkit, nbdkit_env, plugin_path

DESCRIPTION = """\
Serve a layer stack as a network block device: start nbdkit with obd's Python plugin.

Without --upper the disk is read-only. With --upper DIR writes go to an RW layer in DIR (created
on first use over the image, reopened later; --sparse picks the sparse flavour when creating);
`obd snapshot DIR` commits them into a layer, `obd fork` starts new uppers over committed states.
A config.v1.json with an upper is served read-write through that upper.

The server listens on a Unix socket (--socket) or on TCP (--port, on 127.0.0.1 unless --bind),
and goes into the background once it is ready unless --foreground. A stale socket left by a
killed server is removed, so the same command restarts it and QEMU clients started with
reconnect-delay carry on. Arguments after `--` go to nbdkit: options before the plugin name,
key=value parameters (of filters) after it.

examples:
  obd nbd oci:layout:app --socket /tmp/app.sock
  obd nbd localhost:5000/app:1-obd --socket /tmp/app.sock --insecure-registry localhost:5000
  obd nbd base.commit app.commit --upper vm1.upper --socket /tmp/vm1.sock
  obd nbd localhost:5000/app:1-obd --socket /tmp/app.sock --record-trace boot.trace
  obd nbd --upper vm1.upper --port 10809 --foreground -- --filter=stats statsfile=/dev/stderr
  qemu-system-x86_64 ... -blockdev driver=nbd,server.type=unix,server.path=/tmp/vm1.sock,\\
      node-name=d0,reconnect-delay=10 -device virtio-blk-pci,drive=d0
  nbdkit -U /tmp/app.sock python "$(obd nbd --plugin-path)" image=oci:layout:app

Registry images take the registry options below; they reach the plugin as key=value parameters
(docs/nbd.md), credentials (--creds) through its environment, never on nbdkit's command line.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_dashdash_parser(
        sub,
        "nbd",
        help="serve an image as an NBD disk (nbdkit python plugin)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "image", nargs="*", metavar="IMAGE", help=LAYERS_HELP + " (optional with an existing --upper)"
    )
    p.add_argument("-c", "--config", metavar="CONFIG", help="an overlaybd config.v1.json")
    p.add_argument("--upper", metavar="DIR", help="upper directory for writes (created on first use)")
    p.add_argument("--sparse", action="store_true", help="create the RW layer sparse (default: append)")
    p.add_argument("--readonly", action="store_true", help="serve read-only even with an upper")
    p.add_argument(
        "--trace", metavar="FILE", help="replay this prefetch trace into the block cache in the background"
    )
    p.add_argument(
        "--record-trace",
        metavar="FILE",
        help="record the blocks clients read as a prefetch trace, written when the server stops",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on this TCP port (default 10809)")
    p.add_argument("--bind", metavar="ADDR", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--threads", type=int, default=16, metavar="N", help="nbdkit worker threads (default 16)")
    p.add_argument("--pidfile", metavar="FILE", help="write the server's pid here once it is ready")
    p.add_argument("--no-extents", action="store_true", help="do not report holes and zeros")
    p.add_argument("--nbdkit", metavar="PROGRAM", help="the nbdkit binary (default: from PATH)")
    p.add_argument("--nbdkit-verbose", action="store_true", help="nbdkit -v (debug messages)")
    p.add_argument("--print-command", action="store_true", help="print the nbdkit command and exit")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print where the start's time went (resolve, layer opens, range GETs, the wire) once the "
        "disk is ready, and again when the server stops (use with -f to see it)",
    )
    p.add_argument(
        "--plugin-path",
        action="store_true",
        help="print the path of obd's nbdkit plugin script and exit: "
        '`nbdkit python "$(obd nbd --plugin-path)" image=IMAGE` serves IMAGE without obd nbd',
    )
    add_remote_args(p, stats=False)
    p.set_defaults(func=run)


def build_command(args: argparse.Namespace) -> list[str]:
    """The nbdkit command line for parsed ``obd nbd`` arguments (every path absolute)."""
    if args.config and args.image:
        raise ObdError("give IMAGE arguments or --config, not both")
    if not (args.image or args.config or args.upper):
        raise ObdError("no image: give IMAGE..., --config CONFIG, or an existing --upper DIR")
    if args.threads < 1:
        raise ObdError("--threads must be at least 1", value=args.threads)
    cmd = [find_nbdkit(args.nbdkit)]
    if args.foreground:
        cmd.append("-f")
    if args.readonly:
        cmd.append("-r")
    if args.nbdkit_verbose:
        cmd.append("-v")
    if args.socket:
        cmd += ["-U", os.path.abspath(args.socket)]
    else:
        cmd += ["-p", str(args.port or 10809), "-i", args.bind]
    cmd += ["-t", str(args.threads)]
    if args.pidfile:
        cmd += ["-P", os.path.abspath(args.pidfile)]
    # nbdkit options go before the plugin, key=value parameters (of filters) after it
    params = [a for a in args.after_dashdash if "=" in a and not a.startswith("-")]
    cmd += [a for a in args.after_dashdash if a not in params]
    cmd += ["python", str(plugin_path()), *params]
    for spec in args.image:
        cmd.append(f"layer={_abs_spec(spec)}" if len(args.image) > 1 else f"image={_abs_spec(spec)}")
    if args.config:
        cmd.append(f"config={os.path.abspath(args.config)}")
    if args.upper:
        cmd.append(f"upper={os.path.abspath(args.upper)}")
        if args.sparse:
            cmd.append("sparse=true")
    elif args.sparse:
        raise ObdError("--sparse needs --upper")
    if args.readonly:
        cmd.append("readonly=true")
    for key, value in (("trace", args.trace), ("record-trace", args.record_trace)):
        if value:
            cmd.append(f"{key}={os.path.abspath(value)}")
    cmd += remote_params(args)
    if args.no_extents:
        cmd.append("extents=false")
    if args.profile:
        cmd.append("profile=true")
    return cmd


def _abs_spec(spec: str) -> str:
    if spec.startswith("oci:"):
        return "oci:" + os.path.abspath(spec[4:])
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def clear_stale_socket(path: str) -> None:
    """Remove a Unix socket nobody listens on (a killed server's); refuse one that is live."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ObdError("exists and is not a socket", path=path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            if os.path.exists(path):
                os.unlink(path)
            return
        raise ObdError(f"cannot probe the socket: {e.strerror}", path=path) from e
    finally:
        s.close()
    raise ObdError("a server is already listening on this socket", path=path)


def uri(args: argparse.Namespace) -> str:
    if args.socket:
        return f"nbd+unix:///?socket={os.path.abspath(args.socket)}"
    return f"nbd://{args.bind}:{args.port or 10809}"


def run(args: argparse.Namespace) -> int:
    if args.plugin_path:
        print(plugin_path())
        return 0
    cmd = build_command(args)
    env = remote_env(args, nbdkit_env())
    if args.print_command:
        extra = f"OBD_VENV={shlex.quote(env['OBD_VENV'])} " if "OBD_VENV" in env else ""
        print(extra + shlex.join(cmd))
        return 0
    if args.socket:
        clear_stale_socket(os.path.abspath(args.socket))
    print(f"obd: serving {uri(args)}", file=sys.stderr)
    sys.stderr.flush()
    if args.foreground:
        os.execve(cmd[0], cmd, env)
    # nbdkit forks into the background once it listens; its exit status says whether it got there
    return subprocess.call(cmd, env=env)
