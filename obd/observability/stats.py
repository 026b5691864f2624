"""Counters every part of the remote read path records into, and every frontend can print.

A :class:`Stats` is a thread-safe bag of named integer counters plus a bounded window of latency
samples. The registry client counts requests, bytes, retries, errors and redirects; the remote blob
counts logical reads and how many of them were served by a fetch already in flight or merged into a
neighbour's; the block cache counts hits, misses and bytes. ``obd ... --stats`` prints
:meth:`Stats.format` of the process-wide :data:`STATS` (what :func:`default_stats` returns), which
every component uses unless it is handed its own instance (tests do that, to assert on exact
numbers).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

#: HTTP requests sent (every attempt, including retries, redirects and token fetches).
REQUESTS = "requests"
#: Body bytes received for blob data (range reads and whole-blob downloads).
BYTES_FETCHED = "bytes_fetched"
#: Body bytes of every response (blobs, manifests, configs, digest tables, errors; HEAD has none):
#: what crossed the link, to compare with what a proxy or the registry saw.
BYTES_RECEIVED = "bytes_received"
#: Attempts repeated after a retryable failure (5xx, 429, connection error, timeout, bad body).
RETRIES = "retries"
#: Operations that failed for good (after the retries allowed, or at once when not retryable).
ERRORS = "errors"
#: Redirects followed (to object storage, normally).
REDIRECTS = "redirects"
#: Bearer tokens fetched from a token service.
TOKENS = "tokens"
#: Logical reads asked of remote blobs (one per requested range).
READS = "reads"
#: Range GETs a remote blob issued (after sharing and merging).
FETCHES = "fetches"
#: Pieces of reads served by a fetch that was already in flight (or recently completed).
SHARED = "shared"
#: Pieces merged into a neighbour's GET instead of getting their own.
COALESCED = "coalesced"
#: Bytes fetched beyond what was asked, as readahead.
READAHEAD_BYTES = "readahead_bytes"
#: Block cache: blocks served from the cache, blocks that had to be fetched, bytes served from cache.
CACHE_HITS = "cache_hits"
CACHE_MISSES = "cache_misses"
CACHE_BYTES = "cache_bytes"

#: Counters :meth:`Stats.format` always shows, in this order (others follow alphabetically).
COUNTERS = (
    REQUESTS,
    BYTES_FETCHED,
    BYTES_RECEIVED,
    RETRIES,
    ERRORS,
    REDIRECTS,
    TOKENS,
    READS,
    FETCHES,
    SHARED,
    COALESCED,
    READAHEAD_BYTES,
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_BYTES,
)

#: Timers (:meth:`Stats.add_time`, printed by ``--profile``): where a cold start's time goes.
#: Resolving the image: token, manifest, config and digest-table requests.
TIME_RESOLVE = "resolve"
#: Opening the registry layers (wall time; they open concurrently).
TIME_OPEN = "open"
#: Range GETs in flight, summed over GETs (concurrent ones overlap: this can exceed the wall time).
TIME_FETCH = "fetch"
#: Decompressing ZFile blocks (CRC checks and reads excluded), summed over threads.
TIME_DECODE = "decode"
#: On-demand reads (a guest's, a frontend's; not prefetch or trace replay) waiting for blocks to
#: arrive from the registry, summed over reads: the part of a lazy start the network costs.
TIME_WAIT = "waited"
#: Timers :meth:`Stats.format_profile` shows first, in this order.
TIMERS = (TIME_RESOLVE, TIME_OPEN, TIME_WAIT, TIME_FETCH, TIME_DECODE)

#: How many of the most recent latency samples percentiles are computed over.
DEFAULT_WINDOW = 10_000


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


class Stats:
    """Thread-safe counters and latency samples; cheap enough to update on every request."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        self._lock = threading.Lock()
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._samples: deque[float] = deque(maxlen=window)
        self._latency_count = 0
        self._latency_sum = 0.0
        self._latency_max = 0.0
        self._timers: dict[str, float] = {}

    def add_time(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to timer ``name`` (created at zero on first use)."""
        with self._lock:
            self._timers[name] = self._timers.get(name, 0.0) + seconds

    def incr(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (created at zero on first use)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def get(self, name: str) -> int:
        """Current value of counter ``name`` (0 if never incremented)."""
        with self._lock:
            return self._counters.get(name, 0)

    def __getitem__(self, name: str) -> int:
        return self.get(name)

    def observe_latency(self, seconds: float) -> None:
        """Record how long one request took (sent → body read)."""
        with self._lock:
            self._samples.append(seconds)
            self._latency_count += 1
            self._latency_sum += seconds
            if seconds > self._latency_max:
                self._latency_max = seconds

    def reset(self) -> None:
        """Zero every counter and forget the latency samples."""
        with self._lock:
            self._counters = dict.fromkeys(COUNTERS, 0)
            self._samples.clear()
            self._latency_count = 0
            self._latency_sum = 0.0
            self._latency_max = 0.0
            self._timers = {}

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy: every counter, plus ``latency`` with count, mean, p50/p90/p99 and max (s)."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            samples = sorted(self._samples)
            count, total, peak = self._latency_count, self._latency_sum, self._latency_max
            timers = dict(self._timers)
        latency: dict[str, float | int] = {"count": count}
        if samples:
            latency.update(
                mean=total / count,
                p50=_percentile(samples, 50),
                p90=_percentile(samples, 90),
                p99=_percentile(samples, 99),
                max=peak,
            )
        out["latency"] = latency
        out["timers"] = timers
        return out

    def format(self) -> str:
        """A human-readable block, one counter per line, for ``--stats``."""
        snap = self.snapshot()
        latency = snap.pop("latency")
        snap.pop("timers")
        names = [n for n in COUNTERS if n in snap] + sorted(n for n in snap if n not in COUNTERS)
        width = max(len(n) for n in [*names, "latency"])
        lines = []
        for name in names:
            value = snap[name]
            text = f"{value}"
            if name.endswith("bytes") or name in (BYTES_FETCHED, BYTES_RECEIVED):
                text += f" ({_human(value)})"
            lines.append(f"{name:<{width}}  {text}")
        if latency["count"]:
            ms = {k: latency[k] * 1000.0 for k in ("mean", "p50", "p90", "p99", "max")}
            lines.append(
                f"{'latency':<{width}}  n={latency['count']} mean={ms['mean']:.1f}ms p50={ms['p50']:.1f}ms "
                f"p90={ms['p90']:.1f}ms p99={ms['p99']:.1f}ms max={ms['max']:.1f}ms"
            )
        else:
            lines.append(f"{'latency':<{width}}  n=0")
        return "\n".join(lines)

    def format_profile(self, extra: dict[str, float] | None = None) -> str:
        """The ``--profile`` block: :func:`format_profile` of this process's timers and counters."""
        return format_profile(self.snapshot(), extra)

    def __repr__(self) -> str:
        snap = self.snapshot()
        return f"<Stats requests={snap[REQUESTS]} bytes_fetched={snap[BYTES_FETCHED]}>"


def format_profile(snap: dict[str, Any], extra: dict[str, float] | None = None) -> str:
    """Where a start's time went, from a :meth:`Stats.snapshot` (this process's or another's, e.g.
    the nbd server's stats file): each timer in seconds, then the wire — requests, bytes and the
    round trips they stand for — so the biggest gap is the first line to look at. ``extra`` adds
    timers measured elsewhere (``guest``: boot to the command's first output, say), in order."""
    timers = dict(snap.get("timers") or {})
    timers.update(extra or {})
    names = [n for n in TIMERS if n in timers] + [n for n in timers if n not in TIMERS]
    labels = {
        TIME_RESOLVE: "resolve (token, manifest, config, digest tables)",
        TIME_OPEN: "layer opens (headers, jump tables, indexes; concurrent)",
        TIME_WAIT: "reads waiting on the registry (on-demand reads, summed)",
        TIME_FETCH: "range GETs in flight (summed over GETs)",
        TIME_DECODE: "ZFile blocks decompressed (summed over threads)",
    }
    lines = []
    for n in names:
        base, sep, where = n.partition(" (")
        label = labels.get(base, base) + (f" [{where[:-1]}]" if sep and base in labels else sep + where)
        lines.append(f"profile: {label:<66} {timers[n]:8.3f} s")
    latency = snap.get("latency") or {}
    rtt = f", p50 latency {latency['p50'] * 1000:.0f} ms" if latency.get("count") else ""
    lines.append(
        f"profile: wire: {snap.get(REQUESTS, 0)} requests, {_human(snap.get(BYTES_RECEIVED, 0))} received "
        f"({_human(snap.get(BYTES_FETCHED, 0))} blob data){rtt}"
    )
    return "\n".join(lines)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


#: The process-wide instance every component records into unless given another.
STATS = Stats()


def default_stats() -> Stats:
    """The process-wide :class:`Stats` (what ``--stats`` prints)."""
    return STATS


__all__ = ["COUNTERS", "STATS", "TIMERS", "Stats", "default_stats", "format_profile"]
