"""Prefetch traces: record which blocks a workload reads, replay them concurrently later.

The file format is overlaybd's binary trace (docs/formats.md §6.5), so traces move between obd and
overlaybd: a 24-byte header (``u32 magic 0xC2EF1820``, 4 pad, ``u64 data_size`` = 24 × records,
``u32 checksum``, 4 pad) followed by 24-byte records (``char op`` = ``'R'``, 3 pad, ``u32
layer_index`` counted from the **bottom** layer, ``u64 count``, ``i64 offset``). Offsets are in
the layer's LSMT-blob coordinates — the tar-stripped, ZFile-decompressed view — and the checksum
is overlaybd's raw CRC32C chained over the records.

Recording wraps the lower layers' sources of a :class:`~obd.lsmt.stack.Stack`; replaying reads
the recorded ranges through the same sources from a thread pool, so a remote image's compressed
blocks land in the block cache with many ranged GETs in flight (and neighbours coalesced) before
or while the workload starts.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from obd.errors import ChecksumError, FormatError, TruncatedError
from obd.formats.crc import crc32c_raw
from obd.io.priority import background_reads
from obd.io.publish import publish_bytes
from obd.io.source import Source
from obd.lsmt.stack import Stack

MAGIC = 0xC2EF1820
HEADER = struct.Struct("<I4xQI4x")
RECORD = struct.Struct("<c3xIQq")
OP_READ = b"R"
#: overlaybd's replay buffer; longer records are split.
MAX_RECORD_BYTES = 1 << 20
#: A trace file larger than this is refused (3.4 million records).
MAX_TRACE_BYTES = 80 << 20

Record = tuple[int, int, int]  # (layer_index from the bottom, offset, count)


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
        if n:
            self.recorder.add(self.layer, offset, n)
        return n

    def close(self) -> None:
        self.inner.close()


class TraceRecorder:
    """Records the reads a stack's lower layers see (first occurrence of each range, in order)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self._lock = threading.Lock()
        self._seen: set[Record] = set()
        self.records: list[Record] = []
        nlowers = len(stack.lowers)
        first_slot: dict[int, int] = {}
        for slot, pos in enumerate(stack.slot_layer):
            first_slot.setdefault(pos, slot)
        # only each lower's own blob (its first file slot): a warp layer's target is not recorded
        for pos, slot in first_slot.items():
            if pos < nlowers:
                stack.files[slot] = _RecordingSource(stack.files[slot], pos, self)

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


def replay(stack: Stack, records: Iterable[Record], *, workers: int = 16) -> ReplayResult:
    """Read every recorded range through the stack's lower layers, ``workers`` at a time.

    Records naming a layer the stack does not have, or ranges past a layer's end, are skipped
    (a trace made for another image is harmless, just useless).
    """
    recs = list(records)
    slots: dict[int, Source] = {}
    for slot, pos in enumerate(stack.slot_layer):
        if pos < len(stack.lowers):
            slots.setdefault(pos, stack.files[slot])
    ranges = [r for r in coalesce(recs) if r[0] in slots and r[1] < slots[r[0]].size]
    start = time.monotonic()
    done = 0
    lock = threading.Lock()
    local = threading.local()

    @background_reads()  # nobody waits on these reads yet: Dragonfly's prefetch priority
    def one(rec: Record) -> None:
        nonlocal done
        layer, off, n = rec
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(MAX_RECORD_BYTES))
        got = slots[layer].readinto(buf[:n], off)
        with lock:
            done += got

    # big ranges first: they take longest
    ranges.sort(key=lambda r: -r[2])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for f in [pool.submit(one, r) for r in ranges]:
            f.result()
    return ReplayResult(len(recs), len(ranges), done, time.monotonic() - start)
