"""The nbdkit Python plugin's logic: obd stacks served over NBD (docs/nbd.md).

nbdkit loads ``frontends/nbd/plugin.py``, a thin script that fixes ``sys.path`` and star-imports
this module, whose public names are exactly nbdkit's callbacks. Everything here is importable and
testable without nbdkit: when the ``nbdkit`` module is missing (outside the server) a stand-in
with the same constants records errors and debug messages.

One :class:`Device` per nbdkit process, opened in ``get_ready`` (before nbdkit forks into the
background, so a bad image makes nbdkit fail to start with the error on stderr), shared by every
connection. Each connection's handle is a small :class:`Handle` over it.

* **Reads** fill the buffer nbdkit hands in with :meth:`Stack.readinto` (no copies).
* **Writes** go to the stack's RW upper: an upper directory (``upper=DIR``, created on first use,
  see :mod:`obd.image.upper`) or the upper of a ``config.v1.json``. Append-mode uppers take any
  alignment (the stack read-modify-writes partial sectors). Sparse uppers are written in whole
  filesystem blocks: their holes *are* their index, so a partly written block would hide the lower
  layers' bytes in the rest of that block after a reopen.
* **flush** makes every write acknowledged so far durable (data, then index); FUA is emulated by
  nbdkit with a flush after the write.
* **zero** becomes discard (zeroed) mappings. A sparse upper forgets discards when reopened (they
  are holes), so where a lower layer has data under the range real zeros are written instead
  (refused with ENOTSUP for a fast-zero request). **trim** discards whole blocks only (NBD lets
  the range read as anything afterwards); on a sparse upper it skips blocks over lower data, so
  the device reads the same before and after a restart.
* **Multi-conn** is always safe: all connections of the process share one stack (one in-memory
  index, one set of file descriptors), a write is in the files before it is acknowledged, and a
  flush on any connection fsyncs those shared files. A second process cannot open the same RW
  layer: the upper's data file is locked.
* **Errors**: an :class:`~obd.errors.ObdError` (corrupt block, bad checksum…) reaches the client
  as EIO and is logged by nbdkit with the engine's one-line message; writes to a read-only device
  are EROFS, requests outside the device EINVAL, a fast zero that would not be fast ENOTSUP.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

try:
    import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's embedded Python
except ImportError:  # outside nbdkit (unit tests, docs): a stand-in with the same constants
    import types as _types

    nbdkit = _types.SimpleNamespace(
        THREAD_MODEL_SERIALIZE_CONNECTIONS=0,
        THREAD_MODEL_SERIALIZE_ALL_REQUESTS=1,
        THREAD_MODEL_SERIALIZE_REQUESTS=2,
        THREAD_MODEL_PARALLEL=3,
        FLAG_MAY_TRIM=1,
        FLAG_FUA=2,
        FLAG_REQ_ONE=4,
        FLAG_FAST_ZERO=8,
        FUA_NONE=0,
        FUA_EMULATE=1,
        FUA_NATIVE=2,
        CACHE_NONE=0,
        CACHE_EMULATE=1,
        CACHE_NATIVE=2,
        EXTENT_HOLE=1,
        EXTENT_ZERO=2,
        errors=[],
        messages=[],
        shutdown=lambda: None,
    )
    nbdkit.set_error = nbdkit.errors.append
    nbdkit.debug = nbdkit.messages.append

from obd.errors import AlignmentError, LayerStateError, ObdError
from obd.io.source import ZEROS
from obd.lsmt.format import SECTOR
from obd.lsmt.stack import Stack

API_VERSION = 2

#: Largest request nbdkit may send us (its own limit is 64 MiB; QEMU splits at the maximum).
MAX_REQUEST = 32 << 20
#: One extents call looks at most this much of the device (the client asks again for the rest).
EXTENTS_WINDOW = 1 << 30
#: …and returns at most this many extents.
EXTENTS_MAX = 16384
_CACHE_CHUNK = 4 << 20


class NbdError(Exception):
    """An error with the errno the client should see."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


# --- configuration --------------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ObdError("expected a boolean (true/false, yes/no, on/off, 1/0)", field=key, value=value)


@dataclass
class Options:
    """The plugin's ``key=value`` parameters (docs/nbd.md lists them)."""

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
    readahead: int = 0
    trace: str | None = None
    record_trace: str | None = None
    acceleration: bool = True
    extents: bool = True
    multi_conn: bool = True
    venv: str | None = None

    def set(self, key: str, value: str) -> None:
        """Apply one ``key=value`` (paths are made absolute now: nbdkit chdirs to / when it forks)."""
        if key in ("image", "layer"):
            if value.startswith("oci:"):
                value = "oci:" + _abs(value[4:])
            elif os.path.exists(value):
                value = _abs(value)
            self.image.append(value)
        elif key == "config":
            self.config = _abs(value)
        elif key == "upper":
            self.upper = _abs(value)
        elif key == "sparse":
            self.sparse = parse_bool(key, value)
        elif key == "readonly":
            self.readonly = parse_bool(key, value)
        elif key == "platform":
            self.platform = value
        elif key in ("cache-dir", "cache_dir"):
            self.cache_dir = _abs(value)
        elif key in ("cache-limit", "cache_limit"):
            self.cache_limit = value
        elif key in ("no-cache", "no_cache"):
            self.no_cache = parse_bool(key, value)
        elif key in ("insecure-registry", "insecure_registry"):
            self.insecure.append(value)
        elif key in ("tls-verify", "tls_verify"):
            self.tls_verify = parse_bool(key, value)
        elif key in ("ca-file", "ca_file"):
            self.ca_file = _abs(value)
        elif key == "trace":
            self.trace = _abs(value)
        elif key in ("record-trace", "record_trace"):
            self.record_trace = _abs(value)
        elif key in ("acceleration", "acceleration-layer", "acceleration_layer"):
            self.acceleration = parse_bool(key, value)
        elif key == "readahead":
            from obd.cache.store import parse_size

            self.readahead = parse_size(value)
        elif key == "extents":
            self.extents = parse_bool(key, value)
        elif key in ("multi-conn", "multi_conn"):
            self.multi_conn = parse_bool(key, value)
        elif key == "venv":
            self.venv = value  # used by plugin.py before this module is imported
        else:
            raise ObdError(
                "unknown parameter (known: image, layer, config, upper, sparse, readonly, platform, "
                "cache-dir, cache-limit, no-cache, insecure-registry, tls-verify, ca-file, readahead, "
                "trace, record-trace, acceleration, extents, multi-conn, venv)",
                field=key,
            )

    def check(self) -> None:
        if self.config and self.image:
            raise ObdError("give image=/layer= or config=, not both", field="config")
        if not (self.image or self.config or self.upper):
            raise ObdError("no image: give image=IMAGE, layer=FILE..., config=FILE or upper=DIR")
        if len(self.image) > 1 and any(s.startswith("oci:") for s in self.image):
            raise ObdError("an oci:DIR[:TAG] image is a whole stack; give it alone", field="image")

    def remote(self):  # type: ignore[no-untyped-def]
        """Registry options for registry images (made the process default; credentials come from
        $OBD_REGISTRY_USER/_PASSWORD or ~/.docker/config.json, never from the command line)."""
        from obd.cache.store import parse_size
        from obd.image.remote import RemoteOptions, set_default_remote_options

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
        )
        set_default_remote_options(opts)
        return opts

    @property
    def specs(self) -> list[str]:
        return [self.config] if self.config else list(self.image)


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# --- the device -----------------------------------------------------------------------------------
def open_device(opts: Options) -> Device:
    """Resolve the image and open the stack (the one place images are resolved; registry refs plug in
    through :func:`obd.image.resolve.image_config`)."""
    from obd.image.local import open_config
    from obd.image.resolve import image_config
    from obd.image.upper import open_upper

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
            from obd.prefetch.trace import TraceRecorder

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


class Device:
    """A stack as an NBD device: the operations with their NBD semantics (thread-safe)."""

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
        #: remote layers (registry images) need the I/O loop started after nbdkit forks
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

    def block_size(self) -> tuple[int, int, int]:
        if self.readonly:
            return (1, 4096, MAX_REQUEST)
        return (self.granule, max(4096, self.granule), MAX_REQUEST)

    # --- checks -----------------------------------------------------------------------------------
    def _range(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise NbdError(
                errno.EINVAL, f"range [{offset}, {offset + count}) is outside the {self.size}-byte device"
            )

    def _writable(self) -> None:
        if self.readonly:
            raise NbdError(errno.EROFS, "the device is read-only")

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
            raise NbdError(errno.ENOTSUP, "zeroing over lower data in a sparse upper means writing zeros")
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
        """Discard the whole granules of the range (NBD: the range's contents become unspecified).

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

    def extents(self, count: int, offset: int, *, req_one: bool = False) -> list[tuple[int, int, int]]:
        """``(offset, length, type)`` runs from ``offset``: data 0, discarded ZERO, unmapped HOLE|ZERO."""
        self._range(offset, count)
        window = min(count, EXTENTS_WINDOW if not req_one else 64 << 20)
        hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
        zero = nbdkit.EXTENT_ZERO
        out: list[list[int]] = []
        for e in self.stack.extents(offset, window):
            t = 0 if e.kind == "data" else zero if e.kind == "zero" else hole
            if out and out[-1][2] == t and out[-1][0] + out[-1][1] == e.offset:
                out[-1][1] += e.length
            else:
                if req_one and out:
                    break
                if len(out) >= EXTENTS_MAX:
                    break
                out.append([e.offset, e.length, t])
        return [(o, n, t) for o, n, t in out]

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
            nbdkit.debug(f"obd: recorded {n} trace records in {self.trace_path}")

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


class Handle:
    """One client connection."""

    __slots__ = ("device", "readonly")

    def __init__(self, device: Device, readonly: bool):
        self.device = device
        self.readonly = readonly or device.readonly


# --- errors ---------------------------------------------------------------------------------------
def _errno_of(e: BaseException, device: Device | None) -> int:
    if isinstance(e, NbdError):
        return e.errno
    if isinstance(e, AlignmentError):
        return errno.EINVAL
    if isinstance(e, LayerStateError):
        return errno.EROFS if device is None or device.readonly else errno.EIO
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO


def fail(where: str, e: BaseException, device: Device | None = None) -> NoReturn:
    """Report ``e`` to nbdkit as the errno the client gets, log one line, and raise."""
    err = _errno_of(e, device)
    msg = f"obd: {where}: {e}" if isinstance(e, ObdError | NbdError) else f"obd: {where}: {e!r}"
    nbdkit.set_error(err)
    nbdkit.debug(msg)
    if isinstance(e, NbdError) and err in (errno.ENOTSUP, errno.EOPNOTSUPP):
        raise e  # an expected answer (fast zero), not an error worth a traceback in the log
    raise RuntimeError(f"{msg} [{errno.errorcode.get(err, err)}]") from None


def _guard(where: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as e:
                h = args[0] if args and isinstance(args[0], Handle) else None
                fail(where, e, h.device if h is not None else _STATE.device)

        return call

    return wrap


# --- process state --------------------------------------------------------------------------------
@dataclass
class _State:
    options: Options = field(default_factory=Options)
    device: Device | None = None


_STATE = _State()


def reset() -> None:
    """Forget the options and close the device (tests load the plugin many times in one process)."""
    if _STATE.device is not None:
        _STATE.device.close()
    _STATE.options = Options()
    _STATE.device = None


# --- nbdkit callbacks: lifecycle ------------------------------------------------------------------
def dump_plugin() -> None:
    from obd import __version__

    print(f"obd_version={__version__}")
    print(f"obd_python={sys.version.split()[0]}")


def _startup(what: str, fn: Callable[[], Any]) -> Any:
    """Run a startup step; an engine error stops nbdkit with its one-line message."""
    try:
        return fn()
    except ObdError as e:
        raise RuntimeError(f"obd: {what}: {e}") from None


def config(key: str, value: str) -> None:
    _startup(f"{key}={value}", lambda: _STATE.options.set(key, value))


def config_complete() -> None:
    _startup("parameters", _STATE.options.check)


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready() -> None:
    """Open the image now, so that a bad one stops nbdkit before it forks or listens."""
    if _STATE.device is None:
        _STATE.device = _startup("open", lambda: open_device(_STATE.options))
        nbdkit.debug(_STATE.device.description)


def after_fork() -> None:
    """Background threads (the registry client's event loop) must start here, in the forked child."""
    dev = _STATE.device
    if dev is not None and dev.needs_io_loop:
        from obd.registry.loop import default_runner

        default_runner().loop  # noqa: B018 - starts the loop thread
    if dev is not None:
        start_prefetch(dev, _STATE.options)


def start_prefetch(dev: Device, opts: Options) -> threading.Thread | None:
    """Replay a prefetch trace in the background while clients already read: ``trace=FILE``, else
    the image's acceleration layer (unless ``acceleration=false`` or while recording a trace, whose
    reads the replay would pollute). Returns the thread, if one was started."""
    from obd.prefetch.trace import load

    if opts.trace:
        what, records = opts.trace, lambda: load(opts.trace)
    elif opts.acceleration and not opts.record_trace and dev.image_config is not None:
        from obd.image.accel import META_KEY, load_image_trace

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
    from obd.prefetch.trace import replay

    try:
        res = replay(dev.stack, records())
        nbdkit.debug(
            f"obd: replayed {res.records} trace records ({res.bytes} bytes) of {what} in {res.seconds:.2f} s"
        )
    except Exception as e:  # prefetch is best effort; reads still work without it
        nbdkit.debug(f"obd: trace replay of {what} failed: {e}")


def cleanup() -> None:
    if _STATE.device is not None:
        try:
            _STATE.device.close()
        finally:
            _STATE.device = None


# --- nbdkit callbacks: connections ----------------------------------------------------------------
def open(readonly: bool) -> Handle:
    if _STATE.device is None:
        get_ready()
    assert _STATE.device is not None
    return Handle(_STATE.device, bool(readonly))


def close(h: Handle) -> None:
    pass


def export_description(h: Handle) -> str:
    return h.device.description


def get_size(h: Handle) -> int:
    return h.device.size


def block_size(h: Handle) -> tuple[int, int, int]:
    return h.device.block_size()


def is_rotational(h: Handle) -> bool:
    return False


def can_multi_conn(h: Handle) -> bool:
    return _STATE.options.multi_conn


def can_write(h: Handle) -> bool:
    return not h.readonly


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return not h.readonly


def can_zero(h: Handle) -> bool:
    return not h.readonly


def can_fast_zero(h: Handle) -> bool:
    return not h.readonly


def can_fua(h: Handle) -> int:
    return nbdkit.FUA_NONE if h.readonly else nbdkit.FUA_EMULATE


def can_cache(h: Handle) -> int:
    return nbdkit.CACHE_NATIVE


def can_extents(h: Handle) -> bool:
    return _STATE.options.extents


# --- nbdkit callbacks: I/O ------------------------------------------------------------------------
def pread(h: Handle, buf: memoryview, offset: int, flags: int) -> None:
    try:
        h.device.read(buf, offset)
    except Exception as e:
        fail("pread", e, h.device)


def pwrite(h: Handle, buf: memoryview, offset: int, flags: int) -> None:
    try:
        if h.readonly:
            raise NbdError(errno.EROFS, "the export is read-only")
        h.device.write(buf, offset)
        if flags & nbdkit.FLAG_FUA:
            h.device.flush()
    except Exception as e:
        fail("pwrite", e, h.device)


@_guard("flush")
def flush(h: Handle, flags: int) -> None:
    h.device.flush()


@_guard("trim")
def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    if h.readonly:
        raise NbdError(errno.EROFS, "the export is read-only")
    h.device.trim(count, offset)
    if flags & nbdkit.FLAG_FUA:
        h.device.flush()


@_guard("zero")
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    if h.readonly:
        raise NbdError(errno.EROFS, "the export is read-only")
    h.device.zero(count, offset, fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
    if flags & nbdkit.FLAG_FUA:
        h.device.flush()


@_guard("cache")
def cache(h: Handle, count: int, offset: int, flags: int) -> None:
    h.device.cache(count, offset)


@_guard("extents")
def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    return h.device.extents(count, offset, req_one=bool(flags & nbdkit.FLAG_REQ_ONE))


#: The callbacks plugin.py exports into nbdkit's ``__main__`` (star import).
__all__ = [
    "API_VERSION",
    "after_fork",
    "block_size",
    "cache",
    "can_cache",
    "can_extents",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_write",
    "can_zero",
    "cleanup",
    "close",
    "config",
    "config_complete",
    "dump_plugin",
    "export_description",
    "extents",
    "flush",
    "get_ready",
    "get_size",
    "is_rotational",
    "open",
    "pread",
    "pwrite",
    "thread_model",
    "trim",
    "zero",
]
