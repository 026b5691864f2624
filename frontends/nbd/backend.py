"""The nbdkit Python plugin's logic: obd stacks served over NBD (docs/nbd.md).

nbdkit loads ``frontends/nbd/plugin.py``, a thin script that fixes ``sys.path`` and star-imports
this module, whose public names are exactly nbdkit's callbacks. Everything here is importable and
testable without nbdkit: when the ``nbdkit`` module is missing (outside the server) a stand-in
with the same constants records errors and debug messages.

The device is :class:`obd.image.device.Device` (the engine's, shared with the FUSE frontend: reads,
block-aligned writes to sparse uppers, zero/trim over lower data, flush, upper locking); this module
adds what is NBD's. One device per nbdkit process, opened in ``get_ready`` (before nbdkit forks into
the background, so a bad image makes nbdkit fail to start with the error on stderr), shared by every
connection; each connection's handle is a small :class:`Handle` over it.

* **Parameters** are :class:`PluginOptions`: the device's (:class:`~obd.image.device.DeviceOptions`:
  ``image=``, ``layer=``, ``config=``, ``upper=``, ``sparse=``, ``readonly=``, registry and trace
  keys) and the server's own:

  ``extents=BOOL``, ``multi-conn=BOOL``
      report holes and zeros; advertise multi-conn (both default true).
  ``venv=DIR``
      a venv with obd's dependencies (read by ``plugin.py`` before this module is imported).
  ``stats-file=PATH``, ``stats-interval=SECONDS``
      the process's fetch and cache counters (:meth:`obd.observability.stats.Stats.snapshot`)
      written there as JSON, atomically, every ``stats-interval`` seconds (default 0.5) while
      serving and once more when nbdkit shuts down (``obd run`` reads them from another process).
  ``prefetch-meta=inodes|all|BOOL``
      once serving, read the ext4 metadata of the disk in the background (:mod:`obd.prefetch.ext4`)
      so that a lazily fetched image has it cached before the guest looks: ``inodes`` (or true) the
      superblock, group descriptors and used inode tables, ``all`` also every directory.
  ``prefetch-exec=PROGRAM`` (repeatable), ``prefetch-exec-path=PATH``
      once serving, read in the background what starting PROGRAM reads from the ext4 root: its path
      (looked up in PATH unless it holds a ``/``), its ELF dynamic loader and libraries
      (:mod:`obd.prefetch.startup`); ``obd run`` passes the image's command and ``PATH``.
  ``profile=BOOL``
      print on stderr where the start's time went once the disk is ready, and the whole profile
      when nbdkit shuts down (:func:`obd.observability.stats.format_profile`; ``obd nbd --profile``).
  ``params-from=FILE``
      more parameters, as a JSON list of ``[key, value]`` pairs in FILE, which may appear later:
      ``get_ready`` waits for it (up to :data:`PARAMS_TIMEOUT`) with the engine and the registry
      client already imported, so that nbdkit's start overlaps whatever makes the parameters
      (``obd run`` spawns nbdkit before it resolves the image, then writes the image's config).
* **FUA** is emulated by nbdkit with a flush after the write; **block sizes** follow the device's
  write granule.
* **Multi-conn** is always safe: all connections of the process share one stack (one in-memory
  index, one set of file descriptors), a write is in the files before it is acknowledged, and a
  flush on any connection fsyncs those shared files. A second process cannot open the same RW
  layer: the upper's data file is locked.
* **Errors** map to errnos with :func:`obd.image.device.errno_of`: an
  :class:`~obd.errors.ObdError` (corrupt block, bad checksum…) reaches the client as EIO and is
  logged by nbdkit with the engine's one-line message; writes to a read-only device are EROFS,
  requests outside the device EINVAL, a fast zero that would not be fast ENOTSUP.
* **Messages** of the engine's device (trace recorded or replayed) go to ``nbdkit.debug``.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

try:
    import nbdkit  # provided by nbdkit's embedded Python
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

from obd import __version__
from obd.errors import ObdError
from obd.image import device as _device
from obd.image.device import (
    Device,
    DeviceError,
    DeviceOptions,
    absolute_path,
    canonical_key,
    errno_of,
    open_device,
    parse_bool,
    start_prefetch,
)
from obd.io.priority import background_reads
from obd.io.publish import publishing
from obd.observability.stats import default_stats
from obd.prefetch.ext4 import prefetch_metadata
from obd.prefetch.startup import DEFAULT_PATH, prefetch_startup

API_VERSION = 2

#: Largest request nbdkit may send us (its own limit is 64 MiB; QEMU splits at the maximum).
MAX_REQUEST = 32 << 20
#: One extents call looks at most this much of the device (the client asks again for the rest)…
EXTENTS_WINDOW = 1 << 30
#: …or this much for a ``REQ_ONE`` request…
EXTENTS_WINDOW_ONE = 64 << 20
#: …and returns at most this many extents.
EXTENTS_MAX = 16384
#: Shortest ``stats-interval``.
MIN_STATS_INTERVAL = 0.05
#: How long ``get_ready`` waits for a ``params-from`` file, and how often it looks.
PARAMS_TIMEOUT = 600.0
PARAMS_POLL = 0.002
#: Largest ``params-from`` file read.
MAX_PARAMS_BYTES = 1 << 20


# --- configuration --------------------------------------------------------------------------------
@dataclass
class PluginOptions(DeviceOptions):
    """The plugin's ``key=value`` parameters: the device's, and the server's own (docs/nbd.md)."""

    KEYS: ClassVar[tuple[str, ...]] = (
        *DeviceOptions.KEYS,
        "extents",
        "multi-conn",
        "stats-file",
        "stats-interval",
        "prefetch-meta",
        "prefetch-exec",
        "prefetch-exec-path",
        "profile",
        "venv",
        "params-from",
    )

    extents: bool = True
    multi_conn: bool = True
    venv: str | None = None
    stats_file: str | None = None
    stats_interval: float = 0.5
    prefetch_meta: str | None = None  # "inodes" or "all"
    profile: bool = False  # print where the start's time went (docs/performance.md) on stderr
    prefetch_exec: list[str] = field(default_factory=list)  # programs whose start to prefetch
    prefetch_exec_path: str | None = None  # the PATH they are looked up in
    params_from: str | None = None  # a file of more parameters, waited for in get_ready

    def set(self, key: str, value: str) -> None:
        name = canonical_key(key)
        if name == "extents":
            self.extents = parse_bool(key, value)
        elif name == "multi-conn":
            self.multi_conn = parse_bool(key, value)
        elif name == "profile":
            self.profile = parse_bool(key, value)
        elif name == "prefetch-exec":
            self.prefetch_exec.append(value)
        elif name == "prefetch-exec-path":
            self.prefetch_exec_path = value
        elif name == "params-from":
            self.params_from = absolute_path(value)
        elif name == "venv":
            self.venv = value  # used by plugin.py before this module is imported
        elif name == "stats-file":
            self.stats_file = absolute_path(value)
        elif name == "stats-interval":
            try:
                self.stats_interval = max(MIN_STATS_INTERVAL, float(value))
            except ValueError:
                raise ObdError("expected a number of seconds", field=key, value=value) from None
        elif name == "prefetch-meta":
            v = value.strip().lower()
            self.prefetch_meta = v if v in ("inodes", "all") else "inodes" if parse_bool(key, value) else None
        else:
            super().set(key, value)


class Handle:
    """One client connection."""

    __slots__ = ("device", "readonly")

    def __init__(self, device: Device, readonly: bool):
        self.device = device
        self.readonly = readonly or device.readonly


# --- errors and messages --------------------------------------------------------------------------
def fail(where: str, e: BaseException, device: Device | None = None) -> NoReturn:
    """Report ``e`` to nbdkit as the errno the client gets, log one line, and raise."""
    err = errno_of(e, device is None or device.readonly)
    msg = f"obd: {where}: {e}" if isinstance(e, ObdError) else f"obd: {where}: {e!r}"
    nbdkit.set_error(err)
    nbdkit.debug(msg)
    if isinstance(e, DeviceError) and err in (errno.ENOTSUP, errno.EOPNOTSUPP):
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


def _read_only(h: Handle) -> None:
    if h.readonly:
        raise DeviceError(errno.EROFS, "the export is read-only")


class _NbdkitDebug(logging.Handler):
    """The engine's device messages (trace recorded, replayed) as nbdkit debug lines."""

    def emit(self, record: logging.LogRecord) -> None:
        nbdkit.debug(f"obd: {record.getMessage()}")


_device.log.addHandler(_NbdkitDebug())
_device.log.setLevel(logging.DEBUG)


# --- process state --------------------------------------------------------------------------------
@dataclass
class _State:
    options: PluginOptions = field(default_factory=PluginOptions)
    device: Device | None = None
    #: set when nbdkit shuts down: ends the statistics writer
    stop: threading.Event = field(default_factory=threading.Event)
    #: the process that ran get_ready (nbdkit forks into the background after it, unless -f)
    ready_pid: int | None = None


_STATE = _State()


def reset() -> None:
    """Forget the options and close the device (tests load the plugin many times in one process)."""
    _STATE.stop.set()
    if _STATE.device is not None:
        _STATE.device.close()
    _STATE.options = PluginOptions()
    _STATE.device = None
    _STATE.stop = threading.Event()


# --- statistics and metadata prefetch ---------------------------------------------------------------
def write_stats() -> None:
    """Publish the process's counters at ``stats-file=`` (a lost file costs nothing: not fsynced)."""
    path = _STATE.options.stats_file
    if path:
        with publishing(path, "w", durable=False, encoding="utf-8") as f:
            json.dump(default_stats().snapshot(), f)


def _stats_writer(stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            write_stats()
        except Exception as e:  # statistics are best effort
            nbdkit.debug(f"obd: cannot write stats: {e}")


@background_reads()  # the walk's own reads too: nobody waits on them (and they are no guest wait)
def _prefetch_metadata(dev: Device, directories: bool) -> None:
    try:
        t0 = time.monotonic()
        res = prefetch_metadata(dev.stack, directories=directories)
        nbdkit.debug(
            f"obd: prefetched {res.bytes} bytes of ext4 metadata in {res.ranges} reads, "
            f"{time.monotonic() - t0:.2f} s"
        )
    except Exception as e:  # an optimisation only
        nbdkit.debug(f"obd: metadata prefetch failed: {e}")


@background_reads()
def _prefetch_startup(dev: Device, programs: list[str], search_path: str) -> None:
    try:
        t0 = time.monotonic()
        res = prefetch_startup(dev.stack, programs, search_path=search_path)
        nbdkit.debug(
            f"obd: prefetched {res.bytes} bytes for starting {' '.join(programs)} in {res.ranges} reads, "
            f"{time.monotonic() - t0:.2f} s"
        )
    except Exception as e:  # an optimisation only
        nbdkit.debug(f"obd: start-up prefetch failed: {e}")


# --- nbdkit callbacks: lifecycle ------------------------------------------------------------------
def dump_plugin() -> None:
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
    if _STATE.options.params_from is None:  # else checked once the rest has arrived (get_ready)
        _startup("parameters", _STATE.options.check)


def _await_params(opts: PluginOptions) -> None:
    """Wait for ``opts.params_from``, then take its ``[key, value]`` pairs as parameters.

    While the file is not there yet (the launcher still resolving the image), import the registry
    client and aiohttp (0.3 s together), which a registry image needs as soon as it opens; a file
    already there (a warm resolve, 0.08 s) goes straight to the open, which loads them only if it
    reads the registry."""
    path = opts.params_from
    assert path is not None
    if not os.path.exists(path):
        from obd.image import remote as _remote  # noqa: F401 - imported while the caller is still busy
    if not os.path.exists(path):
        import aiohttp  # noqa: F401 - likewise (obd.registry's docstring)
    deadline = time.monotonic() + PARAMS_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ObdError(
                f"no parameters arrived within {PARAMS_TIMEOUT:.0f} s", path=path, field="params-from"
            )
        time.sleep(PARAMS_POLL)
    try:
        with builtins.open(path, "rb") as f:  # this module's open() is nbdkit's callback
            pairs = json.loads(f.read(MAX_PARAMS_BYTES + 1))
    except (OSError, ValueError) as e:
        raise ObdError(f"cannot read the parameters: {e}", path=path, field="params-from") from None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise ObdError(
            "parameters must be a JSON list of [key, value] strings", path=path, field="params-from"
        )
    for key, value in pairs:
        if canonical_key(key) == "params-from":
            raise ObdError("params-from cannot name another file", path=path, field=key)
        opts.set(key, value)
    opts.check()


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready() -> None:
    """Open the image now, so that a bad one stops nbdkit before it forks or listens."""
    _STATE.ready_pid = os.getpid()
    if _STATE.device is None:
        if _STATE.options.params_from is not None:
            _startup("params-from", lambda: _await_params(_STATE.options))
        started = time.monotonic()
        _STATE.device = _startup("open", lambda: open_device(_STATE.options))
        nbdkit.debug(_STATE.device.description)
        if _STATE.options.profile:
            ready = {"disk ready (image resolved, layers opened)": time.monotonic() - started}
            print(default_stats().format_profile(ready), file=sys.stderr, flush=True)


def _python_after_fork() -> None:
    """Tell Python it was forked. nbdkit forks in C, so none of Python's own fork handling ran: the
    threads the parent had (the registry loop, its resolver pool) still look alive to ``threading``,
    and interpreter exit would wait forever to join them (a stopped nbdkit that never exits). This
    is what ``os.fork()`` calls in the child, with the GIL held as here."""
    ctypes.pythonapi.PyOS_AfterFork_Child()


def after_fork() -> None:
    """Background threads must start here, in the forked child: the registry client's event loop,
    the trace replay, the statistics writer and the metadata prefetch."""
    if _STATE.ready_pid is not None and os.getpid() != _STATE.ready_pid:
        _python_after_fork()
    dev, opts = _STATE.device, _STATE.options
    if dev is not None and dev.needs_io_loop:
        from obd.registry.loop import default_runner  # the registry client: for registry images only

        default_runner().loop  # noqa: B018 - starts the loop thread
    if dev is not None:
        start_prefetch(dev, opts)
    if opts.stats_file:
        threading.Thread(
            target=_stats_writer, args=(_STATE.stop, opts.stats_interval), name="obd-stats", daemon=True
        ).start()
    if opts.prefetch_exec and dev is not None:
        threading.Thread(
            target=_prefetch_startup,
            args=(dev, opts.prefetch_exec, opts.prefetch_exec_path or DEFAULT_PATH),
            name="obd-prefetch-exec",
            daemon=True,
        ).start()
    if opts.prefetch_meta and dev is not None:
        threading.Thread(
            target=_prefetch_metadata,
            args=(dev, opts.prefetch_meta == "all"),
            name="obd-prefetch-meta",
            daemon=True,
        ).start()


def cleanup() -> None:
    _STATE.stop.set()
    try:
        if _STATE.device is not None:
            try:
                _STATE.device.close()
            finally:
                _STATE.device = None
    finally:
        write_stats()
        if _STATE.options.profile:
            print(default_stats().format_profile(), file=sys.stderr, flush=True)


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
    """(minimum, preferred, maximum): any alignment read-only, else the device's write granule."""
    dev = h.device
    if dev.readonly:
        return (1, 4096, MAX_REQUEST)
    return (dev.granule, max(4096, dev.granule), MAX_REQUEST)


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
        _read_only(h)
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
    _read_only(h)
    h.device.trim(count, offset)
    if flags & nbdkit.FLAG_FUA:
        h.device.flush()


@_guard("zero")
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    _read_only(h)
    h.device.zero(count, offset, fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
    if flags & nbdkit.FLAG_FUA:
        h.device.flush()


@_guard("cache")
def cache(h: Handle, count: int, offset: int, flags: int) -> None:
    h.device.cache(count, offset)


#: NBD ``base:allocation`` flags of the device's extent kinds.
_EXTENT_TYPE = {"data": 0, "zero": nbdkit.EXTENT_ZERO, "hole": nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO}


@_guard("extents")
def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    """Runs from ``offset``: data 0, discarded ZERO, unmapped HOLE|ZERO (at most 1 GiB, 16384 runs)."""
    one = bool(flags & nbdkit.FLAG_REQ_ONE)
    runs = h.device.extents(
        count, offset, window=EXTENTS_WINDOW_ONE if one else EXTENTS_WINDOW, limit=EXTENTS_MAX, one=one
    )
    return [(e.offset, e.length, _EXTENT_TYPE[e.kind]) for e in runs]


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
