"""``CachedSource``: a remote blob read through the persistent page cache.

A read is mapped to pages. Pages the page table marks present are read from the data file with
one ``preadv`` per run and CRC-checked; a page that fails is dropped, counted, logged and fetched
again. The missing pages of the whole read go to the upstream in **one** ``fetch_many`` call, one
range per run of neighbouring missing pages, so a 4 KiB read costs at most the two pages it touches.

Which GETs those ranges become is the upstream's business, not the cache's: the registry's
:class:`~obd.registry.blob.RemoteBlob` sees every read that may go to the network (it also serves
uncached reads), so it alone merges nearly neighbouring ranges, sizes readahead and shares fetches
already in flight between threads of this process. Across processes, a fill first claims the
pages it will fetch (:mod:`obd.cache.claims`); pages another process has claimed are not fetched
but waited for and then read from the cache, so N processes missing a page fetch it once. For the
same reason readahead is *fetched* here: an upstream that offers ``delegate_readahead`` says how
far past a missed read to go, and those pages join the read's fill, claimed and stored like it.

Fetched pages are written to the data file, made durable (see :class:`CacheStore` ``sync``) and
only then marked present. The caller's bytes never depend on the cache write succeeding: a full
disk or a cache over its limit is logged and counted, and the read is served from the fetched bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from obd.cache.claims import page_runs
from obd.cache.store import BlobCache, CacheStore, page_crcs
from obd.errors import ObdError
from obd.io.priority import PRIORITY_PREFETCH, read_priority
from obd.io.source import Source
from obd.observability.stats import (
    CACHE_BYTES,
    CACHE_HITS,
    CACHE_MISSES,
    READAHEAD_BYTES,
    TIME_WAIT,
    Stats,
)

log = logging.getLogger("obd.cache")

#: ``prefetch`` fills in windows of this many blob bytes (one ``fetch_many`` call each; the upstream
#: splits long ranges into GETs of its own size).
PREFETCH_WINDOW = 64 << 20
#: A read gives up after this many rounds of finding the blob's cache files evicted under it.
_MAX_ROUNDS = 8

# Counters recorded besides obd.observability.stats' CACHE_HITS / CACHE_MISSES (pages) and CACHE_BYTES (bytes
# of reads served from the cache).
MISS_BYTES = "cache_miss_bytes"
FETCH_CALLS = "cache_fetch_calls"
FETCH_RANGES = "cache_fetch_ranges"
FETCH_BYTES = "cache_fetch_bytes"
CRC_FAILURES = "cache_crc_failures"
PREFETCH_BYTES = "cache_prefetch_bytes"
BYPASS_BYTES = "cache_bypass_bytes"
WRITE_ERRORS = "cache_write_errors"
REOPENS = "cache_reopens"
FILL_WAITS = "cache_fill_waits"


class Upstream(Protocol):
    """Where missing bytes come from (the registry client's remote blob, in production)."""

    name: str
    size: int

    def fetch_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Exactly the bytes of each ``(offset, length)``, fetched concurrently; or an ObdError."""
        ...


class _Out:
    """Where the pages of one read land: whole pages straight in the caller's buffer, the (at most
    two) partly requested edge pages in scratch buffers copied out by :meth:`finish`."""

    def __init__(self, buf: memoryview, offset: int, page_size: int, blob_size: int):
        ps = page_size
        self.buf, self.offset, self.end, self.ps, self.size = buf, offset, offset + len(buf), ps, blob_size
        self.first, self.last = offset // ps, (self.end - 1) // ps
        self.inner_first = self.first if offset % ps == 0 else self.first + 1
        self.inner_last = self.last if self.end == min((self.last + 1) * ps, blob_size) else self.last - 1
        #: the read's ``(start, end)`` until its readahead is planned (see ``CachedSource``)
        self.plan: tuple[int, int] | None = None
        self.scratch: dict[int, memoryview] = {}
        for p in (self.first, self.last):
            if not self.inner_first <= p <= self.inner_last and p not in self.scratch:
                self.scratch[p] = memoryview(bytearray(self.page_len(p)))

    def page_len(self, p: int) -> int:
        return min(self.ps, self.size - p * self.ps)

    def view(self, p: int) -> memoryview:
        s = self.scratch.get(p)
        if s is not None:
            return s
        start = p * self.ps - self.offset
        return self.buf[start : start + self.page_len(p)]

    def views(self, p: int, q: int) -> list[memoryview]:
        """Buffers for pages ``p..q`` in order, clipped to the read's (pages read ahead past it have
        none): at most three pieces."""
        q = min(q, self.last)
        out = []
        while p <= q:
            s = self.scratch.get(p)
            if s is not None:
                out.append(s)
                p += 1
                continue
            e = min(q, self.inner_last)
            out.append(self.buf[p * self.ps - self.offset : e * self.ps + self.page_len(e) - self.offset])
            p = e + 1
        return out

    def overlap(self, p: int) -> int:
        start = p * self.ps
        return max(0, min(start + self.ps, self.end) - max(start, self.offset))

    def finish(self) -> None:
        for p, s in self.scratch.items():
            start = p * self.ps
            lo, hi = max(start, self.offset), min(start + len(s), self.end)
            self.buf[lo - self.offset : hi - self.offset] = s[lo - start : hi - start]


class CachedSource(Source):
    """A :class:`~obd.io.source.Source` over ``upstream`` that keeps what it fetches in ``store``.

    ``digest`` keys the cache (``sha256:<hex>``; default ``upstream.digest``). Only the missing
    pages of a read are asked of ``upstream``; readahead and range merging are its settings (see
    :class:`~obd.registry.blob.RemoteBlob`).
    """

    def __init__(
        self,
        upstream: Upstream,
        store: CacheStore,
        *,
        digest: str | None = None,
        stats: Stats | None = None,
        name: str | None = None,
    ):
        digest = digest if digest is not None else getattr(upstream, "digest", None)
        if digest is None:
            raise ObdError("a cached source needs the blob's digest", path=getattr(upstream, "name", None))
        size = upstream.size
        if not isinstance(size, int) or size < 0:
            raise ObdError("upstream size is not a byte count", path=upstream.name, field="size", value=size)
        self.upstream = upstream
        self.store = store
        self.digest = digest
        self.name = name or upstream.name
        self.size = size
        self.page_size = store.page_size
        self.stats = stats if stats is not None else store.stats
        self._blob: BlobCache = store.open_blob(digest, size)
        delegate = getattr(upstream, "delegate_readahead", None)
        #: ``plan(start, end)``: bytes to read ahead after a missed read (the upstream sizes it)
        self._plan_ahead: Callable[[int, int], int] | None = delegate() if delegate else None
        self._retired: list[BlobCache] = []
        self._lock = threading.Lock()  # guards swapping _blob for a reopened one

    # -- the Source interface --------------------------------------------------------------------

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset < 0:
            raise ObdError("negative read offset", path=self.name, field="offset", value=offset)
        n = min(len(buf), self.size - offset)
        if n <= 0:
            return 0
        view = memoryview(buf).cast("B")[:n]
        out = _Out(view, offset, self.page_size, self.size)
        out.plan = (offset, offset + n)
        self._fill(np.arange(out.first, out.last + 1, dtype=np.int64), out)
        out.finish()
        return n

    def prefetch(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Fill the cache with ``(offset, length)`` ranges without copying them out.

        Pages already present are not read (nor CRC-checked: that happens when they are read).
        Returns the bytes fetched from upstream.
        """
        self._refresh()
        spans = []
        for off, length in ranges:
            lo, hi = max(0, off), min(self.size, off + length)
            if hi > lo:
                spans.append((lo // self.page_size, (hi - 1) // self.page_size))
        spans.sort()
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        # one _fill per window of the blob, so neither the page-table read nor the fetch is unbounded
        window = max(1, PREFETCH_WINDOW // self.page_size)
        fetched = 0
        batch: list[np.ndarray] = []
        start = 0
        for a, b in merged:
            while a <= b:
                if batch and a >= start + window:
                    fetched += self._fill(np.concatenate(batch), None)
                    batch = []
                if not batch:
                    start = a
                take = min(b + 1, start + window) - a
                batch.append(np.arange(a, a + take, dtype=np.int64))
                a += take
        if batch:
            fetched += self._fill(np.concatenate(batch), None)
        return fetched

    def cached_bytes(self) -> int:
        """Bytes of the blob present in the cache now."""
        self._refresh()
        return self._blob.present_bytes()

    def fully_cached(self) -> bool:
        """True when every page of the blob is present (reads will not touch the upstream)."""
        return self.cached_bytes() == self.size

    def evict(self, offset: int, length: int) -> None:
        """Drop the cached pages of ``[offset, offset + length)`` (bytes a verifier above found
        bad), so the next read fetches them again."""
        if length <= 0:
            return
        ps = self.page_size
        pages = list(range(max(0, offset) // ps, (min(self.size, offset + length) - 1) // ps + 1))
        try:
            self._blob.drop(pages)
        except OSError as e:
            self.stats.incr(WRITE_ERRORS)
            log.warning("%s: cannot drop pages from the cache: %s", self.name, e.strerror)

    def put(self, offset: int, data: bytes | memoryview) -> None:
        """Store the whole pages of ``data`` (blob bytes at ``offset`` that a verifier above has just
        refetched and checked), so the next read of them is a hit, not another refetch."""
        ps, end = self.page_size, min(self.size, offset + len(data))
        a = -(-offset // ps)
        b = (end // ps if end < self.size else -(-end // ps)) - 1
        if b < a:
            return
        lo, hi = a * ps, min((b + 1) * ps, self.size)
        self._refresh()
        view = memoryview(data).cast("B")[lo - offset : hi - offset]
        self._store_and_copy(self._blob, [(a, b)], [view], None)

    def close(self) -> None:
        for blob in [self._blob, *self._retired]:
            blob.close()
        self._retired.clear()

    # -- the engine ------------------------------------------------------------------------------

    def _fill(self, pending: np.ndarray, out: _Out | None) -> int:
        """Make every page in ``pending`` (sorted) available: copied into ``out`` for a read, or
        just present in the cache for a prefetch. Returns the bytes fetched from upstream."""
        self._blob.touch()
        for _ in range(_MAX_ROUNDS):
            blob = self._blob
            lo = int(pending[0])
            hi = int(pending[-1])
            crcs, present = blob.records(lo, hi - lo + 1)
            if len(pending) == hi - lo + 1 and present.all():
                # the common warm case: a contiguous read, every page present
                served, missing, runs = pending, pending[:0], [(lo, hi)]
            else:
                is_present = present[pending - lo]
                served, missing, runs = pending[is_present], pending[~is_present], None
            if out is not None and len(served):
                bad = self._serve_present(blob, out, served, lo, crcs, runs)
                if len(bad):
                    missing = np.union1d(bad, missing)
            if len(missing) == 0:
                return 0
            if blob.stale():
                self._reopen(blob)
                pending = missing
                continue
            if out is not None:
                missing = self._with_readahead(blob, missing, out)
            if out is None or read_priority() == PRIORITY_PREFETCH:  # a prefetch: nobody waits on it
                return self._fetch_missing(blob, missing, out)
            started = time.monotonic()
            try:
                return self._fetch_missing(blob, missing, out)
            finally:
                self.stats.add_time(TIME_WAIT, time.monotonic() - started)
        raise ObdError(
            f"pages {int(pending[0])}..{int(pending[-1])} not filled: "
            "the cache kept being evicted under the read",
            path=self.name,
        )

    def _with_readahead(self, blob: BlobCache, missing: np.ndarray, out: _Out) -> np.ndarray:
        """``missing`` plus the absent pages of the readahead the upstream plans after this read."""
        if self._plan_ahead is None or out.plan is None:
            return missing
        start, end = out.plan
        out.plan = None  # once per read, however many rounds its fill takes
        ahead = self._plan_ahead(start, end)
        if ahead <= 0:
            return missing
        ps = self.page_size
        a, b = out.last + 1, (end + ahead - 1) // ps
        if b < a:
            return missing
        _, present = blob.records(a, b - a + 1)
        extra = np.arange(a, b + 1, dtype=np.int64)[~present]
        self.stats.incr(READAHEAD_BYTES, int(np.minimum(ps, self.size - extra * ps).sum()))
        return np.concatenate([missing, extra])

    def _serve_present(
        self,
        blob: BlobCache,
        out: _Out,
        pages: np.ndarray,
        lo: int,
        crcs: np.ndarray,
        runs: list[tuple[int, int]] | None,
    ) -> np.ndarray:
        """Read present pages into ``out`` and check them; returns the pages that failed."""
        ps = self.page_size
        bad: list[int] = []
        hit_bytes = 0
        want = crcs.tolist()
        for a, b in runs if runs is not None else page_runs(pages):
            pieces = out.views(a, b)
            got = blob.read_data(pieces, a * ps)
            p = a
            for piece in pieces:  # whole pages, the last one maybe short
                for i, crc in enumerate(page_crcs(piece, ps)):
                    if crc != want[p + i - lo] or got < (p + i - a) * ps + min(ps, len(piece) - i * ps):
                        bad.append(p + i)
                p += -(-len(piece) // ps)
            hit_bytes += min((b + 1) * ps, out.end) - max(a * ps, out.offset)
        hit_bytes -= sum(out.overlap(p) for p in bad)
        if bad:
            self.stats.incr(CRC_FAILURES, len(bad))
            log.warning(
                "%s: %d cached page(s) failed their checksum (first: page %d); dropped, fetching again",
                self.name,
                len(bad),
                bad[0],
            )
            try:
                blob.drop(bad)
            except OSError as e:
                self.stats.incr(WRITE_ERRORS)
                log.warning("%s: cannot drop bad pages from the cache: %s", self.name, e.strerror)
        self.stats.incr(CACHE_HITS, len(pages) - len(bad))
        self.stats.incr(CACHE_BYTES, hit_bytes)
        return np.asarray(bad, dtype=np.int64)

    def _fetch_missing(self, blob: BlobCache, missing: np.ndarray, out: _Out | None) -> int:
        """Make the ``missing`` pages available, fetching each at most once per host: pages this
        fill claims are fetched now; runs another process is filling are waited for, then read
        from the cache (and fetched only if still absent). Returns the bytes fetched."""
        claim = blob.claims.claim(missing)
        try:
            fetched = self._settle(blob, claim.pages(), out)
        finally:
            claim.release()
        for run in claim.busy:  # our own claim is released: waiting cannot deadlock
            self.stats.incr(FILL_WAITS)
            with blob.claims.wait(run) as held:
                fetched += self._settle(blob, held.pages(), out)
        return fetched

    def _settle(self, blob: BlobCache, pages: np.ndarray, out: _Out | None) -> int:
        """Under a claim: serve the ``pages`` someone filled since we looked, fetch the rest."""
        if len(pages) == 0:
            return 0
        lo, hi = int(pages[0]), int(pages[-1])
        crcs, present = blob.records(lo, hi - lo + 1)
        is_present = present[pages - lo]
        served, missing = pages[is_present], pages[~is_present]
        if out is not None:
            served = served[served <= out.last]  # pages read ahead that someone filled: nothing to copy
        if out is not None and len(served):
            bad = self._serve_present(blob, out, served, lo, crcs, None)
            if len(bad):
                missing = np.union1d(bad, missing)
        if len(missing) == 0:
            return 0
        return self._fetch_store(blob, missing, out)

    def _fetch_store(self, blob: BlobCache, missing: np.ndarray, out: _Out | None) -> int:
        """Fetch the ``missing`` pages (one range per run) in one ``fetch_many``, copy them out
        and store them. Returns the bytes fetched."""
        ps, size = self.page_size, self.size
        runs = page_runs(missing)
        ranges = [(a * ps, min((b + 1) * ps, size) - a * ps) for a, b in runs]
        total = sum(length for _, length in ranges)
        datas = self.upstream.fetch_many(ranges)
        if len(datas) != len(ranges):
            raise ObdError(f"upstream returned {len(datas)} pieces for {len(ranges)} ranges", path=self.name)
        views = []
        for (off, length), data in zip(ranges, datas, strict=True):
            if len(data) != length:
                raise ObdError(
                    f"upstream returned {len(data)} bytes for the {length} at offset {off}",
                    path=self.name,
                    field="fetch",
                )
            views.append(memoryview(data).cast("B"))
        self.stats.incr(FETCH_CALLS)
        self.stats.incr(FETCH_RANGES, len(ranges))
        self.stats.incr(FETCH_BYTES, total)
        if out is None:
            self.stats.incr(PREFETCH_BYTES, total)
        else:
            inside = missing[missing <= out.last]
            self.stats.incr(CACHE_MISSES, len(inside))
            self.stats.incr(MISS_BYTES, sum(out.overlap(p) for p in inside.tolist()))
        self._store_and_copy(blob, runs, views, out)
        return total

    def _store_and_copy(
        self, blob: BlobCache, runs: list[tuple[int, int]], views: list[memoryview], out: _Out | None
    ) -> None:
        ps = self.page_size
        if out is not None:
            for (a, b), data in zip(runs, views, strict=True):
                pos = 0
                for v in out.views(a, b):
                    v[:] = data[pos : pos + len(v)]
                    pos += len(v)
        nbytes = sum(len(data) for data in views)
        try:
            if not self.store.reserve(blob, nbytes):
                self.stats.incr(BYPASS_BYTES, nbytes)
                return
            for (a, _), data in zip(runs, views, strict=True):
                blob.write_data(data, a * ps)
            blob.sync_data()
            for (a, _), data in zip(runs, views, strict=True):
                blob.mark_present(a, np.array(page_crcs(data, ps), dtype=np.uint32))
        except OSError as e:
            # the cache is an optimisation: a full or failing disk must not fail the read
            self.stats.incr(WRITE_ERRORS)
            log.warning("%s: cannot write to the cache: %s", self.name, e.strerror or e)

    def _refresh(self) -> None:
        blob = self._blob
        if blob.stale():
            self._reopen(blob)

    def _reopen(self, old: BlobCache) -> None:
        with self._lock:
            if self._blob is not old:
                return
        new = self.store.open_blob(self.digest, self.size)
        with self._lock:
            if self._blob is old:
                # the old descriptors may be in use by other threads: close them only in close()
                self._retired.append(old)
                self._blob = new
                self.stats.incr(REOPENS)
                return
        new.close()


__all__ = ["CachedSource", "Upstream"]
