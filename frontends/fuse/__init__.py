"""obd's FUSE frontend: an image as one disk file that any VMM, ``losetup`` or QEMU can open (docs/fuse.md).

``obd mount IMAGE MOUNTPOINT`` mounts a file system holding one file, ``MOUNTPOINT/disk.img``, whose
bytes are the merged device of the image; with an upper directory it is writable, with the same RW
layer, snapshot and fork semantics as the NBD frontend (both serve :class:`obd.image.device.Device`).

* :mod:`frontends.fuse.fs` is the file system itself (pyfuse3 + trio): :class:`~frontends.fuse.fs.DiskFS`
  and :func:`~frontends.fuse.fs.serve`. Importing it needs pyfuse3 and trio.
* This module holds what needs neither: finding mounts in ``/proc/self/mountinfo``, checking that FUSE
  is usable, and unmounting (used by ``obd umount`` and the tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from obd.errors import ObdError, UnsupportedError

#: The kernel's FUSE device; without it (or without permission to open it) nothing can be mounted.
FUSE_DEVICE = "/dev/fuse"
#: ``fsname=``/``subtype=`` of obd's mounts: the mount table shows them as ``obd`` of type ``fuse.obd``.
FSNAME = "obd"
FSTYPE = "fuse." + FSNAME
#: Extended attribute of the mount's root directory holding the serving process's pid.
PID_XATTR = "user.obd.pid"
_FUSERMOUNT_PATH = ("/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``: the parts obd needs."""

    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", the bdi name under /sys/class/bdi/
    options: str


def _unescape(field: str) -> str:
    """Mount table fields escape space, tab, newline and backslash as ``\\ooo`` octal."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        code = raw[i + 1 : i + 4]
        if raw[i] == 0x5C and len(code) == 3 and code.isdigit():
            out.append(int(code, 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount of this process's namespace, in mount order."""
    out = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(), right.split()
            if not sep or len(a) < 6 or len(b) < 2:
                continue
            out.append(
                MountEntry(
                    mountpoint=_unescape(a[4]),
                    fstype=b[0],
                    source=_unescape(b[1]),
                    device=a[2],
                    options=a[5],
                )
            )
    return out


def mount_entry(path: str | os.PathLike[str], *, resolve: bool = True) -> MountEntry | None:
    """The mount whose mount point is exactly ``path`` (the top one if several are stacked), or None.

    ``resolve=False`` takes ``path`` as already absolute and canonical: the process serving a FUSE
    mount must not resolve it, since a stat of the mount point would wait for its own answer.
    """
    want = os.path.realpath(os.fspath(path)) if resolve else os.fspath(path)
    found = None
    for entry in mounts():
        if entry.mountpoint == want:
            found = entry
    return found


def check_mountpoint(path: str | os.PathLike[str]) -> str:
    """The absolute mount point, or an :class:`ObdError` saying why nothing can be mounted there."""
    mnt = os.path.realpath(os.fspath(path))
    if not os.path.exists(mnt):
        raise ObdError("mount point does not exist (create the directory first)", path=mnt)
    if not os.path.isdir(mnt):
        raise ObdError("mount point is not a directory", path=mnt)
    entry = mount_entry(mnt)
    if entry is not None:
        what = "an obd disk" if entry.fstype == FSTYPE else f"{entry.fstype} from {entry.source}"
        raise ObdError(f"mount point is busy: {what} is mounted there (`obd umount` it first)", path=mnt)
    return mnt


def check_fuse_available() -> None:
    """Raise :class:`UnsupportedError` with the reason when this process cannot mount FUSE file systems."""
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnsupportedError(
            "FUSE is not available: the kernel has no FUSE support or /dev/fuse is missing "
            "(in a container: pass --device /dev/fuse)",
            path=FUSE_DEVICE,
        ) from None
    except OSError as e:
        raise UnsupportedError(
            f"FUSE is not available: cannot open it ({e.strerror})", path=FUSE_DEVICE
        ) from None
    os.close(fd)
    if os.geteuid() != 0 and not find_fusermount():
        raise UnsupportedError(
            "FUSE is not available to this user: fusermount3 is missing (Debian package fuse3)",
            path=FUSE_DEVICE,
        )


def find_fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount3", path=os.pathsep.join(_FUSERMOUNT_PATH))


def server_pid(mountpoint: str | os.PathLike[str]) -> int | None:
    """The pid of the process serving an obd mount (asked through the mount itself), or None."""
    try:
        return int(os.getxattr(os.fspath(mountpoint), PID_XATTR))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False, timeout: float = 60.0) -> int | None:
    """Unmount an obd mount and wait until its server has closed the image (written everything).

    Returns the server's pid (None if it could not be asked). A busy mount (the file is open, or a
    loop device uses it) is an error unless ``lazy``, which detaches it now and lets the server go
    when the last user closes the file.
    """
    mnt = os.path.realpath(os.fspath(mountpoint))
    entry = mount_entry(mnt)
    if entry is None:
        raise ObdError("not mounted", path=mnt)
    if entry.fstype != FSTYPE:
        raise ObdError(f"not an obd mount ({entry.fstype} from {entry.source}); use umount", path=mnt)
    pid = server_pid(mnt)
    fusermount = find_fusermount()
    if fusermount:
        cmd = [fusermount, "-u", *(["-z"] if lazy else []), mnt]
    else:
        cmd = ["umount", *(["-l"] if lazy else []), mnt]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        text = msg[-1] if msg else f"{cmd[0]} exited with {proc.returncode}"
        if "busy" in text.lower():
            raise ObdError(
                "mount is busy: the disk file is open or a loop device uses it (detach it with "
                "`losetup -d`, or `obd umount --lazy`)",
                path=mnt,
            )
        raise ObdError(f"cannot unmount: {text}", path=mnt)
    if pid is not None and not lazy:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise ObdError(
                    f"unmounted, but the server (pid {pid}) is still running after {timeout:.0f} s",
                    path=mnt,
                    field="pid",
                    value=pid,
                )
            time.sleep(0.02)
    return pid


__all__ = [
    "FSNAME",
    "FSTYPE",
    "FUSE_DEVICE",
    "PID_XATTR",
    "MountEntry",
    "check_fuse_available",
    "check_mountpoint",
    "find_fusermount",
    "mount_entry",
    "mounts",
    "server_pid",
    "unmount",
]
