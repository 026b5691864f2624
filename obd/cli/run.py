"""``obd run``: run a command in a fresh microVM booted straight from an overlaybd image (docs/run.md)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from obd.cli.common import add_dashdash_parser, add_remote_args, remote_options
from obd.cli.config import set_unless_given
from obd.errors import ConfigError, ObdError
from obd.observability.progress import human_bytes
from obd.observability.stats import TIMERS, format_profile

if TYPE_CHECKING:
    from frontends.run.launcher import RunOptions, RunResult

DESCRIPTION = """\
Run a command in a fresh microVM (QEMU -M microvm; KVM when it works, else TCG) whose root disk is
an overlaybd image read lazily: from a registry only the blocks the command touches are fetched
(through the block cache), with no pull, no extraction and no kernel module. The command runs as
the image's config says (Entrypoint, Cmd, Env, WorkingDir, User; arguments after `--` replace
Cmd); its output (stdout and stderr, one stream) is streamed here and obd exits with its exit code
(125: obd could not run it; 124: --timeout ran out). Ctrl-C stops everything.

The root is writable, as in `docker run`: the writes land in an overlaybd RW layer in a throw-away
upper directory (under $TMPDIR) that is deleted when the run ends, however it ends. --rw DIR or
--snapshot NAME keep them in an upper directory that outlives the run: `obd snapshot DIR` (or
--commit) seals them into a layer, `obd fork DIR NEW` branches off, and later runs of DIR see them.
--read-only serves the image as it is, with a tmpfs on /tmp and /run. /proc, /sys and /dev work on
every image, even one without those directories (FROM scratch).

A Sandboxfile (YAML; docs/sandboxfile.md) names repeatable settings: `obd run -f Sandboxfile NAME`
runs sandbox NAME's start script (NAME~SCRIPT or --script SCRIPT for another one).

examples:
  obd run registry.example.com/python:3.11 -- python3 -c 'print("hello world!")'
  obd run --insecure-registry 127.0.0.1:5000 127.0.0.1:5000/app:1 --env DEBUG=1 -- ./serve --once
  obd run --read-only IMAGE -- ls /
  obd run IMAGE --snapshot dev -- sh -c 'date > /srv/first'  # state kept as sandbox "dev"
  obd run --snapshot dev -- cat /srv/first                     # ... and used again (no network in the VM)
  obd run IMAGE --rw ./vm1 --commit -- sh -c 'echo hi > /f' && obd fork ./vm1 ./vm2
  obd run IMAGE --record-trace boot.trace -- true && obd run IMAGE --trace boot.trace -- true
  obd run -f Sandboxfile hello
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_dashdash_parser(
        sub,
        "run",
        help="run a command in a microVM booted from an overlaybd image (lazily, from a registry)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "image",
        nargs="*",
        metavar="IMAGE",
        help="a registry reference, oci:DIR[:TAG], layer files lowest first, or a config.v1.json; "
        "with -f: the sandbox NAME[~SCRIPT]",
    )
    p.add_argument(
        "-f", "--file", metavar="SANDBOXFILE", help="take the settings of sandbox NAME from this file"
    )
    p.add_argument(
        "--script", metavar="NAME", help="with -f: run this script of the sandbox (default: start)"
    )
    p.add_argument("-m", "--memory", metavar="MiB", help="guest memory in MiB (or 1G, 512M; default 512)")
    p.add_argument("--cpus", type=int, metavar="N", help="virtual CPUs (default 1)")
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="set a variable (K alone: this shell's)",
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory (default: the image's, else /)")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="run as this user (default: the image's)")
    p.add_argument(
        "--entrypoint", metavar="CMD", help="replace the image's entrypoint (a command line; '' for none)"
    )
    state = p.add_mutually_exclusive_group()
    state.add_argument(
        "--rw",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="keep the writes in upper directory DIR (created on first use; no DIR: a new one under the "
        "state directory, printed at the end)",
    )
    state.add_argument(
        "--read-only",
        action="store_true",
        help="read-only root (tmpfs on /tmp and /run); default: writable, the writes dropped after the run",
    )
    state.add_argument(
        "--snapshot",
        metavar="NAME",
        help="keep the writes as named sandbox state NAME (created on first use; IMAGE optional later)",
    )
    p.add_argument("--sparse", action="store_true", help="a new upper's RW layer is sparse (default: append)")
    p.add_argument(
        "--commit", action="store_true", help="after the run, seal the writes into a snapshot layer"
    )
    p.add_argument("--trace", metavar="FILE", help="replay this prefetch trace into the cache while booting")
    p.add_argument(
        "--record-trace", metavar="FILE", help="record the blocks this run reads as a prefetch trace"
    )
    p.add_argument("--timeout", type=float, metavar="S", help="stop everything after S seconds (exit 124)")
    p.add_argument(
        "--accel", choices=("auto", "kvm", "tcg"), help="QEMU accelerator (default: auto = try KVM)"
    )
    p.add_argument(
        "--readahead",
        metavar="SIZE",
        help="registry readahead: auto (the default: sequential reads read ahead by the link's "
        "bandwidth-delay product), 0 (none) or SIZE after every miss (e.g. 256K)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary lines on stderr")
    add_remote_args(p)
    p.set_defaults(func=run)


def _say(args: argparse.Namespace) -> Callable[[str], None] | None:
    if args.quiet or not args.verbose:
        return None
    return lambda msg: print(f"obd: {msg}", file=sys.stderr, flush=True)


def build_options(args: argparse.Namespace) -> tuple[list[str] | None, list[str], RunOptions]:
    """(image, command args, RunOptions) from the parsed arguments and the Sandboxfile, if any."""
    # The launcher (nbdkit, QEMU, the registry client) loads only when obd run runs: every obd command
    # imports this module to list its options.
    from frontends.run.launcher import RunOptions, sandbox_dir, state_dir
    from frontends.run.sandboxfile import load, memory_setting
    from frontends.run.vm import write_stdout

    box = None
    image: list[str] | None = list(args.image) or None
    command = list(args.after_dashdash)
    if args.file:
        if not args.image or len(args.image) != 1:
            raise ConfigError("with -f SANDBOXFILE give one sandbox NAME[~SCRIPT]", field="image")
        name, _, script = args.image[0].partition("~")
        if script and args.script and script != args.script:
            raise ConfigError("give the script as NAME~SCRIPT or --script, not both", field="script")
        box = load(args.file).get(name)
        script = script or args.script
        image = [box.image] if box.image else None
        if not command:
            command = box.script_argv(script) if script else box.default_args()
        elif script:
            raise ConfigError("give a script or a command after --, not both", field="script")
        if box.insecure_registry:
            args.insecure_registry = [*(args.insecure_registry or []), *box.insecure_registry]
        for dest in ("hosts_dir", "proxy", "p2p_proxy", "p2p_ping_url", "p2p_address"):
            set_unless_given(args, dest, getattr(box, dest))  # over the config file, under the flags
    elif args.script:
        raise ConfigError("--script needs -f SANDBOXFILE", field="script")

    remote = remote_options(args)  # --readahead included
    opts = RunOptions(remote=remote, on_output=write_stdout, say=_say(args))
    if box is not None:
        opts.memory_mib = box.memory_mib or opts.memory_mib
        opts.cpus = box.cpus or opts.cpus
        opts.env = list(box.env)
        opts.workdir, opts.user, opts.entrypoint = box.workdir, box.user, box.entrypoint
        opts.timeout, opts.trace, opts.record_trace = box.timeout, box.trace, box.record_trace
        opts.sparse, opts.platform = box.sparse, box.platform
        opts.accel = box.accel or opts.accel
    opts.memory_mib = memory_setting(args.memory, None, "--memory") or opts.memory_mib
    if args.cpus is not None:
        if not 1 <= args.cpus <= 64:
            raise ConfigError("--cpus must be between 1 and 64", value=args.cpus)
        opts.cpus = args.cpus
    opts.env += args.env
    opts.workdir = args.workdir or opts.workdir
    if opts.workdir is not None and not opts.workdir.startswith("/"):
        raise ConfigError(
            "the working directory must be an absolute path", field="workdir", value=opts.workdir
        )
    opts.user = args.user if args.user is not None else opts.user
    if args.entrypoint is not None:
        opts.entrypoint = shlex.split(args.entrypoint)
    opts.timeout = args.timeout if args.timeout is not None else opts.timeout
    if opts.timeout is not None and opts.timeout <= 0:
        raise ConfigError("--timeout must be positive", value=opts.timeout)
    opts.trace = args.trace or opts.trace
    opts.record_trace = args.record_trace or opts.record_trace
    opts.sparse = args.sparse or opts.sparse
    opts.accel = args.accel or opts.accel
    opts.platform = args.platform or opts.platform

    rw = args.rw
    snapshot = args.snapshot
    opts.read_only = args.read_only
    if box is not None and rw is None and snapshot is None and not args.read_only:
        rw = box.rw or None
        snapshot = box.snapshot
        opts.read_only = box.read_only
    if snapshot:
        opts.upper = str(sandbox_dir(snapshot))
    elif isinstance(rw, str):
        opts.upper = os.path.abspath(rw)
    elif rw:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        opts.upper = str(state_dir() / "uppers" / f"{stamp}-{os.urandom(3).hex()}")
    if args.commit and not opts.upper:
        raise ConfigError(
            "--commit needs --rw or --snapshot (without them the writes are thrown away)", field="commit"
        )
    if not image and not opts.upper:
        raise ConfigError(
            "no image: give IMAGE (or -f SANDBOXFILE NAME, or an existing --rw DIR / --snapshot NAME)"
        )
    return image, command, opts


def run(args: argparse.Namespace) -> int:
    # Loaded only when obd run runs (see build_options).
    from frontends.run.launcher import Interrupted, commit_upper, run_image, signals_interrupt
    from frontends.run.vm import GuestError, VMTimeoutError

    try:
        image, command, opts = build_options(args)
        fresh_upper = opts.upper is not None and not os.path.exists(opts.upper)
        with signals_interrupt():
            result = run_image(image, command, opts)
    except Interrupted as e:
        print(f"obd: stopped by {e}", file=sys.stderr)
        return 128 + e.signum
    except VMTimeoutError as e:
        first = str(e).splitlines()[0]
        print(f"obd: error: {first}", file=sys.stderr)
        return 124
    except GuestError as e:
        print(f"obd: error: {e}", file=sys.stderr)
        return 125
    except ObdError as e:
        if args.debug:
            raise
        print(f"obd: error: {e}", file=sys.stderr)
        return 125
    finally:
        sys.stdout.flush()
    exit_code = result.exit_code
    if args.commit and opts.upper:
        try:
            entry = commit_upper(opts.upper)
        except ObdError as e:  # the writes stay in the live RW layer; the command's code still counts
            print(f"obd: error: the writes were not committed: {e}", file=sys.stderr)
            exit_code = exit_code or 125
        else:
            if not args.quiet:
                print(
                    f"obd: committed the writes as {os.path.join(opts.upper, entry['file'])}", file=sys.stderr
                )
    if not args.quiet and fresh_upper and opts.upper:
        again = f"--snapshot {args.snapshot}" if args.snapshot else f"--rw {opts.upper}"
        print(
            f"obd: the writes are in {opts.upper} (`obd snapshot {opts.upper}` commits them; "
            f"`obd run {again} -- ...` runs it again)",
            file=sys.stderr,
        )
    if args.stats or (args.verbose and not args.quiet):  # asked for explicitly: -q does not hide it
        print(summary(result), file=sys.stderr)
    if args.profile:
        print(profile(result, opts.remote.stats.snapshot()), file=sys.stderr)
    return exit_code


def profile(result: RunResult, here: dict[str, Any]) -> str:
    """The ``--profile`` block: this process's resolve and warming layer opens, the nbd server's
    opens and range GETs, and the guest (boot to the command's first output), with the wire's
    requests and bytes of both processes."""
    t = result.timings
    server = result.stats
    merged: dict[str, Any] = {
        k: here.get(k, 0) + server.get(k, 0) for k in ("requests", "bytes_received", "bytes_fetched")
    }
    merged["latency"] = server.get("latency") or here.get("latency")
    timers: dict[str, float] = {}
    for name in TIMERS:  # this process's (resolve, the warming opens), then the server's
        for where, snap in (("obd run", here), ("nbd server", server)):
            if name in (snap.get("timers") or {}):
                timers[f"{name} ({where})"] = snap["timers"][name]
    if "server" in t:
        timers["disk ready (nbd server listening)"] = t["server"]
        if "first_output" in t:
            timers["guest: boot to the first output"] = t["first_output"] - t["server"]
    if "first_output" in t:
        timers["first output"] = t["first_output"]
    return format_profile(merged, timers)


def summary(result: RunResult) -> str:
    """The ``--stats`` block: where the time went and what was fetched."""
    t = result.timings
    s = result.stats
    r = result.resolve_stats
    lines = [
        f"obd: {result.accel} VM; exit code {result.exit_code}",
        "obd: time: "
        + ", ".join(
            f"{label} {t[key]:.2f} s"
            for label, key in (
                ("resolve", "resolve"),
                ("disk served", "server"),
                ("first output", "first_output"),
                ("exit", "exit"),
                ("total", "total"),
            )
            if key in t
        ),
        f"obd: fetched {human_bytes(s.get('bytes_fetched', 0))} in {s.get('requests', 0)} requests while "
        f"running (+{r.get('requests', 0)} to resolve and open the image); "
        f"cache hits {s.get('cache_hits', 0)}, misses {s.get('cache_misses', 0)}",
    ]
    lat = s.get("latency") or {}
    if lat.get("count"):
        lines.append(
            f"obd: request latency: n={lat['count']} p50={lat['p50'] * 1000:.0f} ms "
            f"p90={lat['p90'] * 1000:.0f} ms max={lat['max'] * 1000:.0f} ms"
        )
    return "\n".join(lines)
