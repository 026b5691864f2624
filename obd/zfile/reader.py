"""Reading ZFiles: detection and a random-access :class:`~obd.io.source.Source` of the original bytes.

:class:`ZFileReader` turns a compressed source into the plain byte stream it holds, so that an
LSMT layer (or anything else) can sit on top without knowing about compression. Every check made
at open time lives in :class:`~obd.zfile.layout.ZFileLayout`; the reader only maps reads onto
blocks, and checks what can only be checked then: block CRCs, and the decompressed length of
every block (which the C++ reader does not check).

Reads go one chunk of blocks at a time: one ``source.readinto`` for the compressed span of the
chunk, one CRC pass over that span for all its blocks (see :func:`_span_crc_ok`), then the whole
blocks are decompressed into the caller's buffer with one library call where the codec has one
(:meth:`~obd.zfile.codecs.Codec.decompress_run`: an LZ4 run as one LZ4 frame, a zstd run as
concatenated frames, both by the system libraries, see :mod:`obd.zfile.native`) and block by
block otherwise. Blocks that a read only partly covers are kept in a small LRU, so
repeated small reads of one block decompress it once.

A read of exactly one block (what NBD and FUSE clients mostly send) skips the plan: with liblz4
loaded, the record is read into a per-thread buffer and decoded by ``LZ4_decompress_safe``
straight into the caller's buffer without releasing the GIL (:class:`obd.zfile.native.NativeLz4Block`).
(Pipelining large reads, one piece loaded in a worker while the piece before decodes, was measured
slower on 2 CPUs in every run: lz4 38 % of the codec ceiling against 54 % serial, zstd 71 % against
84 %; so reads stay serial.) The time spent decompressing goes into the
``decode`` timer of :data:`obd.observability.stats.STATS` (``--profile``): one clock pair per
block read or per chunk.

Lengths: every block must decompress to exactly the block size (the last: the rest of the file).
The block-by-block path and :meth:`ZFileReader.verify` check that per block; a run decoded with
one call is checked as a whole (its total length; liblz4 bounds every block, libzstd holds every
frame to the size it announces), so blocks of a run that are too short and too long by the same
amount would go unnoticed there. Their CRCs match, so only a writer that made them on purpose
gets them: it gets its own bytes back, moved.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from time import perf_counter
from typing import NamedTuple

import numpy as np

from obd.errors import ChecksumError, FormatError, TruncatedError
from obd.formats.crc import ZFILE_BLOCK_SEED, crc32c_raw, crc32c_std
from obd.io.source import Source
from obd.observability.stats import STATS, TIME_DECODE
from obd.verify.repair import CRC_MISMATCHES, CRC_REFETCHES, find_repair
from obd.zfile.format import BLOCK_CRC_SIZE, RECORD_SIZE, ZFileRecord
from obd.zfile.layout import ZFileLayout, check_record_digest, max_record_length

log = logging.getLogger(__name__)

#: Uncompressed bytes decoded per chunk of a large read (bounds the scratch buffer). Each chunk
#: costs some tens of microseconds of Python and numpy calls, so larger chunks are faster.
CHUNK_BYTES = 4 << 20
#: Below this many blocks, CRCs are checked one call per block instead of one pass per span.
_SPAN_CRC_MIN_BLOCKS = 8
#: From this many whole blocks on, they are decoded as one run (one library call).
_RUN_MIN_BLOCKS = 2
#: Decompressed blocks kept for partial reads.
DEFAULT_CACHE_BLOCKS = 32
#: :func:`crc32c_raw` ``(data, ZFILE_BLOCK_SEED)`` is ``_crc32c_std(data, value=_SEED_STD) ^ 0xFFFFFFFF``.
_crc32c_std = crc32c_std
_SEED_STD = ZFILE_BLOCK_SEED ^ 0xFFFFFFFF

#: The 4 bytes whose raw CRC32C from register 0 is :data:`ZFILE_BLOCK_SEED` (see :func:`_span_crc_ok`).
_TRAILER_KEY = 0x9036E2DA
_TRAILER_KEYS = np.tile(np.frombuffer(_TRAILER_KEY.to_bytes(4, "little"), dtype=np.uint8), 1024)
_ARANGE4 = np.arange(4, dtype=np.int64)


class _Local(threading.local):
    """A reader's per-thread state; class attributes are the defaults (a missing attribute would
    cost a caught AttributeError on every read)."""

    #: inside :meth:`ZFileReader.readinto_nowait`
    nowait = False
    #: the scratch buffers of :meth:`ZFileReader._scratch_buffer`
    buf: list[bytearray] | None = None
    #: the one-block read's ``(buffer, view, address)`` (:meth:`ZFileReader._read_one`)
    record: tuple[bytearray, memoryview, int] | None = None


class _WouldBlock(Exception):
    """Raised inside :meth:`ZFileReader.readinto_nowait` when a block's bytes are not cached."""


def is_zfile(source: Source) -> bool:
    """Whether ``source`` starts with a ZFile header (``is_zfile``, docs/formats.md §2.10).

    Fewer than 512 bytes → :class:`TruncatedError`. A magic mismatch or a clear header bit →
    ``False`` (the bytes are used as they are, e.g. as a raw LSMT blob). Matching magic with the
    digest bit set but a wrong digest → :class:`ChecksumError`.
    """
    if source.size < RECORD_SIZE:
        raise TruncatedError(
            f"{source.size} bytes is too short to tell whether this is a ZFile (needs {RECORD_SIZE})",
            path=source.name,
            field="header",
        )
    raw = source.read_exact(0, RECORD_SIZE, "header")
    try:
        header = ZFileRecord.parse(raw, source.name, "header")
    except FormatError:
        return False
    check_record_digest(header, source.name, "header")
    return True


def _span_crc_ok(span: memoryview, trailers: np.ndarray) -> bool:
    """Check the CRC of every record of ``span`` with one CRC pass.

    Each record is ``compressed ‖ crc32le`` where ``crc = raw CRC32C(compressed, seed 100007)``.
    For a reflected CRC without final inversion, running a record *including* its stored CRC
    from the seed leaves the register at 0 exactly when the CRC matches. The raw CRC is linear in
    the data, so XOR-ing :data:`_TRAILER_KEY` into a record's trailer leaves the register at
    ``raw CRC32C(key, 0)`` = the seed instead: just what the next record must start from. So: XOR
    the key into every trailer but the last (``trailers``: their offsets within ``span``, in our
    scratch copy), run one raw CRC over the whole span from the seed, and expect 0.

    A damaged record leaves a non-zero difference in the register, and intact records after it
    only multiply it by x^(8·length) modulo the polynomial, which keeps it non-zero: one damaged
    record is caught exactly when its own CRC check would catch it. Several damaged records
    escape only if their errors cancel, at the same 2^-32 odds as one damaged record matching its
    CRC by chance. On a mismatch the trailers are restored and the caller checks block by block
    to name the culprit; on success they are left XOR-ed, as nothing reads them any more (the LZ4
    run decoder overwrites them). Records are at least 5 bytes long (checked at open), so the
    XORs never overlap.
    """
    arr = np.frombuffer(span, dtype=np.uint8)
    idx = (trailers[:, None] + _ARANGE4).ravel()
    keys = _TRAILER_KEYS[: len(idx)] if len(idx) <= len(_TRAILER_KEYS) else np.resize(_TRAILER_KEYS, len(idx))
    arr[idx] ^= keys
    if crc32c_raw(span, ZFILE_BLOCK_SEED) == 0:
        return True
    arr[idx] ^= keys
    return False


class _Plan(NamedTuple):
    """A chunk whose compressed span is loaded and CRC-checked, ready to decompress."""

    r0: int
    r1: int
    start: int
    end: int
    dst: memoryview
    span: memoryview
    base: int
    head: bool
    tail: bool
    #: ``span`` with :attr:`ZFileReader._headroom` scratch bytes in front (for ``decompress_run``)
    room: memoryview
    #: the scratch buffer (one-item list) ``room`` is a view of, to read the records again into
    scratch: list[bytearray]


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`ZFileReader.verify` checked (it raises on the first failure instead)."""

    blocks: int
    original_size: int
    compressed_size: int
    block_crcs_checked: bool
    index_crc_checked: bool
    header_digest_checked: bool
    trailer_digest_checked: bool


class _BlockCache:
    """A small thread-safe LRU of decompressed blocks, keyed by block number."""

    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> bytes | None:
        if not self.capacity:
            return None
        with self._lock:
            blk = self._items.get(key)
            if blk is not None:
                self._items.move_to_end(key)
            return blk

    def put(self, key: int, blk: bytes) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._items[key] = blk
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class ZFileReader(Source):
    """A ZFile opened for random access; itself a :class:`~obd.io.source.Source` of the original bytes.

    ``size`` is the original file size; ``readinto`` clamps at it. Safe to share between threads.

    Attributes for inspectors: ``header``, ``trailer`` (``None`` if unused and unreadable),
    ``record`` (the one the fields came from) and ``record_kind`` (``"header"`` or
    ``"trailer"``), ``algorithm`` / ``algorithm_name``, ``block_size``, ``verify_flag``,
    ``block_count``, ``record_lengths`` (the index: bytes per block including its CRC),
    ``compressed_lengths`` (without the CRC), ``offsets`` (absolute start of every block plus
    the end), ``compressed_size`` and ``original_size``.
    """

    def __init__(
        self,
        source: Source,
        *,
        name: str | None = None,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
        layout: ZFileLayout | None = None,
    ):
        self.source = source
        self.name = name or source.name
        self.layout = lay = layout if layout is not None else ZFileLayout.read(source, self.name)
        # Plain attributes, not properties of the layout: the read path uses them on every call.
        self.header = lay.header
        self.trailer = lay.trailer
        self.record = lay.record
        self.record_kind = lay.record_kind
        self.algorithm = lay.algorithm
        self.algorithm_name = lay.algorithm_name
        self.codec = lay.codec
        self.block_size = bs = lay.block_size
        self.verify_flag = lay.verify
        self.original_size = self.size = lay.original_size
        self.compressed_size = lay.file_size
        self.block_count = lay.block_count
        self.record_lengths = lay.record_lengths
        self.compressed_lengths = lay.compressed_lengths
        self.offsets = lay.offsets
        self._index_crc_checked = lay.index_crc_checked
        self._crc_len = lay.crc_len
        self._last_len = lay.last_block_length
        self._chunk_blocks = max(1, CHUNK_BYTES // bs)
        self._slices = [slice(i * bs, (i + 1) * bs) for i in range(self._chunk_blocks)]
        # Runs need the CRC trailers the codec overwrites, and scratch room in front of a span.
        self._runs = bool(self._crc_len)
        self._headroom = self.codec.run_headroom if self._runs else 0
        self._cache = _BlockCache(cache_blocks)
        self._local = _Local()
        self._block_decoder = self.codec.block_decoder()

    # -- helpers -------------------------------------------------------------------------------

    def block_length(self, i: int) -> int:
        """Decompressed length of block ``i`` (the last block may be short)."""
        return self._last_len if i == self.block_count - 1 else self.block_size

    def block_extent(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of block ``i``'s record (compressed bytes plus CRC) in the file."""
        return int(self.offsets[i]), int(self.offsets[i + 1] - self.offsets[i])

    def _scratch_buffer(self) -> list[bytearray]:
        """The calling thread's scratch buffer for compressed spans (in a one-item list, to swap)."""
        buf = self._local.buf
        if buf is None:
            buf = self._local.buf = [bytearray()]
        return buf

    def _read_span(self, r0: int, r1: int, scratch: list[bytearray]) -> tuple[memoryview, int, memoryview]:
        """Read the records of blocks ``r0..r1`` into ``scratch[0]`` after the headroom.

        Returns the records' view, their file offset, and the view with the headroom in front.
        """
        base = int(self.offsets[r0])
        stop = int(self.offsets[r1 + 1])
        hr = self._headroom
        if len(scratch[0]) < hr + stop - base:
            # A new buffer rather than a resize: a view of the old one may still be alive in a
            # traceback, and a bytearray cannot be resized while exported.
            scratch[0] = bytearray(max(hr + stop - base, 64 << 10))
        room = memoryview(scratch[0])[: hr + stop - base]
        span = room[hr:]
        if self._local.nowait:
            got = self.source.readinto_nowait(span, base)
            if got is None:
                raise _WouldBlock
        else:
            got = self.source.readinto(span, base)
        if got != stop - base:
            raise TruncatedError(
                f"blocks {r0}..{r1} need bytes [{base}, {stop}) but only {got} could be read",
                path=self.name,
                field=f"block[{r0}]",
            )
        return span, base, room

    def _check_block_crc(self, i: int, rec: memoryview) -> None:
        stored = int.from_bytes(rec[-BLOCK_CRC_SIZE:], "little")
        crc = crc32c_raw(rec[:-BLOCK_CRC_SIZE], ZFILE_BLOCK_SEED)
        if crc != stored:
            self._refetch_block(i, rec, stored, crc)

    def _refetch_block(self, i: int, rec: memoryview, stored: int, crc: int) -> None:
        """Block ``i``'s record ``rec`` failed its CRC. For a registry blob, treat it as a verify
        mismatch (:mod:`obd.verify.repair`): evict the cached copy, refetch the record once from the
        origin into ``rec`` and keep it if its CRC holds; else (or for a local file) ChecksumError."""
        found = find_repair(self.source)
        off = self.block_extent(i)[0]
        what = f"block {i}: CRC mismatch (stored 0x{stored:08x}, computed 0x{crc:08x})"
        if found is None:
            raise ChecksumError(what, path=self.name, field=f"block[{i}].crc", value=stored)
        repair, shift = found
        repair.stats.incr(CRC_MISMATCHES)
        log.warning("%s: %s at blob offset %d; refetching it from the origin", self.name, what, shift + off)
        fetched = repair.refetch(shift + off, len(rec), CRC_REFETCHES)
        note = "no origin to refetch from"
        if fetched is not None:
            again = fetched.data
            good = crc32c_raw(again[:-BLOCK_CRC_SIZE], ZFILE_BLOCK_SEED)
            if len(again) == len(rec) and good == int.from_bytes(again[-BLOCK_CRC_SIZE:], "little"):
                rec[:] = again
                fetched.keep()
                log.warning("%s: block %d: the origin's copy is good; serving and caching it", self.name, i)
                return
            note = "the origin's copy fails its CRC as well"
        raise ChecksumError(
            f"{what} at blob offset {shift + off}; {note}",
            path=f"{self.name} (blob {repair.digest})",
            field=f"block[{i}].crc",
            value=stored,
        )

    def _check_crcs(self, span: memoryview, base: int, r0: int, r1: int) -> None:
        """Check the CRC of blocks ``r0..r1`` held in ``span`` (which starts at file offset ``base``)."""
        offs = self.offsets
        if r1 - r0 + 1 >= _SPAN_CRC_MIN_BLOCKS and _span_crc_ok(
            span, offs[r0 + 1 : r1 + 1] - (base + BLOCK_CRC_SIZE)
        ):
            return
        rel = (offs[r0 : r1 + 2] - base).tolist()
        for k in range(r1 - r0 + 1):
            self._check_block_crc(r0 + k, span[rel[k] : rel[k + 1]])

    def _decode(self, i: int, rec: memoryview) -> bytes:
        """Decompress one block record whose CRC (if any) was already checked."""
        if self._crc_len:
            rec = rec[: -self._crc_len]
        return self.codec.decompress(rec, self.block_length(i), block=i, path=self.name)

    # -- reading -------------------------------------------------------------------------------

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` with original bytes from ``offset``; short only at the end of the original file."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        mv = memoryview(buf)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        size = self.size
        if offset >= size or not len(mv):
            return 0
        n = min(len(mv), size - offset)
        end = offset + n
        bs = self.block_size
        if not offset % bs and (n == bs or end == size) and n <= bs:
            # One whole block (a 4 KiB read of an NBD or FUSE client): the checked path, no plan.
            j = offset // bs
            if self._block_decoder is not None:
                self._read_one(j, mv[:n])
                return n
            scratch = self._scratch_buffer()
            span = self._read_span(j, j, scratch)[0]
            if self._crc_len:
                self._check_block_crc(j, span)
            t0 = perf_counter()
            mv[:n] = self._decode(j, span)
            STATS.add_time(TIME_DECODE, perf_counter() - t0)
            return n
        scratch = self._scratch_buffer()
        cb = self._chunk_blocks
        pos = offset
        while pos < end:
            j0 = pos // bs
            j1 = min((end - 1) // bs, j0 + cb - 1)
            stop = min(end, (j1 + 1) * bs)
            self._decode_into(self._load(j0, j1, pos, stop, mv[pos - offset : stop - offset], scratch))
            pos = stop
        return n

    def _read_one(self, j: int, out: memoryview) -> None:
        """Block ``j`` into ``out`` by :attr:`_block_decoder`: read into this thread's record buffer
        (whose address is known), check the CRC, decode holding the GIL; the checked decoder names
        what the fast one refuses."""
        dec = self._block_decoder
        assert dec is not None
        loc = self._local
        rb = loc.record
        if rb is None:
            buf = bytearray(max_record_length(self.block_size) + self._crc_len)
            rb = loc.record = (buf, memoryview(buf), dec.address(buf))
        a = self.offsets.item(j)
        length = self.offsets.item(j + 1) - a
        rec = rb[1][:length]
        if loc.nowait:
            got = self.source.readinto_nowait(rec, a)
            if got is None:
                raise _WouldBlock
        else:
            got = self.source.readinto(rec, a)
        if got != length:
            raise TruncatedError(
                f"blocks {j}..{j} need bytes [{a}, {a + length}) but only {got} could be read",
                path=self.name,
                field=f"block[{j}]",
            )
        crc = self._crc_len
        if crc:
            # _check_block_crc inlined: this runs once per 4 KiB request
            stored = int.from_bytes(rec[length - BLOCK_CRC_SIZE :], "little")
            got = _crc32c_std(rec[: length - BLOCK_CRC_SIZE], value=_SEED_STD) ^ 0xFFFFFFFF
            if got != stored:
                self._refetch_block(j, rec, stored, got)
        t0 = perf_counter()
        if not dec.decompress_block_into(rb[2], length - crc, out):
            out[:] = self._decode(j, rec)
        STATS.add_time(TIME_DECODE, perf_counter() - t0)

    def readinto_nowait(self, buf: memoryview, offset: int) -> int | None:
        """:meth:`readinto` if the compressed blocks can be read without waiting (page cache, memory);
        None otherwise. Decoding a cached 4 KiB block costs microseconds: cheaper on the caller's
        event loop than a hop to a worker thread."""
        self._local.nowait = True
        try:
            return self.readinto(buf, offset)
        except _WouldBlock:
            return None
        finally:
            self._local.nowait = False

    def _load(
        self, j0: int, j1: int, start: int, end: int, dst: memoryview, scratch: list[bytearray]
    ) -> _Plan | None:
        """Stage 1 of a chunk: serve partial edge blocks from the cache, read the rest, check CRCs."""
        bs = self.block_size
        size = self.size
        cache = self._cache
        head = start != j0 * bs or end < min((j0 + 1) * bs, size)
        tail = j1 != j0 and end < min((j1 + 1) * bs, size)
        r0, r1 = j0, j1
        if head:
            blk = cache.get(j0)
            if blk is not None:
                a = start - j0 * bs
                k = min(end, (j0 + 1) * bs) - start
                dst[:k] = blk[a : a + k]
                r0 += 1
                head = False
        if tail and r1 >= r0:
            blk = cache.get(j1)
            if blk is not None:
                k = end - j1 * bs
                dst[len(dst) - k :] = blk[:k]
                r1 -= 1
                tail = False
        if r0 > r1:
            return None
        span, base, room = self._read_span(r0, r1, scratch)
        if self._crc_len:
            self._check_crcs(span, base, r0, r1)
        return _Plan(r0, r1, start, end, dst, span, base, head, tail, room, scratch)

    def _decode_into(self, plan: _Plan | None, *, strict: bool = False) -> None:
        """Stage 2 of a chunk: decompress the blocks of ``plan`` into its destination.

        ``strict`` checks the length of every block (no runs; see the module docstring).
        """
        if plan is None:
            return
        t0 = perf_counter()
        try:
            self._decode_plan(plan, strict)
        finally:
            STATS.add_time(TIME_DECODE, perf_counter() - t0)

    def _decode_plan(self, plan: _Plan, strict: bool) -> None:
        bs = self.block_size
        r0, r1, start, end, dst, span, base, head, tail, room, scratch = plan
        # ``head`` / ``tail``: blocks r0 / r1 are only partly wanted (and were not cached).
        f0, f1 = r0, r1
        if head:
            blk = self._decode(r0, span[: int(self.offsets[r0 + 1]) - base])
            self._cache.put(r0, blk)
            a = start - r0 * bs
            k = min(end, (r0 + 1) * bs) - start
            dst[:k] = blk[a : a + k]
            f0 += 1
        if tail:
            blk = self._decode(r1, span[int(self.offsets[r1]) - base :])
            self._cache.put(r1, blk)
            k = end - r1 * bs
            dst[len(dst) - k :] = blk[:k]
            f1 -= 1
        if f1 >= f0 and f1 == self.block_count - 1 and self._last_len != bs:
            # The file's short last block, wholly inside the read.
            a, b = int(self.offsets[f1]) - base, int(self.offsets[f1 + 1]) - base
            p = f1 * bs - start
            dst[p : p + self._last_len] = self._decode(f1, span[a:b])
            f1 -= 1
        if f1 < f0:
            return

        # Whole blocks, decompressed straight into the caller's buffer: as one run (one library
        # call), or block by block with every per-block step in C (see Codec.decompress_span) and
        # the copy too: a C-level ``map`` assigning each block to its slice. Assigning a block of
        # the wrong length raises ValueError, which is the length check.
        o = self.offsets[f0 : f1 + 2] - base
        out = dst[f0 * bs - start :]
        run = self._runs and not strict and f1 - f0 + 1 >= _RUN_MIN_BLOCKS
        try:
            if run:
                hr = self._headroom
                self.codec.decompress_run(room, o[:-1] + hr, o[1:] - self._crc_len + hr, bs, out)
            elif f0 == f1:
                out[:bs] = self._decode(f0, span[int(o[0]) : int(o[1])])
            else:
                blocks = self.codec.decompress_span(span, o[:-1], o[1:] - self._crc_len, bs)
                deque(map(out.__setitem__, self._slices, blocks), maxlen=0)
        except self.codec.errors:
            # Redo the blocks one checked block at a time: that names a bad one (FormatError), or
            # gives the bytes where only the run decoder refused the frames (one it does not take,
            # or blocks it would have to check one by one). A run leaves the scratch copy
            # rewritten, so the records are read (and checked) again first.
            if run:
                span = self._read_span(r0, r1, scratch)[0]
                self._check_crcs(span, base, r0, r1)
            rel = o.tolist()
            for k in range(f1 - f0 + 1):
                out[k * bs : (k + 1) * bs] = self._decode(f0 + k, span[rel[k] : rel[k + 1]])

    # -- whole-file checks ---------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check every block's CRC (when stored) and decompression, and the trailer digest.

        Raises :class:`ChecksumError` / :class:`FormatError` naming the first bad block; returns a
        :class:`VerifyReport` when everything is intact. (The header digest and the index CRC
        were already checked when the file was opened, where their flags ask for it.)
        """
        trailer_checked = False
        if self.trailer is not None and self.trailer.digest_enabled:
            check_record_digest(self.trailer, self.name, "trailer")
            trailer_checked = True
        n = self.block_count
        bs = self.block_size
        cb = self._chunk_blocks
        out = bytearray(cb * bs)
        mv = memoryview(out)
        scratch = self._scratch_buffer()
        for r0 in range(0, n, cb):
            r1 = min(n - 1, r0 + cb - 1)
            start = r0 * bs
            end = min((r1 + 1) * bs, self.size)
            self._decode_into(self._load(r0, r1, start, end, mv[: end - start], scratch), strict=True)
        return VerifyReport(
            blocks=n,
            original_size=self.size,
            compressed_size=self.compressed_size,
            block_crcs_checked=self.verify_flag,
            index_crc_checked=self._index_crc_checked,
            header_digest_checked=self.header.digest_enabled,
            trailer_digest_checked=trailer_checked,
        )

    def info(self) -> dict[str, object]:
        """A summary for inspectors (``obd zfile info``)."""
        return {
            "path": self.name,
            "record": self.record_kind,
            "algorithm": self.algorithm_name,
            "block_size": self.block_size,
            "verify": self.verify_flag,
            "blocks": self.block_count,
            "original_size": self.original_size,
            "compressed_size": self.compressed_size,
            "index_offset": self.record.index_offset,
            "index_crc_checked": self._index_crc_checked,
            "header": self.header.as_dict(),
            "trailer": None if self.trailer is None else self.trailer.as_dict(),
        }

    def clear_cache(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.clear()
        self.source.close()

    def __repr__(self) -> str:
        return (
            f"<ZFileReader {self.name!r} {self.algorithm_name} bs={self.block_size} "
            f"blocks={self.block_count} size={self.size}>"
        )


__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CACHE_BLOCKS",
    "VerifyReport",
    "ZFileReader",
    "is_zfile",
]
