"""CachedSource over a real overlaybd blob served from memory: page mapping, range coalescing, bytes
fetched per read, shared in-flight fetches, checksum repair, eviction under an open reader.

The upstream here stands in for the registry client (same ``fetch_many`` contract) only so faults a
real server cannot produce on demand can be injected: slowness, errors, short answers. It is also
imported by the other ``test_cache_*`` modules and by the child processes of the crash tests.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import REPO
from obd.cache import CachedSource, CacheStore
from obd.cache import source as cache_source
from obd.cache.claims import page_runs as _runs
from obd.cache.source import _Out
from obd.errors import ObdError
from obd.io.source import BytesSource, Source
from obd.layer.blob import open_source
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack
from obd.observability.stats import CACHE_BYTES, CACHE_HITS, CACHE_MISSES, Stats

COMMIT_DIR = REPO / "fixtures" / "overlaybd" / "lsmt" / "commit"
#: A real overlaybd blob (LSMT in an LZ4 ZFile, 2.1 MiB): the bytes a registry would serve.
BLOB = COMMIT_DIR / "L0.lz4.commit"
PS = 4096


@functools.cache
def blob_bytes(name: str = BLOB.name) -> bytes:
    return (COMMIT_DIR / name).read_bytes()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MemUpstream:
    """``fetch_many`` over bytes in memory; optionally slow, failing, or answering short."""

    def __init__(self, data: bytes, *, delay: float = 0.0, name: str = "mem"):
        self.data = data
        self.size = len(data)
        self.name = name
        self.digest = digest_of(data)
        self.delay = delay
        self.fail: BaseException | None = None
        self.short = False
        self.lock = threading.Lock()
        self.calls: list[list[tuple[int, int]]] = []

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [r for call in self.calls for r in call]

    @property
    def fetched(self) -> int:
        return sum(n for _, n in self.ranges)

    def fetch_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        with self.lock:
            self.calls.append(list(ranges))
        fail = self.fail
        if self.delay:
            time.sleep(self.delay)
        if fail is not None:
            raise fail
        for off, n in ranges:
            assert off >= 0 and n > 0 and off + n <= self.size, (off, n)
        out = [self.data[off : off + n] for off, n in ranges]
        if self.short:
            out = [b[:-1] for b in out]
        return out


def make(tmp_path: Path, data: bytes | None = None, **kw) -> tuple[CachedSource, MemUpstream, Stats]:
    data = blob_bytes() if data is None else data
    stats = Stats()
    store = CacheStore(tmp_path / "cache", limit_bytes=kw.pop("limit", 1 << 30), stats=stats, sync=False)
    up = MemUpstream(data, delay=kw.pop("delay", 0.0))
    return CachedSource(up, store, **kw), up, stats


# -- page mapping and coalescing ------------------------------------------------------------------


def test_runs_are_consecutive_pages():
    pages = np.array([0, 1, 2, 4, 5, 8, 20], dtype=np.int64)
    assert _runs(pages) == [(0, 2), (4, 5), (8, 8), (20, 20)]
    assert _runs(np.arange(10, dtype=np.int64)) == [(0, 9)]
    assert _runs(np.array([], dtype=np.int64)) == []


@pytest.mark.parametrize(
    ("offset", "length", "size", "scratch", "inner"),
    [
        (0, 4096, 10000, set(), (0, 0)),  # one whole page: straight into the caller's buffer
        (100, 200, 10000, {0}, (1, -1)),  # inside one page
        (4000, 200, 10000, {0, 1}, (1, 0)),  # straddles two pages
        (100, 12000, 20000, {0, 2}, (1, 1)),  # edges in scratch, middle direct
        (8192, 10000 - 8192, 10000, set(), (2, 2)),  # the short last page, read whole
        (9000, 1000, 10000, {2}, (3, 2)),  # part of the short last page
    ],
)
def test_out_maps_pages_to_buffer_or_scratch(offset, length, size, scratch, inner):
    buf = memoryview(bytearray(length))
    out = _Out(buf, offset, PS, size)
    assert set(out.scratch) == scratch
    assert (out.inner_first, out.inner_last) == inner
    data = bytes(random.Random(offset).randbytes(size))
    for p in range(out.first, out.last + 1):
        out.view(p)[:] = data[p * PS : p * PS + out.page_len(p)]
    out.finish()
    assert bytes(buf) == data[offset : offset + length]
    assert (
        sum(len(v) for v in out.views(out.first, out.last)) == min(size, (out.last + 1) * PS) - out.first * PS
    )
    assert sum(out.overlap(p) for p in range(out.first, out.last + 1)) == length


def test_one_4k_read_fetches_one_page(tmp_path):
    src, up, stats = make(tmp_path)
    assert src.pread(8192, 4096) == blob_bytes()[8192:12288]
    assert up.ranges == [(8192, 4096)]
    # unaligned: the two pages it touches, in one range, never more
    assert src.pread(100_000, 4096) == blob_bytes()[100_000:104_096]
    assert up.ranges[1:] == [(98304, 8192)]
    assert stats[cache_source.FETCH_BYTES] == 4096 + 8192
    assert stats[CACHE_MISSES] == 3 and stats[CACHE_HITS] == 0
    # pages 24-25 are cached, 23 and 26 are not: only those two are asked for (bridging the gap
    # into one GET is the upstream's job: RemoteBlob's merge_gap)
    assert src.pread(98_000, 10_000) == blob_bytes()[98_000:108_000]
    assert up.calls[2:] == [[(23 * PS, PS), (26 * PS, PS)]]
    assert stats[CACHE_HITS] == 2 and stats[CACHE_BYTES] == 2 * PS
    # and again: all from the cache, not one more byte fetched
    assert src.pread(98_000, 10_000) == blob_bytes()[98_000:108_000]
    assert len(up.calls) == 3 and stats[CACHE_HITS] == 6 and stats[CACHE_BYTES] == 2 * PS + 10_000


def test_missing_runs_of_one_read_go_in_one_fetch_call(tmp_path):
    src, up, stats = make(tmp_path)
    data = blob_bytes()
    for page in (3, 4, 8, 12):  # make pages 3-4, 8 and 12 present
        src.pread(page * PS, PS)
    up.calls.clear()
    assert src.pread(0, 16 * PS) == data[: 16 * PS]
    assert up.calls == [[(0, 3 * PS), (5 * PS, 3 * PS), (9 * PS, 3 * PS), (13 * PS, 3 * PS)]]
    assert stats[CACHE_HITS] == 4 and stats[CACHE_MISSES] == 4 + 12


def test_present_pages_are_never_refetched(tmp_path):
    src, up, _ = make(tmp_path)
    data = blob_bytes()
    for page in (3, 4, 8, 9, 10):
        src.pread(page * PS, PS)
    up.calls.clear()
    assert src.pread(0, 16 * PS) == data[: 16 * PS]
    assert up.calls == [[(0, 3 * PS), (5 * PS, 3 * PS), (11 * PS, 5 * PS)]]
    assert src.pread(0, 16 * PS) == data[: 16 * PS]
    assert len(up.calls) == 1


def test_short_last_page_and_reads_past_the_end(tmp_path):
    data = blob_bytes()[:10_000]
    src, up, _ = make(tmp_path, data)
    assert src.pread(9000, 5000) == data[9000:]
    assert up.ranges == [(8192, 10_000 - 8192)]
    assert src.pread(10_000, 10) == b""
    buf = memoryview(bytearray(100))
    assert src.readinto(buf, 20_000) == 0
    with pytest.raises(ObdError):
        src.readinto(buf, -1)
    assert src.pread(0, 20_000) == data
    assert src.fully_cached()


def test_empty_blob(tmp_path):
    src, up, _ = make(tmp_path, b"")
    assert src.size == 0 and src.pread(0, 10) == b"" and src.fully_cached()
    assert up.calls == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reads=st.lists(st.tuples(st.integers(0, 2_200_000), st.integers(0, 300_000)), min_size=1, max_size=25))
def test_random_reads_equal_the_blob(tmp_path_factory, reads):
    src, up, _ = make(tmp_path_factory.mktemp("c"))
    data = blob_bytes()
    for off, n in reads:
        assert src.pread(off, n) == data[off : off + n]
    # every byte fetched was asked for by some read's pages, or bridges a gap of at most one page
    assert up.fetched <= sum(min(n + 2 * PS, len(data)) for _, n in reads)
    src.close()


# -- what a cold workload costs ---------------------------------------------------------------------


class RecordingSource(Source):
    """Records the byte ranges asked of it (the bytes a workload really needs from the blob)."""

    def __init__(self, inner: Source):
        self.inner, self.name, self.size = inner, inner.name, inner.size
        self.ranges: list[tuple[int, int]] = []

    def readinto(self, buf: memoryview, offset: int) -> int:
        n = self.inner.readinto(buf, offset)
        self.ranges.append((offset, n))
        return n


def union_bytes(ranges: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for off, n in sorted(ranges):
        lo = max(off, end)
        if off + n > lo:
            total += off + n - lo
        end = max(end, off + n)
    return total


def _device_workload(raw: Source, seed: int) -> bytes:
    """Random reads of the virtual disk of the LSMT layer in the blob (ZFile-compressed)."""
    layer = SealedLayer(open_source(raw).source)
    stack = Stack([layer])
    rng = random.Random(seed)
    h = hashlib.sha256()
    for _ in range(150):
        off = rng.randrange(0, stack.size // 512) * 512
        h.update(stack.pread(off, rng.choice([4096, 16384, 65536])))
    return h.digest()


def test_cold_reads_fetch_at_most_twice_what_the_workload_needs(tmp_path):
    data = blob_bytes()
    rec = RecordingSource(BytesSource(data, name="blob"))
    want = _device_workload(rec, 7)
    needed = union_bytes(rec.ranges)
    src, up, stats = make(tmp_path)
    assert _device_workload(src, 7) == want
    assert up.fetched == stats[cache_source.FETCH_BYTES]
    assert needed < len(data) // 2  # a sparse workload, so the bound means something
    assert up.fetched <= 2 * needed, (up.fetched, needed)
    # warm: nothing more is fetched
    before = up.fetched
    assert _device_workload(src, 7) == want
    assert up.fetched == before


# -- concurrency --------------------------------------------------------------------------------------


def test_concurrent_readers_share_fetches(tmp_path):
    src, up, stats = make(tmp_path, delay=0.05)
    data = blob_bytes()
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            start.wait()
            # everyone wants pages 0..63; each thread starts at a different offset
            off = (i * 8 % 64) * PS
            for lo, hi in ((off, 64 * PS), (0, off)):
                if hi > lo:
                    assert src.pread(lo, hi - lo) == data[lo:hi]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # MemUpstream shares nothing, so threads that miss a page at once each fetch it (RemoteBlob makes
    # that one GET: tests/remote/test_registry_client.py); the bytes are right and each miss is counted
    pages = [p for off, n in up.ranges for p in range(off // PS, (off + n) // PS)]
    assert set(pages) == set(range(64))
    assert stats[CACHE_MISSES] == len(pages)
    assert src.fully_cached() is False and src.cached_bytes() == 64 * PS


def test_threads_reading_while_the_cache_is_evicted_under_them(tmp_path):
    src, _up, stats = make(tmp_path, delay=0.002)
    data = blob_bytes()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                off = rng.randrange(len(data))
                n = rng.choice([1, 4096, 10_000, 100_000])
                assert src.pread(off, n) == data[off : off + n]
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for _ in range(15):
        time.sleep(0.02)
        src.store.clear()
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert stats[cache_source.REOPENS] >= 1 and stats[CACHE_HITS] > 0


def test_failed_fetch_raises_and_waiters_retry(tmp_path):
    src, up, _stats = make(tmp_path, delay=0.05)
    data = blob_bytes()
    up.fail = ObdError("registry unreachable")
    results: dict[str, object] = {}

    def first() -> None:
        try:
            src.pread(0, 8 * PS)
        except ObdError as e:
            results["first"] = e

    def second() -> None:
        time.sleep(0.01)  # arrive while the first fetch is in flight, then retry after it fails
        up.fail = None
        results["second"] = src.pread(0, 8 * PS)

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start()
    t2.start()
    t1.join()
    t2.join()
    assert isinstance(results["first"], ObdError)
    assert results["second"] == data[: 8 * PS]
    assert src.pread(0, 8 * PS) == data[: 8 * PS]


def test_a_short_answer_from_upstream_is_an_error_not_data(tmp_path):
    src, up, _ = make(tmp_path)
    up.short = True
    with pytest.raises(ObdError, match="upstream returned"):
        src.pread(0, PS)
    assert src.cached_bytes() == 0
    up.short = False
    assert src.pread(0, PS) == blob_bytes()[:PS]


def test_needs_a_valid_digest(tmp_path):
    store = CacheStore(tmp_path, stats=Stats())
    up = MemUpstream(b"abc")
    up.digest = "sha256:XYZ"
    with pytest.raises(ObdError, match="digest"):
        CachedSource(up, store)
    del up.digest
    with pytest.raises(ObdError, match="digest"):
        CachedSource(up, store)


# -- damage: every failure ends in a refetch, never in wrong bytes ------------------------------------


def test_flipped_byte_in_data_file_is_detected_dropped_and_refetched(tmp_path):
    src, up, stats = make(tmp_path)
    data = blob_bytes()
    assert src.pread(0, 64 * PS) == data[: 64 * PS]
    data_path, _ = src.store.paths(src.digest)
    with open(data_path, "r+b") as f:
        f.seek(10 * PS + 123)
        old = f.read(1)
        f.seek(10 * PS + 123)
        f.write(bytes([old[0] ^ 0x40]))
    up.calls.clear()
    assert src.pread(0, 64 * PS) == data[: 64 * PS]
    assert stats[cache_source.CRC_FAILURES] == 1
    assert up.ranges == [(10 * PS, PS)]
    with open(data_path, "rb") as f:
        f.seek(10 * PS)
        assert f.read(PS) == data[10 * PS : 11 * PS], "the page was repaired on disk"
    assert src.pread(0, 64 * PS) == data[: 64 * PS]
    assert stats[cache_source.CRC_FAILURES] == 1 and len(up.calls) == 1


def test_flipped_bit_in_a_page_record_reads_as_absent(tmp_path):
    src, up, stats = make(tmp_path)
    data = blob_bytes()
    src.pread(0, 8 * PS)
    _, meta_path = src.store.paths(src.digest)
    with open(meta_path, "r+b") as f:
        f.seek(128 + 8 * 5 + 2)
        b = f.read(1)
        f.seek(128 + 8 * 5 + 2)
        f.write(bytes([b[0] ^ 1]))
    up.calls.clear()
    assert src.pread(0, 8 * PS) == data[: 8 * PS]
    assert up.ranges == [(5 * PS, PS)]
    assert stats[cache_source.CRC_FAILURES] == 0


def test_data_file_truncated_under_an_open_reader(tmp_path):
    src, up, stats = make(tmp_path)
    data = blob_bytes()
    src.prefetch([(0, len(data))])
    assert src.fully_cached()
    data_path, _ = src.store.paths(src.digest)
    os.truncate(data_path, 100 * PS + 10)
    up.calls.clear()
    assert src.pread(0, len(data)) == data
    assert stats[cache_source.CRC_FAILURES] == -(-len(data) // PS) - 100
    assert up.fetched == len(data) - 100 * PS
    assert src.fully_cached()


@pytest.mark.parametrize(
    "damage", ["truncate-data", "zero-data", "no-data", "bad-magic", "bad-crc", "short-meta", "long-meta"]
)
def test_damaged_cache_files_between_runs(tmp_path, damage):
    data = blob_bytes()
    src, _up, _ = make(tmp_path)
    src.prefetch([(0, len(data))])
    src.close()
    data_path, meta_path = src.store.paths(src.digest)
    if damage == "truncate-data":
        os.truncate(data_path, len(data) // 3)
    elif damage == "no-data":
        os.unlink(data_path)
    elif damage == "zero-data":
        with open(data_path, "r+b") as f:
            f.seek(PS * 7)
            f.write(bytes(PS * 3))
    elif damage == "bad-magic":
        with open(meta_path, "r+b") as f:
            f.write(b"garbage!")
    elif damage == "bad-crc":
        with open(meta_path, "r+b") as f:
            f.seek(16)
            f.write(b"\xff")
    elif damage == "short-meta":
        os.truncate(meta_path, os.path.getsize(meta_path) - 8)
    elif damage == "long-meta":
        with open(meta_path, "ab") as f:
            f.write(b"\0" * 8)
    stats = Stats()
    store = CacheStore(tmp_path / "cache", stats=stats, sync=False)
    up2 = MemUpstream(data)
    src2 = CachedSource(up2, store, stats=stats)
    assert src2.pread(0, len(data)) == data
    refetched = up2.fetched
    if damage == "truncate-data":
        assert stats[cache_source.CRC_FAILURES] > 0 and refetched == len(data) - len(data) // 3 // PS * PS
    elif damage == "zero-data":
        assert stats[cache_source.CRC_FAILURES] == 3 and refetched == 3 * PS
    else:  # the page table is not trusted: the blob's cache starts again
        assert stats["cache_resets"] == 1 and refetched == len(data)
        assert stats[cache_source.CRC_FAILURES] == 0
    assert src2.fully_cached()
    assert src2.pread(0, len(data)) == data and up2.fetched == refetched


def test_eviction_under_an_open_reader_in_the_same_process(tmp_path):
    src, up, stats = make(tmp_path)
    data = blob_bytes()
    assert src.pread(0, 32 * PS) == data[: 32 * PS]
    removed = src.store.clear()
    assert [e.digest for e in removed] == [src.digest]
    up.calls.clear()
    assert src.pread(0, 32 * PS) == data[: 32 * PS]
    assert up.fetched == 32 * PS
    assert stats[cache_source.REOPENS] == 1
    # the fresh files hold what was fetched after the eviction
    assert src.cached_bytes() == 32 * PS
    assert [e.present_bytes for e in src.store.entries()] == [32 * PS]


def test_prefetch_fills_without_reading_in_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_source, "PREFETCH_WINDOW", 256 * PS)
    src, up, _stats = make(tmp_path)
    data = blob_bytes()
    src.pread(10 * PS, PS)
    up.calls.clear()
    got = src.prefetch([(0, 300 * PS), (200 * PS, 100 * PS), (len(data) - 10, 100)])
    assert got == up.fetched == 300 * PS - PS + (len(data) - (len(data) - 10) // PS * PS)
    assert up.ranges[:2] == [(0, 10 * PS), (11 * PS, 245 * PS)]  # present page 10 is not asked for
    assert len(up.calls) == 3  # windows of at most 256 pages: 0-255, 256-299, and the far tail
    assert src.prefetch([(0, 300 * PS)]) == 0
    assert src.pread(0, 300 * PS) == data[: 300 * PS]
    assert not src.fully_cached()
    src.prefetch([(0, len(data))])
    assert src.fully_cached() and src.cached_bytes() == len(data)


def test_limit_too_small_for_the_blob_serves_without_storing(tmp_path):
    src, _up, stats = make(tmp_path, limit=64 << 10)
    data = blob_bytes()
    assert src.pread(0, 256 * PS) == data[: 256 * PS]
    assert stats[cache_source.BYPASS_BYTES] > 0
    assert src.store.usage() <= 64 << 10
    assert src.pread(0, 256 * PS) == data[: 256 * PS]


def test_unwritable_cache_still_serves(tmp_path, monkeypatch):
    src, _up, stats = make(tmp_path)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(src._blob, "write_data", boom)
    assert src.pread(0, 4 * PS) == blob_bytes()[: 4 * PS]
    assert stats[cache_source.WRITE_ERRORS] == 1
    assert src.cached_bytes() == 0


def test_on_demand_reads_count_their_wait_and_background_reads_do_not(tmp_path):
    """``waited`` (``--profile``'s "reads waiting on the registry"): the time on-demand reads spend
    waiting for missing pages; prefetch-priority reads (trace replay, start-up prefetch) add none."""
    from obd.io.priority import background_reads
    from obd.observability.stats import TIME_WAIT

    src, up, stats = make(tmp_path, delay=0.05)
    waited = lambda: stats.snapshot()["timers"].get(TIME_WAIT, 0.0)  # noqa: E731
    with background_reads():
        src.pread(0, 4096)
    assert up.calls and waited() == 0.0
    src.pread(0, 4096)  # present now: no wait
    assert waited() == 0.0
    src.pread(1 << 20, 4096)
    assert 0.05 <= waited() < 5
