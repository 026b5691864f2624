"""Locks on a blob's page table that let every process of a host share one cache safely.

Two kinds, both Linux *open file description* (OFD) byte-range locks (``fcntl`` ``F_OFD_SETLK``,
``F_OFD_SETLKW``, ``F_OFD_GETLK``) on the blob's ``.meta`` file:

* **fill claims** — a write lock on the records a fill is about to write, bytes
  ``[128 + 8·first, 128 + 8·(last + 1))`` for pages ``first..last``. A process that misses pages
  someone else has claimed does not fetch them: it waits for the claim to go, then reads the pages
  from the cache (fetching only those still absent, e.g. because the holder could not store them).
  So N processes missing one page at once fetch it once.
* **in use** — a read lock on byte 0 (the header, never claimed by a fill), held by every open
  :class:`~obd.cache.store.BlobCache`. Eviction tests it with ``F_OFD_GETLK`` and prefers idle blobs.

Why OFD locks and not ``flock`` or POSIX ``lockf``: they are byte-range (``flock`` is whole-file);
they belong to the open file description, so two threads with their own descriptions conflict just
as two processes do, and closing some *other* descriptor of the file does not drop them (POSIX locks
are per process and vanish on any ``close``); and the kernel drops them when the last descriptor
of the description closes — when the holder exits, ``kill -9`` included. A crashed fill's claim
therefore frees its waiters at once, and they fetch the pages themselves. Each claim opens its own
description through ``/proc/self/fd`` (``O_CLOEXEC``, so a spawned program never inherits it).

No fill waits for a lock while it holds one (it releases its own claims before waiting for others'),
so claims cannot deadlock. Threads of one process do not wait for each other: pages another thread
of this process has claimed are fetched again directly, and the upstream (``RemoteBlob``) shares the
GET already in flight, as it did before claims existed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading

import numpy as np

from obd.cache.layout import HEADER_SIZE, RECORD_SIZE

log = logging.getLogger("obd.cache")

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("hhqqi4x")
#: A claim splits a busy run around at most this many conflicting locks before waiting for the rest.
_MAX_SPLITS = 32
_BUSY = (errno.EAGAIN, errno.EACCES)


def _flock(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


def _span(first: int, last: int) -> tuple[int, int]:
    """The record bytes ``(start, length)`` of pages ``first..last``."""
    return HEADER_SIZE + first * RECORD_SIZE, (last - first + 1) * RECORD_SIZE


def _try_lock(fd: int, kind: int, start: int, length: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind, start, length))
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def _conflict(fd: int, start: int, length: int) -> tuple[int, int] | None:
    """``(start, end)`` bytes (end exclusive, -1 = to EOF) of a lock in the way of a write lock; or None."""
    raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
    kind, _, l_start, l_len, _ = _FLOCK.unpack(raw)
    if kind == fcntl.F_UNLCK:
        return None
    return l_start, (l_start + l_len if l_len else -1)


def mark_in_use(meta_fd: int) -> None:
    """Take the "in use" read lock on an open page table (dropped when ``meta_fd`` is closed)."""
    with contextlib.suppress(OSError):  # only eviction's preference depends on it
        _try_lock(meta_fd, fcntl.F_RDLCK, 0, 1)


def in_use(meta_path: str) -> bool:
    """True while some process (this one included) has the page table at ``meta_path`` open."""
    try:
        fd = os.open(meta_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _conflict(fd, 0, 1) is not None
    except OSError:
        return False
    finally:
        os.close(fd)


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page numbers → inclusive ``(first, last)`` runs of consecutive pages."""
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) > 1)
    starts = [int(pages[0]), *(int(pages[i + 1]) for i in breaks)]
    ends = [*(int(pages[i]) for i in breaks), int(pages[-1])]
    return list(zip(starts, ends, strict=True))


def _pages(runs: list[tuple[int, int]]) -> np.ndarray:
    if not runs:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate([np.arange(a, b + 1, dtype=np.int64) for a, b in runs]))


class Claim:
    """Pages one fill may fetch and store now, and runs it must wait for.

    ``owned`` are locked by this claim; ``shared`` are claimed by another thread of this process
    (fetch them too: the upstream shares the GET); ``busy`` runs are claimed by another process, or
    by a thread of this one that is itself waiting: :meth:`PageClaims.wait` for each after
    :meth:`release`.
    """

    def __init__(self, claims: PageClaims, fd: int, owned: list[tuple[int, int]]):
        self._claims = claims
        self._fd = fd
        self.owned = owned
        self.shared = np.empty(0, dtype=np.int64)
        self.busy: list[tuple[int, int]] = []

    def pages(self) -> np.ndarray:
        """The pages to fetch under this claim: owned and shared, sorted."""
        return np.union1d(_pages(self.owned), self.shared)

    def release(self) -> None:
        """Drop the claim. Call after the pages' records are written (or the fill gave up)."""
        self._claims._forget(self.owned)
        self.owned = []
        if self._fd >= 0:
            os.close(self._fd)  # drops every lock of this open file description
            self._fd = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PageClaims:
    """The fill claims of one open page table, for every thread of this process."""

    def __init__(self, meta_fd: int, name: str):
        self._meta_fd = meta_fd
        self._name = name
        self._mutex = threading.Lock()
        self._local: list[tuple[int, int]] = []  # runs claimed by this process's fills, held now
        self._warned = False

    def _open(self) -> int:
        # A description of its own, so the claim conflicts with this process's other claims too.
        try:
            return os.open(f"/proc/self/fd/{self._meta_fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: cannot lock cache fills (%s): processes may fetch pages twice", self._name, e
                )
            return -1

    def _forget(self, runs: list[tuple[int, int]]) -> None:
        if runs:
            with self._mutex:
                for run in runs:
                    self._local.remove(run)

    def claim(self, pages: np.ndarray) -> Claim:
        """Claim the sorted ``pages`` without waiting: see :class:`Claim` for what comes back."""
        fd = self._open()
        if fd < 0:  # unlocked: every page is this fill's to fetch
            unlocked = Claim(self, -1, [])
            unlocked.shared = pages
            return unlocked
        claim = Claim(self, fd, [])
        with self._mutex:
            mine = np.zeros(len(pages), dtype=bool)
            for a, b in self._local:
                mine |= (pages >= a) & (pages <= b)
            claim.shared = pages[mine]
            work = page_runs(pages[~mine])
            splits = 0
            while work:
                a, b = work.pop()
                start, length = _span(a, b)
                if _try_lock(fd, fcntl.F_WRLCK, start, length):
                    claim.owned.append((a, b))
                    continue
                splits += 1
                hit = _conflict(fd, start, length) if splits <= _MAX_SPLITS else (start, start + length)
                if hit is None:  # released in between: try again
                    work.append((a, b))
                    continue
                lo = max(a, (hit[0] - HEADER_SIZE) // RECORD_SIZE)
                hi = b if hit[1] < 0 else min(b, (hit[1] - HEADER_SIZE - 1) // RECORD_SIZE)
                claim.busy.append((lo, hi))
                if a < lo:
                    work.append((a, lo - 1))
                if hi < b:
                    work.append((hi + 1, b))
            self._local.extend(claim.owned)
        claim.owned.sort()
        claim.busy.sort()
        return claim

    def wait(self, run: tuple[int, int]) -> Claim:
        """Claim the pages ``run`` (inclusive), waiting for whoever holds them to finish or die."""
        fd = self._open()
        if fd < 0:
            unlocked = Claim(self, -1, [])
            unlocked.shared = _pages([run])
            return unlocked
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, *_span(*run)))
        except BaseException:
            os.close(fd)
            raise
        with self._mutex:
            self._local.append(run)
        return Claim(self, fd, [run])


__all__ = ["Claim", "PageClaims", "in_use", "mark_in_use", "page_runs"]
