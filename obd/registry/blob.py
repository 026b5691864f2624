"""A registry blob as an :class:`obd.io.source.Source`: ranged GETs, shared and merged while in flight.

:class:`RemoteBlob` is what a remote layer reads through (directly, or wrapped by the block cache).
It is the one place obd decides which GETs a read becomes — readahead, merging of neighbouring and
nearly neighbouring ranges, sharing of fetches in flight — because it is the one layer every read
that may go to the network passes, with or without the cache; :class:`obd.cache.CachedSource`
only asks it for the pages it is missing. Its synchronous methods may be called from any number
of threads; the work happens on the :class:`~obd.registry.loop.AsyncRunner`'s loop, where all
state lives, so no locks are needed.

How a read becomes GETs:

1. The range is split against the *flights* the blob knows about — byte ranges that are being
   fetched, or were fetched recently and kept for readahead. Pieces already covered wait on those
   flights (``shared`` in the stats); only the gaps become new flights.
2. New flights wait ``coalesce_window`` seconds (default 1 ms) for neighbours. Then adjacent ones —
   or ones at most ``merge_gap`` bytes apart (default 8 KiB: another request costs more than that
   much bandwidth) — are merged into one GET of at most ``max_merge`` bytes (``coalesced`` counts
   the flights that rode along in another's GET; the bytes between them are fetched and dropped).
3. With ``readahead`` > 0, a read whose following bytes are not already (mostly) in flight also
   fetches the next ``readahead`` bytes, and completed flights are kept (up to ``keep_bytes``) to
   serve the reads that follow. With 0 nothing is kept: caching is the block cache's job. With
   :data:`READAHEAD_AUTO` only a *sequential* read (one starting where a recent read of this blob
   ended) reads ahead: :data:`AUTO_FIRST` for the first, twice as much for each next one of the
   run, up to the link's bandwidth-delay product (:class:`LinkEstimate`, measured from the
   client's own range GETs, between :data:`AUTO_MIN` and :data:`AUTO_MAX`): one round trip's
   worth of bytes is what a reader streaming at the link's rate would otherwise wait for, and a
   short run (a small file) costs little.

Each flight keeps the Dragonfly priority of its read (:func:`obd.registry.dragonfly.read_priority`:
on-demand, or prefetch inside :func:`~obd.registry.dragonfly.background_reads`); readahead bytes are
prefetch; a merged GET carries the highest priority of its flights.

The contract the cache relies on is ``name``, ``size`` and ``fetch_many(ranges)`` returning exactly
the bytes of each ``(offset, length)`` or raising.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from obd.errors import RegistryError
from obd.io.priority import PRIORITY_PREFETCH, read_priority, reads_at
from obd.io.source import Source
from obd.observability import stats as st
from obd.registry.client import RegistryClient
from obd.registry.loop import AsyncRunner
from obd.registry.reference import Reference, parse_reference, validate_digest

DEFAULT_COALESCE_WINDOW = 0.001
DEFAULT_MAX_MERGE = 4 << 20
DEFAULT_MERGE_GAP = 8 << 10
DEFAULT_TIMEOUT = 300.0
#: ``readahead`` value: read ahead on sequential reads only, by the bandwidth-delay product.
READAHEAD_AUTO = -1
#: Bounds of the automatic readahead (before any GET was timed: :data:`AUTO_MIN`); the first read
#: ahead of a sequential run is at most :data:`AUTO_FIRST`.
AUTO_MIN = 128 << 10
AUTO_MAX = 4 << 20
AUTO_FIRST = 32 << 10
#: Flights kept for the reads that follow, with automatic readahead.
AUTO_KEEP = 2 * AUTO_MAX
#: GETs up to this size time the round trip; from :data:`RATE_SAMPLE` up, the throughput.
RTT_SAMPLE = 32 << 10
RATE_SAMPLE = 256 << 10
#: Weight of a new throughput sample in :class:`LinkEstimate`'s moving average.
EWMA = 0.25
#: Small GETs the round trip is the least of.
RTT_WINDOW = 32
#: How many recent read ends of a blob a read is compared with to call it sequential.
RECENT_ENDS = 16


class LinkEstimate:
    """Round-trip time and throughput of a registry client's link, from the timings of its range GETs.

    A small GET costs about one round trip; a large one a round trip plus its bytes at the link's
    rate. The round trip is the *least* of the last :data:`RTT_WINDOW` small GETs (a GET queued
    behind others on a busy link takes longer, and a readahead sized by that would make the link
    busier still); the rate a moving average (:data:`EWMA`). Concurrent GETs share the link, so the
    rate is per GET and the product a conservative estimate. Loop-thread state only.
    """

    __slots__ = ("_rtts", "rate")

    def __init__(self) -> None:
        self._rtts: deque[float] = deque(maxlen=RTT_WINDOW)
        self.rate: float | None = None

    @property
    def rtt(self) -> float | None:
        """The round trip (seconds), None before any small GET."""
        return min(self._rtts) if self._rtts else None

    def observe(self, nbytes: int, seconds: float) -> None:
        """Account one GET of ``nbytes`` that took ``seconds`` from request to the last body byte."""
        if nbytes <= RTT_SAMPLE:
            self._rtts.append(seconds)
        elif nbytes >= RATE_SAMPLE:
            rate = nbytes / max(1e-4, seconds - (self.rtt or 0.0))
            self.rate = rate if self.rate is None else (1 - EWMA) * self.rate + EWMA * rate

    def readahead(self) -> int:
        """The bandwidth-delay product, 64 KiB-aligned, within [:data:`AUTO_MIN`, :data:`AUTO_MAX`]."""
        rtt = self.rtt
        if rtt is None or self.rate is None:
            return AUTO_MIN
        bdp = int(self.rate * rtt) & ~0xFFFF
        return max(AUTO_MIN, min(AUTO_MAX, bdp))


_links: weakref.WeakKeyDictionary[RegistryClient, LinkEstimate] = weakref.WeakKeyDictionary()


def link_estimate(client: RegistryClient) -> LinkEstimate:
    """The :class:`LinkEstimate` every remote blob of ``client`` shares (one link per client)."""
    link = _links.get(client)
    if link is None:
        link = _links[client] = LinkEstimate()
    return link


class _Flight:
    """Bytes ``[start, end)`` of the blob, being fetched (``future`` unresolved) or fetched."""

    __slots__ = ("end", "future", "priority", "start")

    def __init__(self, start: int, end: int, future: asyncio.Future[memoryview], priority: int):
        self.start = start
        self.end = end
        self.future = future
        self.priority = priority


class RemoteBlob(Source):
    """Blob ``digest`` of repository ``repo`` read with ranged GETs; see the module docstring."""

    def __init__(
        self,
        client: RegistryClient,
        runner: AsyncRunner,
        repo: Reference | str,
        digest: str,
        size: int | None = None,
        name: str | None = None,
        *,
        coalesce_window: float = DEFAULT_COALESCE_WINDOW,
        max_merge: int = DEFAULT_MAX_MERGE,
        merge_gap: int = DEFAULT_MERGE_GAP,
        readahead: int = 0,
        keep_bytes: int | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        stats: st.Stats | None = None,
    ):
        self.client = client
        self.runner = runner
        self.ref = repo if isinstance(repo, Reference) else parse_reference(repo)
        self.digest = validate_digest(digest)
        self.name = name or f"{self.ref.name}@{digest}"
        if max_merge < 1 or merge_gap < 0 or readahead < READAHEAD_AUTO or coalesce_window < 0:
            raise RegistryError(
                "max_merge must be positive; merge_gap and coalesce_window not negative; readahead "
                "a byte count or READAHEAD_AUTO",
                path=self.name,
            )
        self.coalesce_window = coalesce_window
        self.max_merge = max_merge
        self.merge_gap = merge_gap
        self.readahead = readahead
        if keep_bytes is None:
            keep_bytes = AUTO_KEEP if readahead == READAHEAD_AUTO else 4 * readahead
        self.keep_bytes = keep_bytes
        self.link = link_estimate(client)
        self.timeout = timeout
        self.stats = stats if stats is not None else client.stats
        # loop-thread state
        self._flights: list[_Flight] = []  # sorted by start, never overlapping
        self._pending: list[_Flight] = []
        self._flush_handle: asyncio.Handle | None = None
        self._kept: deque[_Flight] = deque()
        self._kept_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = -1
        self._ends: dict[int, int] = {}  # end of a recent read -> how many sequential reads led there
        #: a page cache above plans the readahead (:meth:`delegate_readahead`), under its fill claims
        self._delegated = False
        self._delegated_ends: dict[int, int] = {}
        self._delegated_lock = threading.Lock()
        if size is None:
            size = runner.run(client.blob_size(self.ref, digest), timeout)
        if size < 0:
            raise RegistryError("negative blob size", path=self.name, value=size)
        self.size = size

    # -- synchronous API (any thread) ----------------------------------------------------------

    def delegate_readahead(self) -> Callable[[int, int], int]:
        """Hand readahead to the page cache above: from now on this blob fetches exactly what it is
        asked, and the cache calls the returned ``plan(start, end)`` with each read it misses on to
        learn how many bytes after ``end`` to fetch with it. The cache claims those pages before it
        fetches them, so N processes sharing one host cache read ahead once, not N times; bytes read
        ahead here instead would be fetched outside the claims and never stored."""
        self._delegated = True
        return self._delegated_window

    def _delegated_window(self, start: int, end: int) -> int:
        if self.readahead != READAHEAD_AUTO:
            window = self.readahead
        else:
            with self._delegated_lock:
                ends = self._delegated_ends
                streak = ends.pop(start, -1) + 1
                window = min(self.link.readahead(), AUTO_FIRST << (streak - 1)) if streak else 0
                # the next miss of a sequential reader is where this readahead stops (the pages
                # before it are cache hits the plan never sees)
                ends[end + max(0, min(window, self.size - end))] = streak
                if len(ends) > RECENT_ENDS:
                    del ends[next(iter(ends))]
        return max(0, min(window, self.size - end))

    def fetch(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (which must lie inside the blob), or an error."""
        self._check(offset, length)
        if length == 0:
            return b""
        return self.runner.run(self._read(offset, offset + length), self.timeout)

    def fetch_many(self, ranges: Sequence[tuple[int, int]] | Iterable[tuple[int, int]]) -> list[bytes]:
        """The bytes of every ``(offset, length)``, fetched concurrently (and merged where adjacent)."""
        ranges = list(ranges)
        for offset, length in ranges:
            self._check(offset, length)
        if not ranges:
            return []
        return self.runner.run(self._read_many(ranges), self.timeout)

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset >= self.size or len(buf) == 0:
            return 0
        n = min(len(buf), self.size - offset)
        data = self.fetch(offset, n)
        buf[:n] = data
        return n

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegistryError(
                f"range [{offset}, {offset + length}) is outside the blob's {self.size} bytes", path=self.name
            )

    # -- loop side -----------------------------------------------------------------------------

    async def _read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return list(await asyncio.gather(*(self._read(o, o + n) for o, n in ranges)))

    def _reset_if_new_loop(self) -> None:
        if self._generation != self.runner.generation:
            # first use, or the runner was restarted (after fork): old futures belong to a dead loop
            self._flights, self._pending, self._kept = [], [], deque()
            self._kept_bytes = 0
            self._flush_handle = None
            self._tasks = set()
            self._ends = {}
            self._generation = self.runner.generation

    async def _read(self, start: int, end: int) -> bytes:
        self._reset_if_new_loop()
        self.stats.incr(st.READS)
        plan_end = end
        readahead = 0 if self._delegated else self.readahead
        if readahead == READAHEAD_AUTO:
            streak = self._ends.pop(start, -1) + 1  # 0: not sequential
            # like the kernel's: the first sequential read ahead is small, each next one doubles,
            # up to the bandwidth-delay product
            readahead = min(self.link.readahead(), AUTO_FIRST << (streak - 1)) if streak else 0
            self._ends[end] = streak
            if len(self._ends) > RECENT_ENDS:
                del self._ends[next(iter(self._ends))]
        if readahead and end < self.size:
            ahead = self._covered_to(end)
            if ahead - end < readahead // 2 and ahead < self.size:
                plan_end = min(self.size, ahead + readahead)
                self.stats.incr(st.READAHEAD_BYTES, plan_end - ahead)
        pieces = self._cover(start, plan_end, end)
        need = [f for f in pieces if f.start < end]
        results = await asyncio.gather(*(asyncio.shield(f.future) for f in need))
        if len(need) == 1 and need[0].start == start and need[0].end == end:
            return bytes(results[0])
        out = bytearray(end - start)
        for f, data in zip(need, results, strict=True):
            lo, hi = max(start, f.start), min(end, f.end)
            out[lo - start : hi - start] = data[lo - f.start : hi - f.start]
        return bytes(out)

    def _covered_to(self, pos: int) -> int:
        """The end of the run of flights that starts exactly at ``pos`` (``pos`` if none does)."""
        i = bisect.bisect_right(self._flights, pos, key=lambda f: f.start) - 1
        i = max(i, 0)
        while i < len(self._flights):
            f = self._flights[i]
            if f.start > pos:
                break
            if f.end > pos:
                pos = f.end
            i += 1
        return pos

    def _cover(self, start: int, end: int, wanted_end: int) -> list[_Flight]:
        """Flights covering ``[start, end)`` in order: existing ones, plus new ones for the gaps."""
        out: list[_Flight] = []
        pos = start
        i = max(0, bisect.bisect_right(self._flights, start, key=lambda f: f.start) - 1)
        existing = self._flights[i:]
        for f in existing:
            if f.start >= end:
                break
            if f.end <= pos:
                continue
            if f.start > pos:
                out.extend(self._new_flights(pos, f.start, wanted_end))
            out.append(f)
            if f.start < wanted_end:
                self.stats.incr(st.SHARED)
            pos = f.end
            if pos >= end:
                break
        if pos < end:
            out.extend(self._new_flights(pos, end, wanted_end))
        return out

    def _new_flights(self, start: int, end: int, wanted_end: int) -> list[_Flight]:
        """Flights for ``[start, end)``: those a read waits on (starting below ``wanted_end``) at the
        read's priority, pure readahead at prefetch priority."""
        loop = asyncio.get_running_loop()
        priority = read_priority()
        made = []
        while start < end:
            stop = min(end, start + self.max_merge)
            prio = priority if start < wanted_end else min(priority, PRIORITY_PREFETCH)
            flight = _Flight(start, stop, loop.create_future(), prio)
            bisect.insort(self._flights, flight, key=lambda f: f.start)
            self._pending.append(flight)
            made.append(flight)
            start = stop
        if self._flush_handle is None:
            if self.coalesce_window > 0:
                self._flush_handle = loop.call_later(self.coalesce_window, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)
        return made

    def _flush(self) -> None:
        self._flush_handle = None
        pending = sorted(self._pending, key=lambda f: f.start)
        self._pending = []
        groups: list[list[_Flight]] = []
        for f in pending:
            if groups:
                g = groups[-1]
                if f.start - g[-1].end <= self.merge_gap and f.end - g[0].start <= self.max_merge:
                    g.append(f)
                    continue
            groups.append([f])
        loop = asyncio.get_running_loop()
        for g in groups:
            self.stats.incr(st.FETCHES)
            if len(g) > 1:
                self.stats.incr(st.COALESCED, len(g) - 1)
            task = loop.create_task(self._fetch_group(g))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fetch_group(self, group: list[_Flight]) -> None:
        lo, hi = group[0].start, group[-1].end
        started = time.monotonic()
        try:
            with reads_at(max(f.priority for f in group)):
                data = await self.client.read_range(self.ref, self.digest, lo, hi - lo, size=self.size)
        except BaseException as e:
            self.stats.add_time(st.TIME_FETCH, time.monotonic() - started)
            for f in group:
                self._drop(f)
                if not f.future.done():
                    f.future.set_exception(
                        e if isinstance(e, Exception) else RegistryError("fetch cancelled")
                    )
                    f.future.exception()  # marked retrieved: readahead flights may have no waiter
            if not isinstance(e, Exception):
                raise
            return
        took = time.monotonic() - started
        self.stats.add_time(st.TIME_FETCH, took)
        self.link.observe(hi - lo, took)
        view = memoryview(data)
        for f in group:
            if not f.future.done():
                f.future.set_result(view[f.start - lo : f.end - lo])
        if self.keep_bytes <= 0:
            for f in group:
                self._drop(f)
            return
        for f in group:
            self._kept.append(f)
            self._kept_bytes += f.end - f.start
        while self._kept_bytes > self.keep_bytes and self._kept:
            old = self._kept.popleft()
            self._kept_bytes -= old.end - old.start
            self._drop(old)

    def _drop(self, flight: _Flight) -> None:
        i = bisect.bisect_left(self._flights, flight.start, key=lambda f: f.start)
        if i < len(self._flights) and self._flights[i] is flight:
            del self._flights[i]


__all__ = [
    "DEFAULT_COALESCE_WINDOW",
    "DEFAULT_MAX_MERGE",
    "DEFAULT_MERGE_GAP",
    "READAHEAD_AUTO",
    "LinkEstimate",
    "RemoteBlob",
    "link_estimate",
]
