"""An image as a block device: the one implementation every frontend serves (nbd plugin, FUSE file).

A :class:`Device` is an opened stack with a block device's operations and their semantics, shared
by all the clients of one server process (thread-safe):

* **read** fills the caller's buffer with :meth:`Stack.readinto` (no copies).
* **write** goes to the stack's RW upper: an upper directory (``upper=DIR``, created on first use,
  see :mod:`obd.image.upper`) or the upper of a ``config.v1.json``. Append-mode uppers take any
  alignment (the stack read-modify-writes partial sectors). Sparse uppers are written in whole
  file-system blocks (:attr:`Device.granule`): their holes *are* their index, so a partly written
  block would hide the lower layers' bytes in the rest of that block after a reopen.
* **flush** makes every write acknowledged so far durable (data, then index), and saves a trace
  being recorded.
* **zero** becomes discard (zeroed) mappings. A sparse upper forgets discards when reopened (they
  are holes), so where a lower layer has data under the range real zeros are written instead
  (refused with ENOTSUP for a *fast* zero). **trim** discards whole granules only; on a sparse
  upper it skips granules over lower data, so the device reads the same before and after a restart.
* **extents** lists data / zero / hole runs; **cache** prefetches a range.
* The upper's data file is ``flock``ed while a writable device has it open: a second server on the
  same RW layer fails with "in use".

:class:`DeviceOptions` are the ``key=value`` parameters that say what to open (the nbd plugin's, and
what ``obd mount`` builds from its command line); :func:`open_device` opens it. Errors a frontend
must hand to its client become an errno through :func:`errno_of`, the one mapping both frontends use.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from obd.errors import AlignmentError, LayerStateError, ObdError
from obd.image.accel import META_KEY
from obd.image.acceltrace import load_image_trace
from obd.image.local import open_config
from obd.image.resolve import image_config
from obd.image.upper import open_upper
from obd.io.source import ZEROS
from obd.lsmt.format import SECTOR
from obd.prefetch.trace import TraceRecorder, load, replay

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions
    from obd.lsmt.stack import Stack

log = logging.getLogger(__name__)

_CACHE_CHUNK = 4 << 20


class DeviceError(ObdError):
    """A request the device refuses, with the errno its client should see (EROFS, EINVAL, ENOTSUP)."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


def errno_of(e: BaseException, readonly: bool) -> int:
    """The errno a client gets for ``e``, raised while serving a device (``readonly``: it is read-only).

    A refused request carries its own; a misaligned one is EINVAL; writing a read-only stack EROFS;
    an OS error keeps its errno; every other engine error (a corrupt block, a bad checksum) is EIO.
    """
    if isinstance(e, DeviceError):
        return e.errno
    if isinstance(e, AlignmentError):
        return errno.EINVAL
    if isinstance(e, LayerStateError) and readonly:
        return errno.EROFS
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO


# --- options --------------------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(key: str, value: str) -> bool:
    """A ``key=value`` boolean: true/false, yes/no, on/off or 1/0."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ObdError("expected a boolean (true/false, yes/no, on/off, 1/0)", field=key, value=value)


def canonical_key(key: str) -> str:
    """A parameter's name with ``_`` spelt ``-`` (both are accepted: ``cache_dir`` is ``cache-dir``)."""
    return key.replace("_", "-")


def absolute_path(path: str) -> str:
    """``path`` made absolute (``~`` expanded): parameters outlive the current directory."""
    return os.path.abspath(os.path.expanduser(path))


@dataclass
class DeviceOptions:
    """What to open and how: the ``key=value`` parameters of :attr:`KEYS` (docs/nbd.md lists them).

    Paths are made absolute as they are set (a server may change directory later: nbdkit chdirs to /
    when it forks). A frontend with parameters of its own subclasses this and extends :meth:`set`.
    """

    #: Every key :meth:`set` takes (``_`` may be written for ``-``), for the unknown-key message.
    KEYS: ClassVar[tuple[str, ...]] = (
        "image",
        "layer",
        "config",
        "upper",
        "sparse",
        "readonly",
        "platform",
        "cache-dir",
        "cache-limit",
        "no-cache",
        "insecure-registry",
        "tls-verify",
        "ca-file",
        "hosts-dir",
        "proxy",
        "p2p-proxy",
        "p2p-ping-url",
        "p2p-address",
        "readahead",
        "trace",
        "record-trace",
        "acceleration",
        "verify",
        "verify-signature",
        "allow-referrers",
    )

    image: list[str] = field(default_factory=list)
    config: str | None = None
    upper: str | None = None
    sparse: bool = False
    readonly: bool = False
    platform: str | None = None
    cache_dir: str | None = None
    cache_limit: str | None = None
    no_cache: bool = False
    insecure: list[str] = field(default_factory=list)
    tls_verify: bool = True
    ca_file: str | None = None
    hosts_dirs: list[str] = field(default_factory=list)
    proxy: str | None = None
    p2p_proxy: str | None = None
    p2p_ping_url: str | None = None
    p2p_address: str | None = None
    readahead: int = -1  # obd.registry.blob.READAHEAD_AUTO (importing it here would load aiohttp)
    trace: str | None = None
    record_trace: str | None = None
    acceleration: bool = True
    verify: str = "auto"  # require|auto|off: digest-table checks (docs/verify.md)
    verify_signature: str | None = None  # a cosign public key file
    allow_referrers: bool = False

    def set(self, key: str, value: str) -> None:
        """Apply one ``key=value``; an unknown key or a bad value is an :class:`ObdError` naming it."""
        name = canonical_key(key)
        if name in ("image", "layer"):
            if value.startswith("oci:"):
                value = "oci:" + absolute_path(value[4:])
            elif os.path.exists(value):
                value = absolute_path(value)
            self.image.append(value)
        elif name == "config":
            self.config = absolute_path(value)
        elif name == "upper":
            self.upper = absolute_path(value)
        elif name == "sparse":
            self.sparse = parse_bool(key, value)
        elif name == "readonly":
            self.readonly = parse_bool(key, value)
        elif name == "platform":
            self.platform = value
        elif name == "cache-dir":
            self.cache_dir = absolute_path(value)
        elif name == "cache-limit":
            self.cache_limit = value
        elif name == "no-cache":
            self.no_cache = parse_bool(key, value)
        elif name == "insecure-registry":
            self.insecure.append(value)
        elif name == "tls-verify":
            self.tls_verify = parse_bool(key, value)
        elif name == "ca-file":
            self.ca_file = absolute_path(value)
        elif name == "hosts-dir":
            self.hosts_dirs.append(absolute_path(value))
        elif name in ("proxy", "p2p-proxy", "p2p-ping-url", "p2p-address"):
            setattr(self, name.replace("-", "_"), value)
        elif name == "trace":
            self.trace = absolute_path(value)
        elif name == "record-trace":
            self.record_trace = absolute_path(value)
        elif name in ("acceleration", "acceleration-layer"):
            self.acceleration = parse_bool(key, value)
        elif name == "verify":
            if value not in ("require", "auto", "off"):
                raise ObdError("verify must be require, auto or off", field=key, value=value)
            self.verify = value
        elif name == "verify-signature":
            self.verify_signature = absolute_path(value)
        elif name == "allow-referrers":
            self.allow_referrers = parse_bool(key, value)
        elif name == "readahead":
            from obd.image.remote import parse_readahead  # loaded for registry images only

            self.readahead = parse_readahead(value)
        else:
            raise ObdError(f"unknown parameter (known: {', '.join(self.KEYS)})", field=key)

    def check(self) -> None:
        """Refuse contradictory or missing image parameters (once every key is set)."""
        if self.config and self.image:
            raise ObdError("give image=/layer= or config=, not both", field="config")
        if not (self.image or self.config or self.upper):
            raise ObdError("no image: give image=IMAGE, layer=FILE..., config=FILE or upper=DIR")
        if len(self.image) > 1 and any(s.startswith("oci:") for s in self.image):
            raise ObdError("an oci:DIR[:TAG] image is a whole stack; give it alone", field="image")

    def remote(self) -> RemoteOptions:
        """Registry options for registry images (made the process default; credentials come from
        $OBD_REGISTRY_USER/_PASSWORD or ~/.docker/config.json, never from the parameters)."""
        # the registry client costs ~80 ms to import: only when it is asked for
        from obd.cache.store import parse_size
        from obd.image.remote import RemoteOptions, set_default_remote_options
        from obd.registry.dragonfly import P2PConfig

        insecure: bool | tuple[str, ...] = (
            True if "true" in self.insecure or "*" in self.insecure else (tuple(self.insecure))
        )
        opts = RemoteOptions(
            insecure=insecure,
            tls_verify=self.tls_verify,
            ca_file=self.ca_file,
            cache_dir=self.cache_dir,
            cache_limit=parse_size(self.cache_limit) if self.cache_limit else None,
            no_cache=self.no_cache,
            platform=self.platform,
            readahead=self.readahead,
            hosts_dirs=tuple(self.hosts_dirs) if self.hosts_dirs else None,
            proxy=self.proxy,
            p2p=P2PConfig.from_options(self.p2p_proxy, self.p2p_address, self.p2p_ping_url),
            verify=self.verify,
            verify_signature=self.verify_signature,
            allow_referrers=self.allow_referrers,
        )
        set_default_remote_options(opts)
        return opts

    @property
    def specs(self) -> list[str]:
        return [self.config] if self.config else list(self.image)


# --- opening --------------------------------------------------------------------------------------
def open_device(opts: DeviceOptions, *, remote: RemoteOptions | None = None) -> Device:
    """Resolve the image and open the stack (the one place images are resolved; registry refs plug in
    through :func:`obd.image.resolve.image_config`). ``remote`` replaces the registry options the
    parameters give (``obd mount`` has its own, with credentials)."""
    if remote is None:
        remote = opts.remote()
    upper_dir = None
    if opts.upper:
        upper_dir, cfg = open_upper(
            opts.upper,
            opts.specs or None,
            sparse=opts.sparse,
            platform=opts.platform,
            create=not opts.readonly,
        )
    else:
        cfg = image_config(opts.specs, platform=opts.platform, remote=remote)
    stack = None
    try:
        stack = open_config(cfg, readonly=opts.readonly, remote=remote)
        dev = Device(stack, upper_dir=upper_dir, readonly=opts.readonly)
        dev.needs_io_loop = bool(cfg.repoBlobUrl)
        dev.image_config, dev.remote = cfg, remote
        if opts.record_trace:
            dev.recorder = TraceRecorder(stack)
            dev.trace_path = opts.record_trace
        return dev
    except BaseException:
        if stack is not None:
            stack.close()
        if upper_dir is not None:
            upper_dir.unlock()
        raise


def _fs_block(path: str) -> int:
    try:
        bs = os.statvfs(path).f_bsize
    except OSError:
        bs = 4096
    return bs if 4096 <= bs <= (1 << 20) and bs & (bs - 1) == 0 else 4096


# --- the device -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extent:
    """A run of the device: ``kind`` is ``"data"``, ``"zero"`` (discarded) or ``"hole"`` (unmapped)."""

    offset: int
    length: int
    kind: str


class Device:
    """A stack as a block device: the operations with their block-device semantics (thread-safe)."""

    def __init__(self, stack: Stack, *, upper_dir: Any = None, readonly: bool = False):
        self.stack = stack
        self.upper_dir = upper_dir
        self.size = stack.size
        self.readonly = readonly or stack.readonly
        upper = stack.upper
        self.sparse = bool(upper is not None and getattr(upper, "sparse", False))
        #: write granularity: partial granules are read-modify-written whole
        self.granule = _fs_block(upper.data_path) if self.sparse and upper is not None else SECTOR
        self._rmw_lock = threading.Lock()
        self._scratch = threading.local()
        self._lock_fd: int | None = None
        #: remote layers (registry images) need the I/O loop started after a server forks
        self.needs_io_loop = False
        #: a prefetch trace being recorded (``record-trace=``), saved on flush and close
        self.recorder: Any = None
        self.trace_path: str | None = None
        #: the image's overlaybd config (its ``obd`` metadata may name an acceleration layer) and the
        #: registry options its layers are read with
        self.image_config: Any = None
        self.remote: Any = None
        if upper is not None and not self.readonly:
            self._lock_upper(upper.data_path)

    def _lock_upper(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LayerStateError("RW layer is in use by another process", path=path) from None
        self._lock_fd = fd

    @property
    def description(self) -> str:
        st = self.stack
        parts = [f"obd: {st.name}", f"{len(st.lowers)} layer(s)"]
        if st.upper is not None:
            where = self.upper_dir.path if self.upper_dir is not None else st.upper.data_path
            parts.append(f"upper {where} ({'sparse' if self.sparse else 'append'})")
        if self.readonly:
            parts.append("read-only")
        return ", ".join(parts)

    # --- checks -----------------------------------------------------------------------------------
    def _range(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise DeviceError(
                errno.EINVAL, f"range [{offset}, {offset + count}) is outside the {self.size}-byte device"
            )

    def _writable(self) -> None:
        if self.readonly:
            raise DeviceError(errno.EROFS, "the device is read-only")

    # --- I/O --------------------------------------------------------------------------------------
    def read(self, buf: memoryview, offset: int) -> None:
        self._range(offset, len(buf))
        self.stack.readinto(buf, offset)

    def write(self, buf: Any, offset: int) -> None:
        self._writable()
        view = memoryview(buf).cast("B")
        n = len(view)
        self._range(offset, n)
        g = self.granule
        end = offset + n
        if g == SECTOR or (not offset % g and (not end % g or end == self.size)):
            self.stack.pwrite(view, offset)
            return
        a = offset - offset % g
        b = min(end + (-end % g), self.size)
        with self._rmw_lock:
            tmp = bytearray(b - a)
            mv = memoryview(tmp)
            if a < offset:
                self.stack.readinto(mv[: min(g, b - a)], a)
            if end < b:
                tail = end - end % g
                self.stack.readinto(mv[tail - a :], tail)
            mv[offset - a : end - a] = view
            self.stack.pwrite(mv, a)

    def _write_zeros(self, offset: int, count: int) -> None:
        step = len(ZEROS)
        pos = offset
        while pos < offset + count:
            k = min(step, offset + count - pos)
            self.write(ZEROS[:k], pos)
            pos += k

    def _aligned(self, offset: int, count: int) -> tuple[int, int]:
        """The granule-aligned interior of a range (the device end counts as aligned)."""
        g = self.granule
        end = offset + count
        a = offset + (-offset % g)
        b = end if end == self.size else end - end % g
        return a, max(a, b)

    def zero(self, count: int, offset: int, *, fast: bool = False) -> None:
        """Make the range read as zeros, durably across a reopen."""
        self._writable()
        self._range(offset, count)
        if not count:
            return
        if not self.sparse:
            self.stack.zero(offset, count)
            return
        a, b = self._aligned(offset, count)
        data = self._lower_data(a, b) if b > a else []
        if fast and data:
            raise DeviceError(errno.ENOTSUP, "zeroing over lower data in a sparse upper means writing zeros")
        end = offset + count
        if b <= a:
            self._write_zeros(offset, count)
            return
        if offset < a:
            self._write_zeros(offset, a - offset)
        pos = a
        for da, db in data:
            if da > pos:
                self.stack.zero(pos, da - pos)
            self._write_zeros(da, db - da)
            pos = db
        if pos < b:
            self.stack.zero(pos, b - pos)
        if b < end:
            self._write_zeros(b, end - b)

    def _lower_data(self, a: int, b: int) -> list[tuple[int, int]]:
        """Granule-rounded ranges of ``[a, b)`` where some lower layer maps data (merged, sorted)."""
        g = self.granule
        out: list[tuple[int, int]] = []
        for o, ln, _m, z, _t in self.stack.lower_index.lookup(a // SECTOR, -(-b // SECTOR)):
            if z:
                continue
            x = max(a, o * SECTOR)
            y = min(b, (o + ln) * SECTOR)
            x -= (x - a) % g
            y = min(b, y + (-(y - a) % g))
            if out and x <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], y))
            else:
                out.append((x, y))
        return out

    def trim(self, count: int, offset: int) -> None:
        """Discard the whole granules of the range (its contents become unspecified).

        A sparse upper only discards where no lower layer has data: elsewhere a discard would read
        as zeros until the next reopen and as the lower data after it, so the range is left as it
        is (trim is advisory) and the device reads the same before and after a restart.
        """
        self._writable()
        self._range(offset, count)
        a, b = self._aligned(offset, count)
        if b <= a:
            return
        if not self.sparse:
            self.stack.zero(a, b - a)
            return
        pos = a
        for da, db in self._lower_data(a, b):
            if da > pos:
                self.stack.zero(pos, da - pos)
            pos = db
        if pos < b:
            self.stack.zero(pos, b - pos)

    def flush(self) -> None:
        if not self.readonly:
            self.stack.flush()
        self.save_trace()  # a guest's sync is a good moment: a trace survives a later kill

    def extents(self, count: int, offset: int, *, window: int, limit: int, one: bool = False) -> list[Extent]:
        """Runs from ``offset`` over at most ``min(count, window)`` bytes, neighbours of one kind
        joined: at most ``limit`` of them, or just the first with ``one``."""
        self._range(offset, count)
        out: list[list[Any]] = []
        for e in self.stack.extents(offset, min(count, window)):
            kind = e.kind if e.kind in ("data", "zero") else "hole"
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == e.offset:
                out[-1][1] += e.length
            else:
                if (one and out) or len(out) >= limit:
                    break
                out.append([e.offset, e.length, kind])
        return [Extent(o, n, k) for o, n, k in out]

    def cache(self, count: int, offset: int) -> None:
        """Prefetch: the stack's own prefetch if it has one, else read through (warming its caches)."""
        self._range(offset, count)
        prefetch = getattr(self.stack, "prefetch", None)
        if callable(prefetch):
            prefetch(offset, count)
            return
        scratch = getattr(self._scratch, "buf", None)
        if scratch is None:
            scratch = self._scratch.buf = memoryview(bytearray(_CACHE_CHUNK))
        pos = offset
        while pos < offset + count:
            k = min(_CACHE_CHUNK, offset + count - pos)
            self.stack.readinto(scratch[:k], pos)
            pos += k

    def save_trace(self) -> None:
        if self.recorder is not None and self.trace_path:
            n = self.recorder.save(self.trace_path)
            log.info("recorded %d trace records in %s", n, self.trace_path)

    def close(self) -> None:
        try:
            self.save_trace()
            self.stack.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if self.upper_dir is not None:
                self.upper_dir.unlock()


# --- background prefetch --------------------------------------------------------------------------
def start_prefetch(dev: Device, opts: DeviceOptions) -> threading.Thread | None:
    """Replay a prefetch trace in the background while clients already read: ``trace=FILE``, else
    the image's acceleration layer (unless ``acceleration=false`` or while recording a trace, whose
    reads the replay would pollute). Returns the thread, if one was started."""
    if opts.trace:
        trace = opts.trace
        what, records = trace, lambda: load(trace)
    elif opts.acceleration and not opts.record_trace and dev.image_config is not None:
        if not (dev.image_config.extra.get("obd") or {}).get(META_KEY):
            return None
        cfg = dev.image_config
        what, records = "the image's acceleration layer", lambda: load_image_trace(cfg, dev.remote) or []
    else:
        return None
    thread = threading.Thread(target=_replay, args=(dev, what, records), name="obd-trace-replay", daemon=True)
    thread.start()
    return thread


def _replay(dev: Device, what: str, records: Callable[[], list[tuple[int, int, int]]]) -> None:
    try:
        res = replay(dev.stack, records())
        log.info(
            "replayed %d trace records (%d bytes) of %s in %.2f s", res.records, res.bytes, what, res.seconds
        )
    except Exception as e:  # prefetch is best effort; reads still work without it
        log.info("trace replay of %s failed: %s", what, e)


__all__ = [
    "Device",
    "DeviceError",
    "DeviceOptions",
    "Extent",
    "absolute_path",
    "canonical_key",
    "errno_of",
    "open_device",
    "parse_bool",
    "start_prefetch",
]
