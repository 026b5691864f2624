"""``CachedSource``: a remote blob read through the persistent page cache.

A read is mapped to pages. Pages the page table marks present are read from the data file with
one ``preadv`` per run and CRC-checked; a page that fails is dropped, counted, logged and fetched
again. The missing pages of the whole read go to the upstream in **one** ``fetch_many`` call:
neighbouring missing pages form one range, and two ranges are merged when only a small gap
(``gap`` bytes, 8 KiB by default) of already-present pages separates them. So a 4 KiB read costs
at most the two pages it touches, and nothing is read ahead unless ``readahead`` asks for it.

Within a process, a page being fetched by one thread is waited for by the others (an in-flight
table keyed by page), never fetched twice. Across processes fills are independent: they write the
same bytes, so they only cost bandwidth, never correctness.

Fetched pages are written to the data file, made durable (see :class:`CacheStore` ``sync``) and
only then marked present. The caller's bytes never depend on the cache write succeeding: a full
disk or a cache over its limit is logged and counted, and the read is served from the fetched bytes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from obd.cache.store import BlobCache, CacheStore, page_crcs
from obd.errors import ObdError
from obd.io.source import Source
from obd.observability.stats import CACHE_BYTES, CACHE_HITS, CACHE_MISSES, Stats

log = logging.getLogger("obd.cache")

#: Present pages up to this many bytes between two missing runs are fetched again rather than
#: costing a separate range (a range is a request, or a part of a multi-range one).
DEFAULT_GAP = 8 << 10
#: ``prefetch`` fills in windows of this many blob bytes (one ``fetch_many`` call each) ...
PREFETCH_WINDOW = 64 << 20
#: ... made of ranges of at most this size, which the upstream fetches concurrently.
PREFETCH_RANGE = 4 << 20
#: A read gives up after this many rounds of waiting for other threads' fetches that failed.
_MAX_ROUNDS = 8

# Counters recorded besides obd.observability.stats' CACHE_HITS / CACHE_MISSES (pages) and CACHE_BYTES (bytes
# of reads served from the cache).
MISS_BYTES = "cache_miss_bytes"
FETCH_CALLS = "cache_fetch_calls"
FETCH_RANGES = "cache_fetch_ranges"
FETCH_BYTES = "cache_fetch_bytes"
SHARED_PAGES = "cache_shared_pages"
CRC_FAILURES = "cache_crc_failures"
READAHEAD_BYTES = "cache_readahead_bytes"
PREFETCH_BYTES = "cache_prefetch_bytes"
BYPASS_BYTES = "cache_bypass_bytes"
WRITE_ERRORS = "cache_write_errors"
REOPENS = "cache_reopens"


class Upstream(Protocol):
    """Where missing bytes come from (the registry client's remote blob, in production)."""

    name: str
    size: int

    def fetch_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Exactly the bytes of each ``(offset, length)``, fetched concurrently; or an ObdError."""
        ...


class _Fetch:
    """One range being fetched by one thread; others wait on ``done`` and copy from ``data``."""

    __slots__ = ("data", "done", "error", "first")

    def __init__(self, first: int):
        self.first = first
        self.data: memoryview | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _Out:
    """Where the pages of one read land: whole pages straight in the caller's buffer, the (at most
    two) partly requested edge pages in scratch buffers copied out by :meth:`finish`."""

    def __init__(self, buf: memoryview, offset: int, page_size: int, blob_size: int):
        ps = page_size
        self.buf, self.offset, self.end, self.ps, self.size = buf, offset, offset + len(buf), ps, blob_size
        self.first, self.last = offset // ps, (self.end - 1) // ps
        self.inner_first = self.first if offset % ps == 0 else self.first + 1
        self.inner_last = self.last if self.end == min((self.last + 1) * ps, blob_size) else self.last - 1
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
        """Buffers for pages ``p..q`` (within the read) in order: at most three pieces."""
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
        return min(start + self.ps, self.end) - max(start, self.offset)

    def finish(self) -> None:
        for p, s in self.scratch.items():
            start = p * self.ps
            lo, hi = max(start, self.offset), min(start + len(s), self.end)
            self.buf[lo - self.offset : hi - self.offset] = s[lo - start : hi - start]


def _runs(pages: np.ndarray, gap: int = 0, max_len: int | None = None) -> list[tuple[int, int]]:
    """Sorted page numbers → inclusive ``(first, last)`` runs, bridging gaps of ≤ ``gap`` pages."""
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) > gap + 1)
    starts = [int(pages[0]), *(int(pages[i + 1]) for i in breaks)]
    ends = [*(int(pages[i]) for i in breaks), int(pages[-1])]
    runs = list(zip(starts, ends, strict=True))
    if max_len is None:
        return runs
    split = []
    for a, b in runs:
        while b - a + 1 > max_len:
            split.append((a, a + max_len - 1))
            a += max_len
        split.append((a, b))
    return split


def _split(pages: np.ndarray, runs: list[tuple[int, int]]) -> list[np.ndarray]:
    """The part of sorted ``pages`` inside each run."""
    firsts = np.searchsorted(pages, [a for a, _ in runs], "left")
    ends = np.searchsorted(pages, [b for _, b in runs], "right")
    return [pages[i:j] for i, j in zip(firsts.tolist(), ends.tolist(), strict=True)]


class CachedSource(Source):
    """A :class:`~obd.io.source.Source` over ``upstream`` that keeps what it fetches in ``store``.

    ``digest`` keys the cache (``sha256:<hex>``; default ``upstream.digest``). ``readahead`` bytes
    past a read that misses are fetched with it (0, the default, fetches only what is read).
    ``gap`` is the largest run of present pages refetched to join two missing runs into one range.
    """

    def __init__(
        self,
        upstream: Upstream,
        store: CacheStore,
        *,
        digest: str | None = None,
        readahead: int = 0,
        gap: int = DEFAULT_GAP,
        stats: Stats | None = None,
        name: str | None = None,
    ):
        digest = digest if digest is not None else getattr(upstream, "digest", None)
        if digest is None:
            raise ObdError("a cached source needs the blob's digest", path=getattr(upstream, "name", None))
        size = upstream.size
        if not isinstance(size, int) or size < 0:
            raise ObdError("upstream size is not a byte count", path=upstream.name, field="size", value=size)
        if readahead < 0 or gap < 0:
            raise ObdError("readahead and gap must not be negative", field="readahead", value=readahead)
        self.upstream = upstream
        self.store = store
        self.digest = digest
        self.name = name or upstream.name
        self.size = size
        self.page_size = store.page_size
        self.stats = stats if stats is not None else store.stats
        self._ra_pages = -(-readahead // self.page_size)
        self._gap_pages = gap // self.page_size
        self._blob: BlobCache = store.open_blob(digest, size)
        self._retired: list[BlobCache] = []
        self._lock = threading.Lock()
        self._inflight: dict[int, _Fetch] = {}
        # bumped (under _lock) each time a fetch has marked its pages present, so a reader that
        # saw them absent before knows to look again before fetching them itself
        self._epoch = 0

    # -- the Source interface --------------------------------------------------------------------

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset < 0:
            raise ObdError("negative read offset", path=self.name, field="offset", value=offset)
        n = min(len(buf), self.size - offset)
        if n <= 0:
            return 0
        view = memoryview(buf).cast("B")[:n]
        out = _Out(view, offset, self.page_size, self.size)
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

    def close(self) -> None:
        for blob in [self._blob, *self._retired]:
            blob.close()
        self._retired.clear()

    # -- the engine ------------------------------------------------------------------------------

    def _fill(self, pending: np.ndarray, out: _Out | None) -> int:
        """Make every page in ``pending`` (sorted) available: copied into ``out`` for a read, or
        just present in the cache for a prefetch. Returns the bytes fetched from upstream."""
        fetched = 0
        self._blob.touch()
        for _ in range(_MAX_ROUNDS):
            blob = self._blob
            epoch = self._epoch
            lo = int(pending[0])
            hi = int(pending[-1])
            ra_hi = min(blob.pages - 1, hi + self._ra_pages) if out is not None else hi
            crcs, present = blob.records(lo, ra_hi - lo + 1)
            if len(pending) == hi - lo + 1 and present[: hi - lo + 1].all():
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
                return fetched
            if blob.stale():
                self._reopen(blob)
                pending = missing
                continue
            got, pending = self._fetch_missing(blob, missing, out, epoch, present, lo, ra_hi)
            fetched += got
            if len(pending) == 0:
                return fetched
        raise ObdError(
            f"pages {int(pending[0])}..{int(pending[-1])} not filled: concurrent fetches kept failing",
            path=self.name,
        )

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
        for a, b in runs if runs is not None else _runs(pages):
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

    def _fetch_missing(
        self,
        blob: BlobCache,
        missing: np.ndarray,
        out: _Out | None,
        epoch: int,
        present: np.ndarray,
        lo: int,
        ra_hi: int,
    ) -> tuple[int, np.ndarray]:
        """Claim what nobody is fetching, fetch it in one call, wait for the rest.

        Returns the bytes fetched and the pages still to do (present after all, or whose fetch by
        another thread failed).
        """
        ps = self.page_size
        again: list[int] = []
        with self._lock:
            if self._epoch != epoch:
                # a fetch completed since we read the table: pages it filled are served next round
                m_lo = int(missing[0])
                _, now = blob.records(m_lo, int(missing[-1]) - m_lo + 1)
                filled = now[missing - m_lo]
                again.extend(int(p) for p in missing[filled])
                missing = missing[~filled]
            mine: list[int] = []
            theirs: dict[int, _Fetch] = {}
            for p in missing.tolist():
                f = self._inflight.get(p)
                if f is None:
                    mine.append(p)
                else:
                    theirs[p] = f
            extra: list[int] = []
            if mine and out is not None:
                p = out.last + 1
                while p <= ra_hi and not present[p - lo] and p not in self._inflight:
                    extra.append(p)
                    p += 1
            claimed = np.asarray(mine + extra, dtype=np.int64)
            runs = _runs(claimed, self._gap_pages, None if out is not None else PREFETCH_RANGE // ps)
            fetches = [_Fetch(a) for a, _ in runs]
            for f, pages in zip(fetches, _split(claimed, runs), strict=True):
                for p in pages.tolist():
                    self._inflight[p] = f

        fetched = 0
        if runs:
            fetched = self._fetch_runs(blob, runs, fetches, claimed, out, len(extra))
            # pages others were fetching that our ranges covered anyway (a bridged gap)
            for f, (a, b) in zip(fetches, runs, strict=True):
                for p in [p for p in theirs if a <= p <= b]:
                    del theirs[p]
                    self._copy_fetched(f, p, out)

        waited = 0
        for p, f in sorted(theirs.items()):
            f.done.wait()
            if f.error is not None or f.data is None:
                again.append(p)
                continue
            self._copy_fetched(f, p, out)
            waited += 1
        if waited:
            self.stats.incr(SHARED_PAGES, waited)
        if out is not None:
            retry = set(again)
            done = [p for p in missing.tolist() if p not in retry and p <= out.last]
            self.stats.incr(CACHE_MISSES, len(done))
            self.stats.incr(MISS_BYTES, sum(out.overlap(p) for p in done))
        return fetched, np.asarray(sorted(again), dtype=np.int64)

    def _copy_fetched(self, f: _Fetch, p: int, out: _Out | None) -> None:
        if out is None or not out.first <= p <= out.last:
            return
        assert f.data is not None
        view = out.view(p)
        pos = (p - f.first) * self.page_size
        view[:] = f.data[pos : pos + len(view)]

    def _fetch_runs(
        self,
        blob: BlobCache,
        runs: list[tuple[int, int]],
        fetches: list[_Fetch],
        claimed: np.ndarray,
        out: _Out | None,
        n_extra: int,
    ) -> int:
        """Fetch the claimed runs with one ``fetch_many``, copy out, store, release the claims."""
        ps, size = self.page_size, self.size
        ranges = [(a * ps, min((b + 1) * ps, size) - a * ps) for a, b in runs]
        total = sum(length for _, length in ranges)
        try:
            datas = self.upstream.fetch_many(ranges)
            if len(datas) != len(ranges):
                raise ObdError(
                    f"upstream returned {len(datas)} pieces for {len(ranges)} ranges", path=self.name
                )
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
            if n_extra:
                self.stats.incr(READAHEAD_BYTES, n_extra * ps)
            if out is None:
                self.stats.incr(PREFETCH_BYTES, total)
            for f, v in zip(fetches, views, strict=True):
                f.data = v
            self._store_and_copy(blob, runs, views, claimed, out)
        except BaseException as e:
            for f in fetches:
                f.error = e
                f.data = None
            raise
        finally:
            with self._lock:
                self._epoch += 1
                for f, pages in zip(fetches, _split(claimed, runs), strict=True):
                    for p in pages.tolist():
                        if self._inflight.get(p) is f:
                            del self._inflight[p]
            for f in fetches:
                f.done.set()
        return total

    def _store_and_copy(
        self,
        blob: BlobCache,
        runs: list[tuple[int, int]],
        views: list[memoryview],
        claimed: np.ndarray,
        out: _Out | None,
    ) -> None:
        ps = self.page_size
        pieces = []  # (first page, bytes, crcs) of each run of claimed pages
        for (a, _), data, mine in zip(runs, views, _split(claimed, runs), strict=True):
            for c, d in _runs(mine):
                chunk = data[(c - a) * ps : (d - a) * ps + min(ps, len(data) - (d - a) * ps)]
                crcs = np.array(page_crcs(chunk, ps), dtype=np.uint32)
                pieces.append((c, chunk, crcs))
                if out is not None and c <= out.last and d >= out.first:
                    c0, d0 = max(c, out.first), min(d, out.last)
                    pos = (c0 - c) * ps
                    for v in out.views(c0, d0):
                        v[:] = chunk[pos : pos + len(v)]
                        pos += len(v)
        nbytes = sum(len(chunk) for _, chunk, _ in pieces)
        try:
            if not self.store.reserve(blob, nbytes):
                self.stats.incr(BYPASS_BYTES, nbytes)
                return
            for c, chunk, _ in pieces:
                blob.write_data(chunk, c * ps)
            blob.sync_data()
            for c, _, crcs in pieces:
                blob.mark_present(c, crcs)
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


__all__ = ["DEFAULT_GAP", "CachedSource", "Upstream"]
