"""``obd mount`` and ``obd umount``: an image as a disk file on a FUSE mount (docs/fuse.md)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from frontends.fuse import check_fuse_available, check_mountpoint, unmount
from obd.cli.common import add_remote_args, print_stats, remote_argv, remote_env, remote_options
from obd.errors import ObdError, UnsupportedError

MOUNT_DESCRIPTION = """\
Mount an image as one disk file, MOUNTPOINT/disk.img, whose bytes are the image's merged device:
a file path for VMMs that want one (QEMU -drive file=, Firecracker, cloud-hypervisor, libkrun), for
losetup, or for `mount -o loop,ro`. Registry images are read lazily, through the block cache.

Without --upper the file is read-only. With --upper DIR writes go to an RW layer in DIR (created
on first use over the image, reopened later; --sparse picks the sparse flavour when creating), the
same upper directories as `obd nbd --upper`: `obd snapshot DIR` commits them into a layer, `obd
fork` branches off. fsync() on the file makes every earlier write durable. The file's size is
fixed: write with `dd ... conv=notrunc`.

The server goes into the background once the file is ready (the command returns then, or fails
with the reason); --foreground keeps it attached. It stops cleanly when unmounted (`obd umount
MOUNTPOINT`, fusermount3 -u) or on SIGINT/SIGTERM.

examples:
  obd mount registry.example.com/app:1.0 /mnt/app
  obd mount base.commit app.commit /mnt/vm1 --upper vm1.upper
  qemu-system-x86_64 ... -drive file=/mnt/vm1/disk.img,format=raw,if=virtio
  losetup -r -f --show /mnt/app/disk.img && mount -o ro /dev/loop0 /mnt/rootfs
  obd umount /mnt/vm1
"""

UMOUNT_DESCRIPTION = """\
Unmount an `obd mount` and wait until its server has closed the image (so the upper directory can
be snapshotted or mounted again at once). A mount whose file is open (or attached to a loop
device) is busy: close it first, or detach it now with --lazy.
"""


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options sit between the images and the mount point (``IMG --upper DIR MNT``)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(sub: argparse._SubParsersAction) -> None:
    saved = sub._parser_class
    sub._parser_class = _IntermixedParser
    try:
        p = sub.add_parser(
            "mount",
            help="mount an image as a disk file (FUSE)",
            usage="obd mount [options] [IMAGE...] MOUNTPOINT",
            description=MOUNT_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    finally:
        sub._parser_class = saved
    p.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE... MOUNTPOINT",
        help="the image (layer files lowest first, a config.v1.json, oci:DIR[:TAG] or a registry "
        "reference; optional with an existing --upper), then the directory to mount on",
    )
    p.add_argument("-c", "--config", metavar="CONFIG", help="an overlaybd config.v1.json instead of IMAGE")
    p.add_argument("--upper", metavar="DIR", help="upper directory for writes (created on first use)")
    p.add_argument("--sparse", action="store_true", help="create the RW layer sparse (default: append)")
    p.add_argument(
        "--ro", "--readonly", dest="readonly", action="store_true", help="read-only even with an upper"
    )
    p.add_argument("--name", default="disk.img", help="name of the disk file (default disk.img)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "--allow-other", action="store_true", help="let other users open the file (FUSE allow_other)"
    )
    p.add_argument("--threads", type=int, default=16, metavar="N", help="engine worker threads (default 16)")
    p.add_argument(
        "--readahead-kb",
        type=int,
        default=1024,
        metavar="KB",
        help="read-ahead of the mount (default 1024: sequential reads become 1 MiB requests; 0: the "
        "kernel's default)",
    )
    p.add_argument("--log", metavar="FILE", help="in the background, append messages here (default: dropped)")
    p.add_argument(
        "--fuse-debug", action="store_true", help="libfuse's request log on stderr (implies --foreground)"
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # the background server's handshake
    add_remote_args(p)
    p.set_defaults(func=run_mount)

    u = sub.add_parser(
        "umount",
        help="unmount an `obd mount` and wait for its server to finish",
        description=UMOUNT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-l", "--lazy", action="store_true", help="detach now even if the file is in use")
    u.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="wait at most S seconds (default 60)"
    )
    u.set_defaults(func=run_umount)


# --- the image ------------------------------------------------------------------------------------
def _split_paths(args: argparse.Namespace) -> tuple[list[str], str]:
    *images, mountpoint = args.paths
    if args.config and images:
        raise ObdError("give IMAGE arguments or --config, not both")
    if not (images or args.config or args.upper):
        raise ObdError("no image: give IMAGE... MOUNTPOINT, --config CONFIG, or an existing --upper DIR")
    if args.sparse and not args.upper:
        raise ObdError("--sparse needs --upper")
    return images, mountpoint


def _abs_spec(spec: str) -> str:
    if spec.startswith("oci:"):
        return "oci:" + os.path.abspath(spec[4:])
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def open_disk(args: argparse.Namespace, images: list[str]) -> Any:
    """The device, opened exactly as the NBD frontend opens it (:func:`obd.image.device.open_device`),
    with the registry options of this command line; an acceleration layer's trace, if the image has
    one, starts prefetching in the background."""
    # the engine (numpy, codecs, layer formats) loads only when a disk is really opened, not for --help
    from obd.image.device import DeviceOptions, open_device, start_prefetch

    opts = DeviceOptions(
        image=[_abs_spec(s) for s in images],
        config=os.path.abspath(args.config) if args.config else None,
        upper=os.path.abspath(args.upper) if args.upper else None,
        sparse=args.sparse,
        readonly=args.readonly,
        platform=args.platform,
    )
    device = open_device(opts, remote=remote_options(args))
    start_prefetch(device, opts)
    return device


# --- serving --------------------------------------------------------------------------------------
def _fuse_modules() -> Any:
    try:
        from frontends.fuse import fs  # optional dependencies: pyfuse3 and trio
    except ImportError as e:
        raise UnsupportedError(
            f"the FUSE frontend needs pyfuse3 and trio ({e}): pip install 'pyfuse3>=3.3' trio "
            "(pyfuse3 builds against Debian's libfuse3-dev); ./setup.sh installs both"
        ) from None
    return fs


def _detach(log_path: str | None) -> None:
    """Point stdin at /dev/null and stdout/stderr at the log (or /dev/null): the caller's pipes close."""
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_path else null
    for target, fd in ((0, null), (1, out), (2, out)):
        os.dup2(fd, target)
    for fd in {null, out}:
        os.close(fd)


def serve_foreground(args: argparse.Namespace) -> int:
    images, mountpoint = _split_paths(args)
    mnt = check_mountpoint(mountpoint)
    check_fuse_available()
    fs_mod = _fuse_modules()
    device = open_disk(args, images)
    try:
        fs = fs_mod.DiskFS(device, name=args.name, threads=args.threads)
        disk = os.path.join(mnt, args.name)

        def ready() -> None:
            if args.ready_fd is not None:
                os.write(args.ready_fd, f"ready {os.getpid()}\n".encode())
                os.close(args.ready_fd)
                _detach(args.log)
            else:
                print(
                    f"obd: serving {disk} ({device.description}); stop with `obd umount {mnt}`",
                    file=sys.stderr,
                )
                sys.stderr.flush()

        fs_mod.serve(
            fs,
            mnt,
            allow_other=args.allow_other,
            readahead_kb=args.readahead_kb,
            on_ready=ready,
            debug=args.fuse_debug,
        )
    finally:
        device.close()
    print_stats(args)
    return 0


def background_command(
    args: argparse.Namespace, images: list[str], mountpoint: str, ready_fd: int
) -> list[str]:
    """The command line of the background server (every path absolute; credentials not on it)."""
    cmd = [sys.executable, "-m", "obd", *(["-v"] * getattr(args, "verbose", 0))]
    if getattr(args, "debug", False):
        cmd.append("--debug")
    cmd += ["mount", *[_abs_spec(s) for s in images], os.path.abspath(mountpoint)]
    cmd += ["--foreground", "--ready-fd", str(ready_fd), "--name", args.name]
    cmd += ["--threads", str(args.threads), "--readahead-kb", str(args.readahead_kb)]
    for flag, value in (
        ("--config", args.config),
        ("--upper", args.upper),
        ("--log", args.log),
    ):
        if value:
            cmd += [flag, os.path.abspath(value)]
    for flag, on in (
        ("--sparse", args.sparse),
        ("--readonly", args.readonly),
        ("--allow-other", args.allow_other),
    ):
        if on:
            cmd.append(flag)
    return cmd + remote_argv(args)


def serve_background(args: argparse.Namespace) -> int:
    """Start the server in its own session and wait for its handshake: ready, or its exit status."""
    images, mountpoint = _split_paths(args)
    mnt = check_mountpoint(mountpoint)
    check_fuse_available()
    _fuse_modules()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)  # holds the obd and frontends packages
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    remote_env(args, env)  # credentials through the environment, not the command line others can read
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            background_command(args, images, mnt, w),
            stdin=subprocess.DEVNULL,
            pass_fds=(w,),
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read()
    if answer.startswith(b"ready"):
        print(
            f"obd: {os.path.join(mnt, args.name)} is ready (server pid {proc.pid}); "
            f"stop it with `obd umount {mnt}`",
            file=sys.stderr,
        )
        # it runs on in its own session; reap it whenever it ends (this process may live on: tests)
        threading.Thread(target=proc.wait, name="obd-mount-reaper", daemon=True).start()
        return 0
    return proc.wait() or 1


def run_mount(args: argparse.Namespace) -> int:
    if args.foreground or args.fuse_debug or args.ready_fd is not None:
        return serve_foreground(args)
    return serve_background(args)


def run_umount(args: argparse.Namespace) -> int:
    pid = unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    what = f" (server pid {pid} finished)" if pid is not None and not args.lazy else ""
    print(f"obd: unmounted {os.path.realpath(args.mountpoint)}{what}", file=sys.stderr)
    return 0
