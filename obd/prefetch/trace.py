"""Prefetch traces: record which blocks a workload reads, replay them concurrently later.

The file format is overlaybd's binary trace (docs/formats.md §6.5), so traces move between obd and
overlaybd: a 24-byte header (``u32 magic 0xC2EF1820``, 4 pad, ``u64 data_size`` = 24 × records,
``u32 checksum``, 4 pad) followed by 24-byte records (``char op`` = ``'R'``, 3 pad, ``u32
layer_index`` counted from the **bottom** layer, ``u64 count``, ``i64 offset``). Offsets are in
the layer's LSMT-blob coordinates — the tar-stripped, ZFile-decompressed view — and the checksum
is overlaybd's raw CRC32C chained over the records.

obd extends ``layer_index`` without changing the format: its low 24 bits are the layer, its high 8
bits the **file** of that layer the range was read from — 0 its own blob (all overlaybd records),
1 a warp (turboOCI) layer's *target*, the original OCI layer blob a plain image's file data lives
in (:func:`layer_key`, :func:`split_key`). Without file-1 records a trace of a plain image, whose
meta layers are small and local, would replay nothing that needs the network. Old traces are read
unchanged, and overlaybd, which looks ``layer_index`` up among its layers and skips the ones it
does not have, replays the file-0 records of an obd trace and skips the others.

Recording wraps the lower layers' sources of a :class:`~obd.lsmt.stack.Stack`; replaying reads
the recorded ranges through the same sources from a thread pool, so a remote image's compressed
blocks land in the block cache with many ranged GETs in flight (and neighbours coalesced) before
or while the workload starts.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from obd.errors import ChecksumError, FormatError, TruncatedError
from obd.formats.crc import crc32c_raw
from obd.io.priority import PRIORITY_PREFETCH, background_reads, read_priority
from obd.io.publish import publish_bytes
from obd.io.source import FileSource, Source
from obd.lsmt.stack import Stack

MAGIC = 0xC2EF1820
HEADER = struct.Struct("<I4xQI4x")
RECORD = struct.Struct("<c3xIQq")
OP_READ = b"R"
#: overlaybd's replay buffer; longer records are split.
MAX_RECORD_BYTES = 1 << 20
#: A trace file larger than this is refused (3.4 million records).
MAX_TRACE_BYTES = 80 << 20

#: ``layer_index`` = layer (from the bottom) | file of the layer << FILE_SHIFT.
FILE_SHIFT = 24
LAYER_MASK = (1 << FILE_SHIFT) - 1
#: The file of a warp layer that holds its target (``obd.lsmt.warp.REMOTE_DATA``).
TARGET_FILE = 1
MAX_FILE = 0xFF

Record = tuple[int, int, int]  # (layer_index: layer from the bottom + file, offset, count)


def layer_key(layer: int, file: int = 0) -> int:
    """The ``layer_index`` of a record read from file ``file`` (0 own blob, 1 warp target) of ``layer``."""
    return layer | file << FILE_SHIFT


def split_key(key: int) -> tuple[int, int]:
    """``(layer from the bottom, file of the layer)`` of a record's ``layer_index``."""
    return key & LAYER_MASK, key >> FILE_SHIFT


def encode(records: Iterable[Record]) -> bytes:
    """A whole trace file for ``records``."""
    body = b"".join(RECORD.pack(OP_READ, layer, count, offset) for layer, offset, count in records)
    return HEADER.pack(MAGIC, len(body), crc32c_raw(body)) + body


def decode(raw: bytes, *, path: object = None) -> list[Record]:
    """Parse and verify a trace (magic, size, checksum, ops)."""
    if len(raw) < HEADER.size:
        raise TruncatedError(f"{len(raw)} bytes is shorter than the trace header", path=path, field="header")
    magic, data_size, checksum = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError("not an overlaybd trace (bad magic)", path=path, field="magic", value=magic)
    if data_size % RECORD.size or HEADER.size + data_size != len(raw):
        raise FormatError(
            f"file is {len(raw)} bytes; the header says {HEADER.size} + {data_size}",
            path=path,
            field="data_size",
            value=data_size,
        )
    body = memoryview(raw)[HEADER.size :]
    if crc32c_raw(body) != checksum:
        raise ChecksumError(
            "records do not match the header checksum", path=path, field="checksum", value=checksum
        )
    out = []
    for i, (op, layer, count, offset) in enumerate(RECORD.iter_unpack(body)):
        if op != OP_READ:
            raise FormatError(
                "only read records are supported", path=path, field=f"records[{i}].op", value=op
            )
        if offset < 0:
            raise FormatError("negative offset", path=path, field=f"records[{i}].offset", value=offset)
        out.append((layer, offset, count))
    return out


def load(path: str | os.PathLike[str]) -> list[Record]:
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size > MAX_TRACE_BYTES:
        raise FormatError(f"{size} bytes is too large for a trace", path=path, field="size")
    with open(path, "rb") as f:
        return decode(f.read(), path=path)


def save(path: str | os.PathLike[str], records: Iterable[Record]) -> None:
    """Write a trace atomically and durably (see :func:`obd.io.publish.publishing`)."""
    publish_bytes(path, encode(records))


def _lower_slots(stack: Stack) -> dict[int, int]:
    """Each file slot of the stack's lowers and the ``layer_index`` its reads are recorded under."""
    out: dict[int, int] = {}
    first_slot: dict[int, int] = {}
    for slot, pos in enumerate(stack.slot_layer):
        file = slot - first_slot.setdefault(pos, slot)
        if pos < len(stack.lowers) and file <= MAX_FILE:
            out[slot] = layer_key(pos, file)
    return out


class _RecordingSource(Source):
    """Passes reads through to ``inner`` and logs each complete one."""

    def __init__(self, inner: Source, layer: int, recorder: TraceRecorder):
        self.inner = inner
        self.layer = layer
        self.recorder = recorder
        self.name = inner.name
        self.size = inner.size

    def readinto(self, buf: memoryview, offset: int) -> int:
        n = self.inner.readinto(buf, offset)
        if n and read_priority() != PRIORITY_PREFETCH:
            self.recorder.add(self.layer, offset, n)
        return n

    def close(self) -> None:
        self.inner.close()


class TraceRecorder:
    """Records the reads a stack's lower layers see (first occurrence of each range, in order).

    Reads made as prefetch (:func:`~obd.io.priority.background_reads`: a trace replay, the ext4
    metadata and start-up prefetches, whole files read on a guess) are not recorded: a trace is
    what the workload read, not what was fetched for it.

    Every file of every lower is recorded: its own blob and, for a warp layer, its target, so a
    plain image's trace names the ranges of the original layer blobs its files were read from.
    """

    def __init__(self, stack: Stack):
        self.stack = stack
        self._lock = threading.Lock()
        self._seen: set[Record] = set()
        self.records: list[Record] = []
        for slot, key in _lower_slots(stack).items():
            stack.files[slot] = _RecordingSource(stack.files[slot], key, self)

    def add(self, layer: int, offset: int, count: int) -> None:
        rec = (layer, offset, count)
        with self._lock:
            if rec not in self._seen:
                self._seen.add(rec)
                self.records.append(rec)

    def save(self, path: str | os.PathLike[str]) -> int:
        with self._lock:
            records = list(self.records)
        save(path, records)
        return len(records)


@dataclass(frozen=True)
class ReplayResult:
    records: int
    ranges: int
    bytes: int
    seconds: float


def coalesce(records: Iterable[Record], *, max_bytes: int = MAX_RECORD_BYTES) -> list[Record]:
    """Records merged per layer where they touch or overlap, then cut to ``max_bytes`` pieces."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for layer, off, n in records:
        by_layer.setdefault(layer, []).append((off, off + n))
    out: list[Record] = []
    for layer, spans in by_layer.items():
        spans.sort()
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        for a, b in merged:
            for p in range(a, b, max_bytes):
                out.append((layer, p, min(max_bytes, b - p)))
    return out


def _merge(
    spans: list[tuple[int, int, int]], max_bytes: int = MAX_RECORD_BYTES
) -> list[tuple[int, int, int]]:
    """``(start, end, first)`` spans merged where they touch or overlap, cut to ``max_bytes``
    pieces: ``(offset, length, first)``, ``first`` the earliest of the spans a piece covers."""
    spans.sort()
    merged: list[list[int]] = []
    for a, b, first in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
            merged[-1][2] = min(merged[-1][2], first)
        else:
            merged.append([a, b, first])
    return [(p, min(max_bytes, b - p), first) for a, b, first in merged for p in range(a, b, max_bytes)]


#: Compressed bytes read past the estimated end of a gzip target range (the inflater's input chunk).
GZIP_MARGIN = 64 << 10


def _compressed(src: Source, offset: int, count: int) -> list[tuple[Source, int, int]] | None:
    """The bytes of the compressed blob behind ``src`` that reading ``[offset, offset+count)`` of
    ``src`` needs, if ``src`` is a seekable view of one (a warp target through a gzip index or a
    zstd frame index), else None. For a gzip index read by ranges (:mod:`obd.turbo.parts`), the
    windows of the seek points in the range are needed too.

    Replaying a target record fetches these bytes into the block cache instead of decompressing:
    no CPU taken from the workload, and one ranged read instead of a chain of the inflater's 64 KiB
    input reads. For gzip the end is where the compressed stream reaches ``offset+count``, estimated
    from the seek points on either side (the bytes between them compress alike) plus a margin; a
    short estimate costs the workload one more small fetch, never a wrong byte.
    """
    # lazy: only plain images have such targets; importing the readers costs start-up time
    from obd.formats.gzindex.source import GzipIndexedSource
    from obd.turbo.zstd import ZstdFramedSource

    end = min(offset + count, src.size)
    if isinstance(src, GzipIndexedSource):
        index, blob = src.index, src.gzip
        i, j = index.find(offset), index.find(end - 1)
        first = index.entry(i)[1] - 1  # the byte holding the entry's leftover bits
        de_j, en_j = index.entry(j)[:2]
        if j + 1 < len(index):
            de_k, en_k = index.entry(j + 1)[:2]
        else:
            de_k, en_k = index.uncompressed_size, blob.size
        ratio = (en_k - en_j) / max(1, de_k - de_j)
        last = min(en_k, en_j + int((end - de_j) * ratio) + GZIP_MARGIN, blob.size)
        out: list[tuple[Source, int, int]] = [(blob, first, last - first)]
        if not isinstance(index.source, FileSource):
            entries = [index.entry(k) for k in range(i, j + 1)]  # (de, en, win_pos, bits, win_len)
            lo, hi = min(e[2] for e in entries), max(e[2] + e[4] for e in entries)
            out.append((index.source, lo, hi - lo))
        return out
    if isinstance(src, ZstdFramedSource):
        frames = src.index.frames
        i = bisect.bisect_right(src.index.starts, offset) - 1
        j = bisect.bisect_right(src.index.starts, end - 1) - 1
        return [(src.blob, frames[i].offset, frames[j].offset + frames[j].length - frames[i].offset)]
    return None


#: Bytes of recorded ranges being read at once during a replay (see :func:`replay`).
REPLAY_WINDOW = 2 << 20


class _Window:
    """At most ``limit`` bytes held at once, taken in ticket order (0, 1, 2, …): a range waits for the
    ones before it, so a large one is not overtaken for ever by small ones; a range larger than the
    limit waits for an empty window."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.turn = 0
        self._cond = threading.Condition()

    def acquire(self, ticket: int, n: int) -> None:
        with self._cond:
            while ticket != self.turn or (self.held and self.held + n > self.limit):
                self._cond.wait()
            self.held += n
            self.turn += 1
            self._cond.notify_all()

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()


def replay(
    stack: Stack, records: Iterable[Record], *, workers: int = 16, window: int = REPLAY_WINDOW
) -> ReplayResult:
    """Read every recorded range through the stack's lower layers, ``workers`` at a time and at
    most ``window`` bytes of ranges at once.

    Records naming a layer the stack does not have, or ranges past a layer's end, are skipped
    (a trace made for another image is harmless, just useless). A range of a compressed warp
    target (a plain image's gzip or zstd layer) is read as the compressed bytes behind it
    (:func:`_compressed`), merged with its neighbours; ``bytes`` counts what was read. Ranges are
    read in the order the recording first needed them, and the window keeps that order on a slow
    link: with every range in flight at once, all of them share the bandwidth and the first one the
    workload needs arrives with the last (a 6 MB trace over 20 Mbit/s: after 2.4 s instead of 0.1 s).
    The default, 2 MiB of ranges (about 1 MB of lz4 on the wire), is 0.4 s of a 20 Mbit/s link and
    more than its bandwidth-delay product up to about 100 Mbit/s at 50 ms.
    """
    recs = list(records)
    slots = {key: stack.files[slot] for slot, key in _lower_slots(stack).items()}
    # the sources to read and their ranges, compressed targets mapped onto their blobs, each range
    # marked with the first record that needs it
    sources: list[Source] = []
    spans: dict[int, list[tuple[int, int, int]]] = {}
    for first, (key, off, n) in enumerate(recs):
        if key not in slots or off >= slots[key].size or n <= 0:
            continue
        back = _compressed(slots[key], off, n) if split_key(key)[1] else None
        for src, a, k in back if back is not None else [(slots[key], off, n)]:
            if id(src) not in spans:
                sources.append(src)
                spans[id(src)] = []
            spans[id(src)].append((a, a + k, first))
    # in the order the workload first needed them: on a slow link the replay then delivers what
    # the guest waits for next, instead of competing with it for the bandwidth
    ordered = sorted(
        (first, i, off, n) for i, src in enumerate(sources) for off, n, first in _merge(spans[id(src)])
    )
    jobs = [(sources[i], off, n) for _first, i, off, n in ordered]
    start = time.monotonic()
    done = 0
    lock = threading.Lock()
    local = threading.local()

    held = _Window(max(1, window))

    @background_reads()  # nobody waits on these reads yet: Dragonfly's prefetch priority
    def one(ticket: int, job: tuple[Source, int, int]) -> None:
        nonlocal done
        src, off, n = job
        held.acquire(ticket, n)  # first: a ticket never taken would hold up every one after it
        try:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(MAX_RECORD_BYTES))
            got = src.readinto(buf[:n], off)
        finally:
            held.release(n)
        with lock:
            done += got

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for f in [pool.submit(one, k, r) for k, r in enumerate(jobs)]:
            f.result()
    return ReplayResult(len(recs), len(jobs), done, time.monotonic() - start)
