"""The cache's on-disk format: the page table of one blob (header, records, presence tags).

Header (little-endian): ``magic "obdcache"``, ``u32 version``, ``u32 page_size``, ``u64 blob_size``,
``u64 generation`` (random, fixed when the table is created), ``u32 digest_len`` (32 or 64), the raw
digest bytes in a 64-byte field, zero padding, and at byte 124 ``u32`` raw CRC32C of bytes 0..123.
The file is exactly ``128 + 8 × pages`` bytes.

Record of page *i*: ``u32 crc`` (raw CRC32C of the page's bytes, seeded with :data:`PAGE_SEED`; the
last page is short) and ``u32 tag``. The page is **present** only when ``tag`` equals a value derived
from ``crc``, *i* and the generation (never 0), so an all-zero record, a torn record, a flipped bit or
a record left by an earlier table of the same blob all read as absent. docs/cache.md has the long form.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

import numpy as np

from obd.errors import FormatError, ObdError
from obd.formats.crc import crc32c_raw, crc32c_std
from obd.io.pagecache import read_cached

#: Default page: the unit of presence, checksums and fetches (overlaybd's cache uses 4 KiB too).
DEFAULT_PAGE_SIZE = 4096
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
#: Blobs larger than this are refused (the page table would not fit the header's sanity bounds).
MAX_BLOB_SIZE = 1 << 50

MAGIC = b"obdcache"
VERSION = 1
HEADER_SIZE = 128
RECORD_SIZE = 8
#: Seed of the per-page CRC, so that an all-zero page does not checksum to 0.
PAGE_SEED = 0x6F626463

# magic, version, page_size, blob_size, generation, digest_len, digest
_HEADER = struct.Struct("<8sIIQQI64s")
_CRC_AT = HEADER_SIZE - 4
RECORD_DTYPE = np.dtype("<u4")
# Records are scanned in slices of this many pages, so a big table never needs one big buffer.
_SCAN_PAGES = 1 << 17

DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
#: Digest algorithms the cache keys blobs by, and their raw digest length.
ALGORITHMS = {"sha256": 32, "sha512": 64}
_ALG_BY_LEN = {n: alg for alg, n in ALGORITHMS.items()}


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>`` (lowercase); else ObdError."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ObdError("a blob digest must be sha256:<64 lowercase hex digits>", field="digest", value=digest)
    return digest


def page_count(blob_size: int, page_size: int) -> int:
    return (blob_size + page_size - 1) // page_size


def check_page_size(page_size: int) -> None:
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE) or page_size & (page_size - 1):
        raise ObdError(
            f"must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}",
            field="page_size",
            value=page_size,
        )


_MIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1


_crc32c_std = crc32c_std
_PAGE_SEED_STD = PAGE_SEED ^ 0xFFFFFFFF


def page_crcs(data: memoryview, page_size: int) -> list[int]:
    """The page CRC (raw CRC32C seeded with :data:`PAGE_SEED`) of each page of ``data``."""
    return [
        _crc32c_std(data[i : i + page_size], value=_PAGE_SEED_STD) ^ 0xFFFFFFFF
        for i in range(0, len(data), page_size)
    ]


def expected_tags(first: int, crcs: np.ndarray, generation: int) -> np.ndarray:
    """The ``tag`` that marks pages ``first, first+1, …`` present with these CRCs.

    ``tag = crc ^ low32(m ^ (m >> 32))`` with ``m = (page × φ64 + generation) mod 2⁶⁴``, and 1 where
    that is 0. Vectorised; a few pages (one small read) are done in plain integers, which is faster.
    """
    if len(crcs) <= 4:
        small = []
        for k, crc in enumerate(crcs.tolist()):
            mix = ((first + k) * _MIX + generation) & _M64
            small.append(((mix >> 32) ^ mix ^ crc) & _M32 or 1)
        return np.array(small, dtype=np.uint32)
    idx = np.arange(first, first + len(crcs), dtype=np.uint64)
    mixed = idx * np.uint64(_MIX) + np.uint64(generation)
    key = ((mixed >> np.uint64(32)) ^ mixed).astype(np.uint32)
    tags = crcs.astype(np.uint32) ^ key
    tags[tags == 0] = 1
    return tags


@dataclass(frozen=True)
class MetaHeader:
    """The page table's header."""

    page_size: int
    blob_size: int
    generation: int
    digest: str  # sha256:<hex>

    @property
    def pages(self) -> int:
        return page_count(self.blob_size, self.page_size)

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + RECORD_SIZE * self.pages

    def pack(self) -> bytes:
        raw = bytes.fromhex(self.digest.partition(":")[2])
        body = _HEADER.pack(MAGIC, VERSION, self.page_size, self.blob_size, self.generation, len(raw), raw)
        body = body.ljust(_CRC_AT, b"\0")
        return body + struct.pack("<I", crc32c_raw(body))

    @classmethod
    def unpack(cls, raw: bytes, *, path: str, file_size: int) -> MetaHeader:
        """Validate every field before use; raise :class:`FormatError` naming the first bad one."""
        if len(raw) < HEADER_SIZE:
            raise FormatError(f"page table holds {len(raw)} bytes, less than its header", path=path)
        magic, version, page_size, blob_size, generation, digest_len, digest = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise FormatError("not an obd cache page table", path=path, field="header.magic", value=magic)
        (crc,) = struct.unpack_from("<I", raw, _CRC_AT)
        if crc != crc32c_raw(raw[:_CRC_AT]):
            raise FormatError("header checksum mismatch", path=path, field="header.crc", value=crc)
        if version != VERSION:
            raise FormatError("unknown version", path=path, field="header.version", value=version)
        try:
            check_page_size(page_size)
        except ObdError as e:
            raise FormatError(e.detail, path=path, field="header.page_size", value=page_size) from None
        if blob_size > MAX_BLOB_SIZE:
            raise FormatError("blob size out of range", path=path, field="header.blob_size", value=blob_size)
        alg = _ALG_BY_LEN.get(digest_len)
        if alg is None:
            raise FormatError("not a digest length", path=path, field="header.digest_len", value=digest_len)
        head = cls(page_size, blob_size, generation, f"{alg}:{digest[:digest_len].hex()}")
        if file_size != head.file_size:
            raise FormatError(
                f"page table is {file_size} bytes, its header implies {head.file_size}",
                path=path,
                field="file_size",
                value=file_size,
            )
        return head


def preadv_full(fd: int, bufs: list[memoryview], offset: int) -> int:
    """``preadv`` until ``bufs`` are full or EOF; returns the bytes read.

    One small buffer the page cache holds (a 4 KiB request, a page-table slice) is read keeping
    the GIL (:func:`~obd.io.pagecache.read_cached`).
    """
    if len(bufs) == 1:
        got = read_cached(fd, bufs[0], offset)
        if got == len(bufs[0]):
            return got
    want = sum(len(b) for b in bufs)
    got = os.preadv(fd, bufs, offset)
    if got >= want or got <= 0:
        return max(got, 0)
    while got < want:
        rest: list[memoryview] = []
        skip = got
        for b in bufs:
            if skip >= len(b):
                skip -= len(b)
                continue
            rest.append(b[skip:])
            skip = 0
        n = os.preadv(fd, rest, offset + got)
        if n <= 0:
            break
        got += n
    return got


def pwrite_full(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def read_records(meta_fd: int, first: int, count: int, generation: int) -> tuple[np.ndarray, np.ndarray]:
    """``(crcs, present)`` of ``count`` pages from ``first``; records past the end read as absent."""
    raw = bytearray(count * RECORD_SIZE)
    got = preadv_full(meta_fd, [memoryview(raw)], HEADER_SIZE + first * RECORD_SIZE)
    if got < len(raw):
        raw[got:] = bytes(len(raw) - got)
    rec = np.frombuffer(raw, dtype=RECORD_DTYPE).reshape(count, 2)
    crcs = rec[:, 0]
    return crcs, rec[:, 1] == expected_tags(first, crcs, generation)


def present_bytes(meta_fd: int, header: MetaHeader) -> int:
    """Bytes of the blob whose pages are present, reading the table in bounded slices."""
    total = 0
    pages, ps = header.pages, header.page_size
    for first in range(0, pages, _SCAN_PAGES):
        count = min(_SCAN_PAGES, pages - first)
        _, present = read_records(meta_fd, first, count, header.generation)
        total += int(np.count_nonzero(present)) * ps
        if first + count == pages and present[-1]:
            total -= pages * ps - header.blob_size  # the last page is short
    return total


__all__ = [
    "ALGORITHMS",
    "DEFAULT_PAGE_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "RECORD_SIZE",
    "MetaHeader",
    "check_digest",
    "check_page_size",
    "expected_tags",
    "page_count",
    "page_crcs",
    "present_bytes",
    "read_records",
]
