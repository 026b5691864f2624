#!/usr/bin/env -S nbdkit python
"""The nbdkit plugin script ``obd run`` starts: obd's nbd plugin plus ``stats-file=PATH``.

Everything is :mod:`frontends.nbd.backend` (loaded through ``frontends/nbd/plugin.py``, which puts
the engine and its venv on ``sys.path``); this adds one parameter so that the launcher, a different
process, can report what the server fetched:

``stats-file=PATH``
    the process's fetch and cache counters (:meth:`obd.observability.stats.Stats.snapshot`) written there as
    JSON, atomically, every ``stats-interval`` seconds (default 0.5) while serving and once more
    when nbdkit shuts down.
``prefetch-meta=inodes|all|BOOL``
    once serving, read the ext4 metadata of the disk in the background (:mod:`frontends.run.prefetch`)
    so that a lazily fetched image has it cached before the guest looks: ``inodes`` (or true) the
    superblock, group descriptors and used inode tables, ``all`` also every directory.
"""

import builtins
import json
import os
import sys
import threading

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from frontends.nbd import plugin as _base  # noqa: E402 - sets up sys.path, imports the backend

_backend = _base._need()
for _name in _backend.__all__:
    globals()[_name] = getattr(_backend, _name)

_stats_path = None
_stats_interval = 0.5
_prefetch_meta = False
_stop = threading.Event()


def _write_stats():
    if not _stats_path:
        return
    from obd.observability.stats import default_stats

    tmp = f"{_stats_path}.tmp{os.getpid()}"
    with builtins.open(tmp, "w", encoding="utf-8") as f:  # plain ``open`` is nbdkit's callback here
        json.dump(default_stats().snapshot(), f)
    os.replace(tmp, _stats_path)


def _writer():
    while not _stop.wait(_stats_interval):
        try:
            _write_stats()
        except Exception as e:  # statistics are best effort
            _backend.nbdkit.debug(f"obd: cannot write stats: {e}")


def config(key, value):
    global _stats_path, _stats_interval, _prefetch_meta
    if key in ("stats-file", "stats_file"):
        _stats_path = os.path.abspath(value)
    elif key in ("stats-interval", "stats_interval"):
        _stats_interval = max(0.05, float(value))
    elif key in ("prefetch-meta", "prefetch_meta"):
        v = value.strip().lower()
        _prefetch_meta = (
            v if v in ("inodes", "all") else "inodes" if _backend.parse_bool(key, value) else False
        )
    else:
        _base.config(key, value)


def config_complete():
    _base.config_complete()


def _prefetch(stack):
    import time

    from frontends.run.prefetch import ext4_metadata, prefetch_ranges

    def read(offset, length):
        buf = bytearray(length)
        n = stack.readinto(memoryview(buf), offset)
        return bytes(buf[:n])

    try:
        t0 = time.monotonic()
        ranges = ext4_metadata(read, stack.size, directories=_prefetch_meta == "all")
        res = prefetch_ranges(stack.readinto, ranges, workers=16)
        _backend.nbdkit.debug(
            f"obd: prefetched {res.bytes} bytes of ext4 metadata in {res.ranges} reads, "
            f"{time.monotonic() - t0:.2f} s"
        )
    except Exception as e:  # an optimisation only
        _backend.nbdkit.debug(f"obd: metadata prefetch failed: {e}")


def after_fork():
    _backend.after_fork()
    if _stats_path:
        threading.Thread(target=_writer, name="obd-stats", daemon=True).start()
    dev = _backend._STATE.device
    if _prefetch_meta and dev is not None:
        threading.Thread(target=_prefetch, args=(dev.stack,), name="obd-prefetch-meta", daemon=True).start()


def cleanup():
    _stop.set()
    try:
        _backend.cleanup()
    finally:
        _write_stats()
