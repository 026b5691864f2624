"""The file system of ``obd mount``: one directory holding one file, the disk (pyfuse3 + trio).

In the spirit of pyfuse3's ``examples/hello.py``: inode 1 is the mount's root directory, inode 2 the
disk file, and every other name is ENOENT. The bytes of the file are the device of an
:class:`obd.image.device.Device` (the engine's device, which the NBD frontend serves too: one
implementation of reads, granule-aligned writes to sparse uppers, flush and locking, and one
mapping of errors to errnos, :func:`obd.image.device.errno_of`).

* **read** fills a pooled 1 MiB buffer and hands a view of it to pyfuse3, which copies it to the
  kernel before this task yields again, so the buffer goes straight back to the pool. The kernel's
  largest request is 1 MiB. Where the bytes are at hand (page cache, memory: no wait) the trio
  thread fills it itself, decoding included: a hop to a worker thread and back costs more than
  decoding a cached 4 KiB block, and one request at a time (QD1) gains nothing from a thread. A
  large read while more requests wait in ``/dev/fuse`` (a queue depth above 1, kernel read-ahead)
  goes to a worker thread, so that it decodes (GIL released in the C codecs) while the trio thread
  takes the next request: the cores are then used at once. Anything that may block goes to a
  worker thread (:meth:`Device.read`, ``Stack.readinto``).
* **write** goes to the device's RW upper; writes past the end are cut short (ENOSPC at the end), as
  on a block device. **fsync** is :meth:`Device.flush`: every write acknowledged before it is durable.
* Blocking engine calls run on worker threads (``trio.to_thread``, at most ``threads`` at once) so the
  trio loop keeps taking requests; the GIL is released in file reads and C codecs.
* The size is fixed: truncating to another size is EPERM (``dd`` needs ``conv=notrunc``).
  ``chmod``/``chown``/``touch`` of the file work but last only as long as the mount.
* ``st_blocks`` counts the device's mapped data (refreshed at most once a second after writes), so
  ``du`` shows how much of the disk holds data. A read-only disk is opened with ``keep_cache``: its
  page cache survives reopening.
* The root directory's ``user.obd.pid`` extended attribute is the serving process's pid (``obd
  umount`` waits for it to finish closing the image).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import stat
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pyfuse3
import trio

from frontends.fuse import FSNAME, FUSE_DEVICE, PID_XATTR, mount_entry
from obd.errors import ObdError
from obd.image.device import Device, errno_of
from obd.io.source import fill_zero

log = logging.getLogger("obd.fuse")

ROOT_INO = pyfuse3.ROOT_INODE
DISK_INO = ROOT_INO + 1
#: The largest read or write the kernel sends (FUSE max_pages 256 × 4 KiB).
MAX_REQUEST = 1 << 20
#: Reads from this size on go to a worker thread when more requests are waiting: decoding one
#: takes longer than the hop there and back (tens of µs), and another core can take it meanwhile.
OFFLOAD_MIN = 256 << 10
#: Large cached reads handed to worker threads at once; more are decoded on the trio thread. Each
#: hand-off costs ~100 µs of trio machinery and every thread more fights for the GIL, so on 2 CPUs
#: one read in a worker beside the trio thread's own uses both cores, and a second only costs.
OFFLOAD_MAX = max(1, (os.cpu_count() or 2) - 1)
#: Worker threads doing engine work at once.
DEFAULT_THREADS = 16
#: ``read_ahead_kb`` of the mount's bdi: buffered sequential reads then arrive as 1 MiB requests.
DEFAULT_READAHEAD_KB = 1024
#: Seconds between recomputations of ``st_blocks`` while the disk is being written.
BLOCKS_REFRESH = 1.0
#: Seconds to wait for the kernel's INIT request after mounting.
INIT_TIMEOUT = 30.0
_DESCRIPTION_XATTR = b"user.obd.description"


class DiskFS(pyfuse3.Operations):
    """One read-only directory holding ``name``, the device's bytes."""

    def __init__(self, device: Device, *, name: str = "disk.img", threads: int = DEFAULT_THREADS):
        raw = os.fsencode(name)
        if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > 255:
            raise ObdError("not a usable file name", field="name", value=name)
        if threads < 1:
            raise ObdError("need at least one worker thread", field="threads", value=threads)
        super().__init__()
        self.device = device
        self.name = raw
        self.size = device.size
        self.readonly = device.readonly
        self.limiter = trio.CapacityLimiter(threads)
        self.threads = threads
        self._pool: list[bytearray] = []
        #: large cached reads in worker threads right now (at most OFFLOAD_MAX)
        self._offloaded = 0
        now = time.time_ns()
        self._times = {ROOT_INO: [now, now, now], DISK_INO: [now, now, now]}  # atime, mtime, ctime
        self._mode = {ROOT_INO: 0o555, DISK_INO: 0o444 if self.readonly else 0o644}
        self._owner = {ino: (os.geteuid(), os.getegid()) for ino in (ROOT_INO, DISK_INO)}
        self._blocks = 0
        self._blocks_at = 0.0
        self._dirty = True
        self._initialized: trio.Event | None = None
        #: polls the session's ``/dev/fuse`` fd: are requests waiting? (None: unknown, never offload)
        self._waiting: select.poll | None = None
        # a read-only disk never changes: let the kernel cache names and attributes for long
        self._timeout = 3600.0 if self.readonly else 1.0

    # --- attributes -------------------------------------------------------------------------------
    def mapped_blocks(self) -> int:
        """512-byte sectors of the device that hold data (upper first, then the merged lowers)."""
        stack = self.device.stack
        sectors = -(-self.size // 512)
        return sum(m[1] for m in stack.lookup(0, sectors) if not m[3])

    async def _refresh_blocks(self) -> None:
        if self._dirty and time.monotonic() - self._blocks_at >= BLOCKS_REFRESH:
            self._dirty = False
            self._blocks_at = time.monotonic()
            try:
                self._blocks = await trio.to_thread.run_sync(self.mapped_blocks, limiter=self.limiter)
            except Exception as e:  # only a statistic: never fail a stat over it
                log.warning("st_blocks: %s", e)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = self._timeout
        a.attr_timeout = self._timeout
        a.st_uid, a.st_gid = self._owner[inode]
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = self._times[inode]
        if inode == ROOT_INO:
            a.st_mode = stat.S_IFDIR | self._mode[inode]
            a.st_nlink = 2
            a.st_size = 0
            a.st_blocks = 0
        else:
            a.st_mode = stat.S_IFREG | self._mode[inode]
            a.st_nlink = 1
            a.st_size = self.size
            a.st_blocks = self._blocks
        a.st_blksize = 4096
        a.st_rdev = 0
        return a

    def _check(self, inode: int) -> None:
        if inode not in (ROOT_INO, DISK_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._check(inode)
        if inode == DISK_INO:
            await self._refresh_blocks()
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR if parent_inode == DISK_INO else errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(ROOT_INO)
        if name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(DISK_INO)

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check(inode)
        if fields.update_size and (inode != DISK_INO or attr.st_size != self.size):
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk's size is fixed (dd: conv=notrunc)
        now = time.time_ns()
        times = self._times[inode]
        if fields.update_mode:
            self._mode[inode] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid or fields.update_gid:
            uid, gid = self._owner[inode]
            self._owner[inode] = (
                attr.st_uid if fields.update_uid else uid,
                attr.st_gid if fields.update_gid else gid,
            )
        if fields.update_atime:
            times[0] = attr.st_atime_ns
        if fields.update_mtime:
            times[1] = attr.st_mtime_ns
        times[2] = now
        return await self.getattr(inode)

    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = -(-self.size // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        self._check(inode)
        if inode == ROOT_INO and name == PID_XATTR.encode():
            return str(os.getpid()).encode()
        if inode == ROOT_INO and name == _DESCRIPTION_XATTR:
            return self.device.description.encode("utf-8", "surrogateescape")
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        self._check(inode)
        return [PID_XATTR.encode(), _DESCRIPTION_XATTR] if inode == ROOT_INO else []

    # --- the directory ----------------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        self._check(inode)
        if inode != ROOT_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT_INO

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, await self.getattr(DISK_INO), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    # --- the disk file ----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        self._check(inode)
        if inode != DISK_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.readonly and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and self.size:  # libfuse asks for atomic O_TRUNC: it comes here
            raise pyfuse3.FUSEError(errno.EPERM)
        return pyfuse3.FileInfo(fh=DISK_INO, keep_cache=self.readonly)

    def _fail(self, where: str, e: Exception) -> pyfuse3.FUSEError:
        err = errno_of(e, self.readonly)
        log.error("%s: %s [%s]", where, e, errno.errorcode.get(err, err))
        return pyfuse3.FUSEError(err)

    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:  # type: ignore[override]  # any buffer works
        n = min(size, self.size - off)
        if n <= 0:
            return b""
        pooled = n <= MAX_REQUEST
        buf = (self._pool.pop() if self._pool else bytearray(MAX_REQUEST)) if pooled else bytearray(n)
        view = memoryview(buf)[:n]
        try:
            if n >= OFFLOAD_MIN and self._offloaded < OFFLOAD_MAX and self._requests_waiting():
                self._offloaded += 1
                try:
                    await trio.to_thread.run_sync(self.device.read, view, off, limiter=self.limiter)
                finally:
                    self._offloaded -= 1
            elif not self._read_cached(view, off):
                await trio.to_thread.run_sync(self.device.read, view, off, limiter=self.limiter)
        except Exception as e:
            raise self._fail(f"read {n} bytes at {off}", e) from None
        finally:
            if pooled:
                # pyfuse3 copies the reply to the kernel before this task yields again: no other
                # request can take the buffer from the pool while it is still being sent.
                self._pool.append(buf)
        return view

    def _requests_waiting(self) -> bool:
        """Whether the kernel has more requests queued for this mount (``/dev/fuse`` is readable)."""
        waiting = self._waiting
        return waiting is not None and bool(waiting.poll(0))

    def _read_cached(self, view: memoryview, off: int) -> bool:
        """Fill ``view`` right here if that cannot block: holes, zeros, and layer bytes in memory or
        the page cache (:meth:`obd.io.source.Source.readinto_nowait`: plain files, and ZFile blocks whose
        compressed bytes are cached, decoded on the spot). False sends the request to a worker thread.

        Handing a request to a thread and back costs ~50 µs, ten times a cached 4 KiB read; this is
        :meth:`Stack.readinto` for the case where no layer has to wait for a disk or a registry.
        """
        stack = self.device.stack
        files = stack.files
        stop = off + len(view)
        try:
            maps = stack.lookup(off >> 9, (stop + 511) >> 9)
            if len(maps) == 1:  # the usual case, one extent holds it all: no cutting
                o, ln, m, z, t = maps[0]
                if o << 9 <= off and stop <= (o + ln) << 9:
                    if z:
                        fill_zero(view)
                        return True
                    return files[t].readinto_nowait(view, (m << 9) + off - (o << 9)) == len(view)
            pos = off
            for o, ln, m, z, t in maps:
                a = max(o << 9, off)
                b = min((o + ln) << 9, stop)
                if a > pos:
                    fill_zero(view[pos - off : a - off])
                if z:
                    fill_zero(view[a - off : b - off])
                elif files[t].readinto_nowait(view[a - off : b - off], (m << 9) + a - (o << 9)) != b - a:
                    return False
                pos = b
        except ObdError:  # a bad block: the worker thread reads it again and reports it
            return False
        if pos < stop:
            fill_zero(view[pos - off :])
        return True

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        n = min(len(buf), self.size - off)
        if n <= 0:
            raise pyfuse3.FUSEError(errno.ENOSPC if n == 0 or off >= self.size else errno.EINVAL)
        data = memoryview(buf)[:n] if n < len(buf) else buf
        try:
            await trio.to_thread.run_sync(self.device.write, data, off, limiter=self.limiter)
        except Exception as e:
            raise self._fail(f"write {n} bytes at {off}", e) from None
        self._dirty = True
        now = time.time_ns()
        self._times[DISK_INO][1:] = [now, now]
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await trio.to_thread.run_sync(self.device.flush, limiter=self.limiter)
        except Exception as e:
            raise self._fail("fsync", e) from None

    async def flush(self, fh: int) -> None:
        return None  # close() is not a durability point; fsync is

    async def release(self, fh: int) -> None:
        return None

    # --- the main loop ----------------------------------------------------------------------------
    def init(self) -> None:
        # called while pyfuse3 answers the kernel's INIT request, before the answer is sent
        fd = session_fd()
        if fd is not None:
            self._waiting = select.poll()
            self._waiting.register(fd, select.POLLIN)
        if self._initialized is not None:
            self._initialized.set()

    async def run(
        self,
        mountpoint: str,
        *,
        readahead_kb: int = DEFAULT_READAHEAD_KB,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Serve requests until unmounted; the first SIGINT/SIGTERM/SIGHUP ends the session cleanly.

        Once the kernel has the answer to its INIT request (which resets the read-ahead), the
        mount's read-ahead is set and ``on_ready`` called.
        """
        self._initialized = trio.Event()
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:

                async def serve_requests() -> None:
                    await pyfuse3.main(min_tasks=2, max_tasks=max(8, 2 * self.threads))
                    nursery.cancel_scope.cancel()  # unmounted from outside: stop waiting for signals

                nursery.start_soon(serve_requests)
                with trio.move_on_after(INIT_TIMEOUT):
                    await self._initialized.wait()
                await trio.sleep(0)  # the INIT answer is written before its task yields
                if readahead_kb:
                    set_readahead(mountpoint, readahead_kb)
                if on_ready is not None:
                    on_ready()
                stopping = False
                async for signum in signals:
                    if not stopping:
                        log.info("%s: finishing requests and unmounting", signal.Signals(signum).name)
                        stopping = True
                        pyfuse3.terminate()
                    else:  # asked again: stop waiting for requests still in progress
                        nursery.cancel_scope.cancel()


def session_fd() -> int | None:
    """The fd of this process's FUSE session, which pyfuse3 does not expose: the one open on
    ``/dev/fuse`` (None unless there is exactly one). Only polled, to see whether requests wait."""
    found = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == FUSE_DEVICE:
                found.append(int(name))
        except (OSError, ValueError):
            continue
    return found[0] if len(found) == 1 else None


def set_readahead(mountpoint: str, kb: int) -> bool:
    """Set the mount's bdi ``read_ahead_kb``; ``mountpoint`` must be canonical (see :func:`mount_entry`)."""
    entry = mount_entry(mountpoint, resolve=False)
    if entry is None:
        return False
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(f"{kb}\n")
        return True
    except OSError as e:
        log.info("cannot set read_ahead_kb of %s: %s", mountpoint, e.strerror)
        return False


def serve(
    fs: DiskFS,
    mountpoint: str,
    *,
    allow_other: bool = False,
    readahead_kb: int = DEFAULT_READAHEAD_KB,
    on_ready: Callable[[], None] | None = None,
    debug: bool = False,
) -> None:
    """Mount ``fs`` on ``mountpoint``, serve it until unmounted or signalled, and make sure it is unmounted.

    ``on_ready`` is called once the mount is in place and requests are being served. The device is
    not closed here: the caller closes it after this returns (nothing can reach it any more).
    """
    mountpoint = os.path.realpath(mountpoint)  # now: once mounted, a stat of it needs this process
    options = {"default_permissions", f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if fs.readonly:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    fs._blocks = fs.mapped_blocks()
    fs._blocks_at = time.monotonic()
    fs._dirty = False
    try:
        pyfuse3.init(fs, mountpoint, options)
    except RuntimeError as e:
        if "mount" in str(e):  # the session exists but is not mounted: free it
            pyfuse3.close(unmount=False)
        raise ObdError(f"cannot mount ({e}; libfuse says why above)", path=mountpoint) from None
    try:
        trio.run(partial(fs.run, mountpoint, readahead_kb=readahead_kb, on_ready=on_ready))
    finally:
        pyfuse3.close(unmount=True)


__all__ = [
    "DEFAULT_READAHEAD_KB",
    "DEFAULT_THREADS",
    "DISK_INO",
    "MAX_REQUEST",
    "OFFLOAD_MIN",
    "ROOT_INO",
    "DiskFS",
    "serve",
    "session_fd",
]
