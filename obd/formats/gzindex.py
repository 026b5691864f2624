"""turboOCI's gzip index ("ddgzidx", ``gzip.meta``): random access into a gzip layer (FORMATS.md §8).

A turboOCI warp layer maps file data into the *uncompressed* tar stream of the original OCI layer.
For a gzip layer that stream is reached through this index, a zran-style list of restart points::

    [header 333 bytes][window 0][window 1]...[window K-1][index area]

Each entry names a deflate block boundary: ``de_pos`` (uncompressed offset), ``en_pos`` (first whole
compressed byte after it), ``bits`` (bits of byte ``en_pos - 1`` still unread) and the 32 KiB of
output before it (the window, zlib-compressed when ``dict_compress_algo`` is 1). A read starts a raw
inflater at the nearest entry at or before the offset, primes it with the leftover bits, sets the
window as dictionary, and inflates forward.

Python's :mod:`zlib` has no ``inflatePrime`` and no ``Z_BLOCK`` stop reporting, so both the reader
and the builder drive the system libz through :mod:`ctypes` (a small, checked wrapper below). The
builder follows ``gzip_index_create.cpp`` call for call (same input chunks, same circular output
window, same entry selection), so with the same libz it writes the same bytes as overlaybd.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import os
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import BinaryIO

import numpy as np

from obd.errors import ChecksumError, FormatError, ObdError, TruncatedError, UnsupportedError
from obd.formats.crc import crc32c_raw
from obd.io.source import BytesSource, FileSource, Source

MAGIC = b"ddgzidx\x00"
MAJOR_VERSION = 1
MINOR_VERSION = 0
ALGO_NONE = 0
ALGO_ZLIB = 1
WINSIZE = 32768
#: Smallest span the tools accept (``DEFLATE_BLOCK_UNCOMPRESS_MAX_SIZE``).
MIN_SPAN = 65536
DEFAULT_SPAN = 1 << 20
DEFAULT_LEVEL = 6
#: Largest stored window the C++ builder can write (its compression buffer).
MAX_WIN_LEN = 65536

#: ``IndexFileHeader`` (packed, 333 bytes): magic, major, minor, algo, level (signed), flag, span,
#: window, index_size, index_num, gzip_file_size, index_file_size, uncompress_file_size, reserve,
#: index_start, index_area_len, crc.
HEADER_STRUCT = struct.Struct("<8sBBBbBiiiqqqq256sqqI")
HEADER_SIZE = HEADER_STRUCT.size
CRC_SPAN = HEADER_SIZE - 4
assert HEADER_SIZE == 333
#: ``IndexEntry`` (packed, 29 bytes): de_pos, en_pos, win_pos, bits, win_len.
ENTRY_STRUCT = struct.Struct("<qqqBI")
ENTRY_SIZE = ENTRY_STRUCT.size
assert ENTRY_SIZE == 29
ENTRY_DTYPE = np.dtype(
    [("de_pos", "<i8"), ("en_pos", "<i8"), ("win_pos", "<i8"), ("bits", "u1"), ("win_len", "<u4")]
)
assert ENTRY_DTYPE.itemsize == ENTRY_SIZE

#: Nothing larger than this is allocated on the word of an unverified header.
MAX_ALLOC = 64 << 20
#: deflate cannot expand data by more than this factor (1032:1 is its limit), used to bound counts.
_MAX_DEFLATE_RATIO = 1032


# -- header -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GzipIndexHeader:
    """The 333-byte header, field for field (no validation; see :class:`GzipIndex`)."""

    magic: bytes = MAGIC
    major_version: int = MAJOR_VERSION
    minor_version: int = MINOR_VERSION
    dict_compress_algo: int = ALGO_ZLIB
    dict_compress_level: int = DEFAULT_LEVEL
    flag: int = 0
    span: int = DEFAULT_SPAN
    window: int = WINSIZE
    index_size: int = ENTRY_SIZE
    index_num: int = 0
    gzip_file_size: int = 0
    index_file_size: int = 0
    uncompress_file_size: int = 0
    reserve: bytes = field(default=bytes(256), repr=False)
    index_start: int = HEADER_SIZE
    index_area_len: int = 0
    crc: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> GzipIndexHeader:
        return cls(*HEADER_STRUCT.unpack(data[:HEADER_SIZE]))

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(
            self.magic,
            self.major_version,
            self.minor_version,
            self.dict_compress_algo,
            self.dict_compress_level,
            self.flag,
            self.span,
            self.window,
            self.index_size,
            self.index_num,
            self.gzip_file_size,
            self.index_file_size,
            self.uncompress_file_size,
            self.reserve,
            self.index_start,
            self.index_area_len,
            self.crc,
        )

    def computed_crc(self) -> int:
        """Raw CRC32C (seed 0) of the first 329 packed bytes (``IndexFileHeader::cal_crc``)."""
        return crc32c_raw(self.pack()[:CRC_SPAN])

    def sealed(self) -> GzipIndexHeader:
        """This header with ``crc`` set to its computed value."""
        return replace(self, crc=self.computed_crc())


# -- the parsed, validated index --------------------------------------------------------------------


class GzipIndex:
    """A validated gzip index: header, entry columns, and lazily loaded windows.

    Construct with :meth:`open` (an index :class:`~obd.io.source.Source`) or :meth:`parse` (bytes). Every
    check of FORMATS.md §8.1 is made before anything is trusted; ``gzip_size``, when given, must
    equal the header's ``gzip_file_size`` (overlaybd checks it against the target blob).
    """

    def __init__(self, source: Source, *, gzip_size: int | None = None):
        self.source = source
        self.name = source.name
        path = self.name
        size = source.size
        if size < HEADER_SIZE:
            raise TruncatedError(
                f"{size} bytes is less than the {HEADER_SIZE}-byte header", path=path, field="header"
            )
        raw = source.read_exact(0, HEADER_SIZE, "header")
        h = GzipIndexHeader.unpack(raw)
        self.header = h
        if h.magic[:7] != MAGIC[:7]:
            raise FormatError("not a gzip index (magic)", path=path, field="header.magic", value=h.magic)
        crc = crc32c_raw(raw[:CRC_SPAN])
        if crc != h.crc:
            raise ChecksumError(f"header CRC32C is {crc:#010x}", path=path, field="header.crc", value=h.crc)
        if h.major_version != MAJOR_VERSION:
            raise UnsupportedError(
                "unknown major version", path=path, field="header.major_version", value=h.major_version
            )
        if h.index_size != ENTRY_SIZE:
            raise FormatError(
                f"entry size must be {ENTRY_SIZE}", path=path, field="header.index_size", value=h.index_size
            )
        if h.dict_compress_algo not in (ALGO_NONE, ALGO_ZLIB):
            raise UnsupportedError(
                "unknown window compression",
                path=path,
                field="header.dict_compress_algo",
                value=h.dict_compress_algo,
            )
        if h.span < MIN_SPAN:
            raise FormatError(f"span below {MIN_SPAN}", path=path, field="header.span", value=h.span)
        if h.window != WINSIZE:
            raise FormatError(f"window must be {WINSIZE}", path=path, field="header.window", value=h.window)
        if h.index_file_size != size:
            raise FormatError(
                f"header says the index is {h.index_file_size} bytes but the file holds {size}",
                path=path,
                field="header.index_file_size",
                value=h.index_file_size,
            )
        if not HEADER_SIZE <= h.index_start <= size:
            raise FormatError(
                f"index area start outside [{HEADER_SIZE}, {size}]",
                path=path,
                field="header.index_start",
                value=h.index_start,
            )
        if h.index_area_len < 0 or h.index_start + h.index_area_len != size:
            raise FormatError(
                f"index_start {h.index_start} + index_area_len {h.index_area_len} != file size {size}",
                path=path,
                field="header.index_area_len",
                value=h.index_area_len,
            )
        if gzip_size is not None and h.gzip_file_size != gzip_size:
            raise FormatError(
                f"index was built for a {h.gzip_file_size}-byte gzip file, the target holds {gzip_size}",
                path=path,
                field="header.gzip_file_size",
                value=h.gzip_file_size,
            )
        if h.gzip_file_size < 0 or h.uncompress_file_size < 0:
            raise FormatError(
                "negative size", path=path, field="header.uncompress_file_size", value=h.uncompress_file_size
            )
        n = h.index_num
        table_len = n * ENTRY_SIZE
        if h.dict_compress_algo == ALGO_NONE:
            table_bound = h.index_area_len
        else:
            table_bound = min(h.index_area_len * _MAX_DEFLATE_RATIO + 64, MAX_ALLOC)
        # one entry per span mark, marks at 0, span, 2*span, ... up to the uncompressed size
        count_bound = h.uncompress_file_size // h.span + 2
        if n < 1 or n > count_bound or table_len > table_bound:
            raise FormatError(
                f"entry count must be in [1, {min(count_bound, table_bound // ENTRY_SIZE)}]",
                path=path,
                field="header.index_num",
                value=n,
            )
        area = source.read_exact(h.index_start, h.index_area_len, "index_area")
        if h.dict_compress_algo == ALGO_NONE:
            if len(area) != table_len:
                raise FormatError(
                    f"raw index area must be {table_len} bytes",
                    path=path,
                    field="header.index_area_len",
                    value=len(area),
                )
            table = area
        else:
            table = _inflate_exact(area, table_len, path=path, field="index_area")
        entries = np.frombuffer(table, dtype=ENTRY_DTYPE)
        self._check_entries(entries)
        self.entries = entries
        self.de_pos: list[int] = entries["de_pos"].tolist()
        self._windows: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, source: Source, *, gzip_size: int | None = None) -> GzipIndex:
        """Load and validate the index held by ``source`` (windows are read from it on demand)."""
        return cls(source, gzip_size=gzip_size)

    @classmethod
    def parse(cls, data: bytes, *, name: str = "<gzip index>", gzip_size: int | None = None) -> GzipIndex:
        """Load and validate an index held in memory."""
        return cls(BytesSource(data, name=name), gzip_size=gzip_size)

    def _check_entries(self, e: np.ndarray) -> None:
        h = self.header
        path = self.name

        def bad(i: int, what: str, message: str) -> FormatError:
            return FormatError(message, path=path, field=f"entry[{i}].{what}", value=int(e[what][i]))

        de, en, wp, bits, wl = e["de_pos"], e["en_pos"], e["win_pos"], e["bits"], e["win_len"]
        if de[0] != 0:
            raise bad(0, "de_pos", "first entry must start the stream (de_pos 0)")
        checks = (
            ("de_pos", (de < 0) | (de > h.uncompress_file_size), "outside the uncompressed stream"),
            ("en_pos", (en < 1) | (en > h.gzip_file_size), "outside the gzip file"),
            ("bits", bits > 7, "more than 7 leftover bits"),
            ("win_pos", (wp < HEADER_SIZE) | (wp > h.index_start), "window outside the window area"),
            ("win_len", (wl == 0) | (wl > MAX_WIN_LEN), "bad window length"),
            ("win_len", wp + wl.astype(np.int64) > h.index_start, "window runs into the index area"),
        )
        for what, mask, message in checks:
            hit = np.flatnonzero(mask)
            if hit.size:
                raise bad(int(hit[0]), what, message)
        if h.dict_compress_algo == ALGO_NONE:
            hit = np.flatnonzero(wl != WINSIZE)
            if hit.size:
                raise bad(int(hit[0]), "win_len", f"raw windows must be {WINSIZE} bytes")
        for what, col in (("de_pos", de), ("en_pos", en)):
            hit = np.flatnonzero(np.diff(col) < 0)
            if hit.size:
                raise bad(int(hit[0]) + 1, what, "entries are not sorted")

    # -- queries

    @property
    def uncompressed_size(self) -> int:
        return self.header.uncompress_file_size

    def __len__(self) -> int:
        return len(self.de_pos)

    def entry(self, i: int) -> tuple[int, int, int, int, int]:
        """Entry ``i`` as ``(de_pos, en_pos, win_pos, bits, win_len)``."""
        row = self.entries[i]
        return (
            int(row["de_pos"]),
            int(row["en_pos"]),
            int(row["win_pos"]),
            int(row["bits"]),
            int(row["win_len"]),
        )

    def find(self, offset: int) -> int:
        """Index of the entry with the largest ``de_pos <= offset`` (the last entry past the end)."""
        return max(bisect.bisect_right(self.de_pos, offset) - 1, 0)

    def window(self, i: int) -> bytes:
        """The 32 KiB of uncompressed data before entry ``i`` (cached, a few at a time)."""
        with self._lock:
            win = self._windows.get(i)
            if win is not None:
                self._windows.move_to_end(i)
                return win
        _, _, win_pos, _, win_len = self.entry(i)
        raw = self.source.read_exact(win_pos, win_len, f"entry[{i}].window")
        if self.header.dict_compress_algo == ALGO_NONE:
            win = raw
        else:
            win = _inflate_exact(raw, WINSIZE, path=self.name, field=f"entry[{i}].window")
        with self._lock:
            self._windows[i] = win
            while len(self._windows) > 8:
                self._windows.popitem(last=False)
        return win


def _inflate_exact(data: bytes, expect: int, *, path: str, field: str) -> bytes:
    """zlib-decompress ``data`` that must hold exactly one stream of exactly ``expect`` bytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, expect + 1)  # bounded: never more than one byte too many
    except zlib.error as e:
        raise FormatError(f"bad zlib data: {e}", path=path, field=field) from e
    if len(out) != expect or not d.eof:
        raise FormatError(
            f"zlib data holds {len(out)}{'' if d.eof else '+'} bytes, expected {expect}",
            path=path,
            field=field,
            value=len(out),
        )
    if d.unused_data:
        raise FormatError(
            f"{len(d.unused_data)} bytes after the zlib stream",
            path=path,
            field=field,
            value=len(d.unused_data),
        )
    return out


# -- libz through ctypes ----------------------------------------------------------------------------

Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_DATA_ERROR = -3
Z_BUF_ERROR = -5
Z_NO_FLUSH = 0
Z_BLOCK = 5
#: ``data_type`` bits reported by inflate: stopped at a block boundary / in the last block.
_AT_BOUNDARY = 0x80
_LAST_BLOCK = 0x40


class _ZStream(ctypes.Structure):
    _fields_ = (
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    )


_ZP = ctypes.POINTER(_ZStream)
_libz: ctypes.CDLL | None = None
_libz_version = b""
_libz_lock = threading.Lock()


def _lib() -> ctypes.CDLL:
    """Load the system libz once and declare the few functions used."""
    global _libz, _libz_version
    with _libz_lock:
        if _libz is not None:
            return _libz
        name = ctypes.util.find_library("z") or "libz.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise UnsupportedError(f"cannot load the system zlib ({name}): {e}") from e
        lib.zlibVersion.restype = ctypes.c_char_p
        lib.zlibVersion.argtypes = ()
        lib.inflateInit2_.restype = ctypes.c_int
        lib.inflateInit2_.argtypes = (_ZP, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
        lib.inflate.restype = ctypes.c_int
        lib.inflate.argtypes = (_ZP, ctypes.c_int)
        lib.inflateEnd.restype = ctypes.c_int
        lib.inflateEnd.argtypes = (_ZP,)
        lib.inflatePrime.restype = ctypes.c_int
        lib.inflatePrime.argtypes = (_ZP, ctypes.c_int, ctypes.c_int)
        lib.inflateSetDictionary.restype = ctypes.c_int
        lib.inflateSetDictionary.argtypes = (_ZP, ctypes.c_char_p, ctypes.c_uint)
        lib.compress2.restype = ctypes.c_int
        lib.compress2.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_ulong),
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_int,
        )
        _libz_version = lib.zlibVersion()
        _libz = lib
        return lib


def _deflate(data: bytes, level: int, capacity: int) -> bytes:
    """``deflateInit(level)`` + one ``deflate(Z_FINISH)`` into ``capacity`` bytes, as the C++ builder.

    ``compress2`` is exactly that call sequence; the output buffer size is passed through because
    zlib's stored-block path (level 0) sizes its blocks by the room left in it.
    """
    z = _lib()
    out = ctypes.create_string_buffer(capacity)
    out_len = ctypes.c_ulong(capacity)
    rc = z.compress2(out, ctypes.byref(out_len), data, len(data), level)
    if rc != Z_OK:
        raise ObdError(f"zlib compress2 failed ({rc})", field="level", value=level)
    return out.raw[: out_len.value]


class _Inflate:
    """One libz inflate stream; ``close()`` (or garbage collection) frees it."""

    def __init__(self, window_bits: int, *, path: str):
        self.z = _lib()
        self.path = path
        self.strm = _ZStream()
        self.ref = ctypes.byref(self.strm)
        self._live = False
        self.check(
            self.z.inflateInit2_(self.ref, window_bits, _libz_version, ctypes.sizeof(_ZStream)), "init"
        )
        self._live = True

    def check(self, rc: int, what: str) -> int:
        """Pass ``rc`` through unless it is an error: bad data → FormatError, anything else → ObdError."""
        if rc < 0 and rc != Z_BUF_ERROR:
            msg = self.strm.msg.decode(errors="replace") if self.strm.msg else f"zlib error {rc}"
            cls = FormatError if rc == Z_DATA_ERROR else ObdError
            raise cls(f"inflate {what} failed: {msg}", path=self.path, field="gzip data", value=rc)
        return rc

    def close(self) -> None:
        if self._live:
            self._live = False
            self.z.inflateEnd(self.ref)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


# -- reading: the decompressed stream as a Source ---------------------------------------------------

_CHUNK = 65536


class _Cursor:
    """A raw inflater positioned at uncompressed offset ``out_pos``, fed from ``gzip`` at ``in_pos``."""

    def __init__(self, gzip: Source, index: GzipIndex, i: int):
        de_pos, en_pos, _, bits, _ = index.entry(i)
        self.gzip = gzip
        self.inf = _Inflate(-15, path=gzip.name)
        strm = self.inf.strm
        try:
            if bits:
                byte = gzip.read_exact(en_pos - 1, 1, f"gzip data (entry[{i}].en_pos)")[0]
                self.inf.check(self.inf.z.inflatePrime(self.inf.ref, bits, byte >> (8 - bits)), "prime")
            window = index.window(i)
            self.inf.check(self.inf.z.inflateSetDictionary(self.inf.ref, window, WINSIZE), "set dictionary")
        except BaseException:
            self.inf.close()
            raise
        self.inbuf = ctypes.create_string_buffer(_CHUNK)
        self.inview = memoryview(self.inbuf).cast("B")
        self.in_addr = ctypes.addressof(self.inbuf)
        strm.avail_in = 0
        self.in_pos = en_pos
        self.out_pos = de_pos
        self.ended = False

    def run(self, addr: int, n: int) -> int:
        """Inflate up to ``n`` bytes to address ``addr``; fewer only at the end of the deflate stream."""
        strm = self.inf.strm
        z = self.inf.z
        strm.next_out = addr
        strm.avail_out = n
        while strm.avail_out and not self.ended:
            if strm.avail_in == 0:
                got = self.gzip.readinto(self.inview, self.in_pos)
                if got <= 0:
                    raise TruncatedError(
                        f"gzip data ends at {self.in_pos} inside the deflate stream",
                        path=self.gzip.name,
                        field="gzip data",
                    )
                self.in_pos += got
                strm.next_in = self.in_addr
                strm.avail_in = got
            rc = self.inf.check(z.inflate(self.inf.ref, Z_NO_FLUSH), "")
            if rc == Z_STREAM_END:
                self.ended = True
            elif rc == Z_NEED_DICT:
                raise FormatError(
                    "deflate stream asks for a dictionary", path=self.gzip.name, field="gzip data"
                )
            elif rc == Z_BUF_ERROR and strm.avail_in and strm.avail_out:  # pragma: no cover - no progress
                raise FormatError("inflate made no progress", path=self.gzip.name, field="gzip data")
        done = n - strm.avail_out
        self.out_pos += done
        return done

    def close(self) -> None:
        self.inf.close()


class GzipIndexedSource(Source):
    """The decompressed bytes of a gzip file, read at random through its ``ddgzidx`` index.

    ``size`` is the index's ``uncompress_file_size``. ``readinto`` restarts inflation at the
    nearest entry at or before the offset (§8.3); a few inflaters left where the last reads ended
    are kept, so sequential reads continue instead of restarting. Safe to call from many threads
    (each read owns its inflater; libz runs without the GIL).
    """

    #: Parked inflaters kept for reuse.
    POOL = 4

    def __init__(self, gzip_source: Source, index_source: Source | GzipIndex, *, name: str | None = None):
        if isinstance(index_source, GzipIndex):
            index = index_source
            if index.header.gzip_file_size != gzip_source.size:
                raise FormatError(
                    f"index was built for a {index.header.gzip_file_size}-byte gzip file, "
                    f"the target holds {gzip_source.size}",
                    path=index.name,
                    field="header.gzip_file_size",
                    value=index.header.gzip_file_size,
                )
        else:
            index = GzipIndex(index_source, gzip_size=gzip_source.size)
        self.gzip = gzip_source
        self.index = index
        self.name = name or gzip_source.name
        self.size = index.uncompressed_size
        self._pool: list[_Cursor] = []
        self._lock = threading.Lock()
        self._scratch = threading.local()

    def _take(self, offset: int) -> _Cursor:
        i = self.index.find(offset)
        start = self.index.de_pos[i]
        with self._lock:
            best = None
            for c in self._pool:
                # a parked cursor is worth reusing if it needs less skipping than a restart would
                if start - _CHUNK <= c.out_pos <= offset and (best is None or c.out_pos > best.out_pos):
                    best = c
            if best is not None:
                self._pool.remove(best)
                return best
        return _Cursor(self.gzip, self.index, i)

    def _park(self, cursor: _Cursor) -> None:
        if cursor.ended:
            cursor.close()
            return
        with self._lock:
            self._pool.append(cursor)
            while len(self._pool) > self.POOL:
                self._pool.pop(0).close()

    def _discard_buffer(self) -> tuple[ctypes.Array, int]:
        buf = getattr(self._scratch, "buf", None)
        if buf is None:
            buf = self._scratch.buf = ctypes.create_string_buffer(_CHUNK)
        return buf, ctypes.addressof(buf)

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset < 0:
            raise ObdError("negative read offset", path=self.name, field="offset", value=offset)
        if offset >= self.size or len(buf) == 0:
            return 0
        view = memoryview(buf).cast("B")
        n = min(len(view), self.size - offset)
        cursor = self._take(offset)
        try:
            _keep, skip_addr = self._discard_buffer()
            while cursor.out_pos < offset:
                k = min(_CHUNK, offset - cursor.out_pos)
                if cursor.run(skip_addr, k) < k:
                    break
            done = 0
            if cursor.out_pos == offset:
                try:
                    target = (ctypes.c_char * n).from_buffer(view)
                except TypeError:
                    target = None
                if target is not None:
                    done = cursor.run(ctypes.addressof(target), n)
                    del target
                else:  # pragma: no cover - read-only or exotic buffers
                    tmp = ctypes.create_string_buffer(n)
                    done = cursor.run(ctypes.addressof(tmp), n)
                    view[:done] = memoryview(tmp).cast("B")[:done]
            if done < n:
                raise TruncatedError(
                    f"deflate stream ends at {cursor.out_pos}, before the {self.size} bytes the index says",
                    path=self.name,
                    field="header.uncompress_file_size",
                    value=self.size,
                )
        except BaseException:
            cursor.close()
            raise
        self._park(cursor)
        return n

    def close(self) -> None:
        """Free the parked inflaters and close the gzip and index sources."""
        with self._lock:
            pool, self._pool = self._pool, []
        for c in pool:
            c.close()
        self.gzip.close()
        self.index.source.close()


def is_gzip(source: Source) -> bool:
    """True if ``source`` starts with the gzip magic ``1f 8b`` (``is_gzfile``)."""
    return source.size >= 2 and source.pread(0, 2) == b"\x1f\x8b"


def open_gzip_indexed(
    gzip_path: str | os.PathLike[str], index_path: str | os.PathLike[str]
) -> GzipIndexedSource:
    """Convenience: :class:`GzipIndexedSource` over two local files."""
    return GzipIndexedSource(FileSource(gzip_path), FileSource(index_path))


# -- building ---------------------------------------------------------------------------------------


class _Recorder:
    """Entry selection and window output, as ``IndexFilterRecorder::record`` does it."""

    def __init__(self, out: BinaryIO, header: GzipIndexHeader):
        self.out = out
        self.span = header.span
        self.algo = header.dict_compress_algo
        self.level = header.dict_compress_level
        self.win_end = HEADER_SIZE  # where the next window goes (the C++ bumps h.index_start)
        self.expected = 0
        self.last: tuple[int, int, int, bytes] | None = None
        self.entries: list[bytes] = []

    def record(self, bits: int, en_pos: int, de_pos: int, window: bytes) -> None:
        if de_pos < self.expected:
            self.last = (bits, en_pos, de_pos, window)
            return
        if de_pos > self.expected:
            if self.last is not None:
                self._add(*self.last)
            self.last = (bits, en_pos, de_pos, window)
            while self.expected < de_pos:
                self.expected += self.span
        if de_pos == self.expected:
            self.last = None
            self._add(bits, en_pos, de_pos, window)
            self.expected += self.span

    def _add(self, bits: int, en_pos: int, de_pos: int, window: bytes) -> None:
        stored = window if self.algo == ALGO_NONE else _deflate(window, self.level, MAX_WIN_LEN)
        self.out.seek(self.win_end)
        self.out.write(stored)
        self.entries.append(ENTRY_STRUCT.pack(de_pos, en_pos, self.win_end, bits, len(stored)))
        self.win_end += len(stored)


def build_gzip_index(
    gzip: str | os.PathLike[str] | Source,
    out_path: str | os.PathLike[str] | BinaryIO,
    *,
    span: int = DEFAULT_SPAN,
    level: int = DEFAULT_LEVEL,
    algo: int = ALGO_ZLIB,
) -> GzipIndexHeader:
    """Write the ``ddgzidx`` index of the first gzip member of ``gzip`` to ``out_path`` (§8.2).

    Same defaults as ``create_gz_index`` (1 MiB span, zlib level 6 windows and index area). The
    windows are written as entries are chosen, the index area after them, and the header last.
    ``out_path`` may also be a seekable binary stream positioned at 0. Returns the header written.
    """
    if algo not in (ALGO_NONE, ALGO_ZLIB):
        raise ValueError(f"algo={algo}: must be 0 (raw) or 1 (zlib)")
    if not -1 <= level <= 9:
        raise ValueError(f"level={level}: must be in [-1, 9]")
    if not MIN_SPAN <= span < 1 << 31:
        raise ValueError(f"span={span}: must be in [{MIN_SPAN}, 2**31)")
    src = gzip if isinstance(gzip, Source) else FileSource(gzip)
    owned_src = src is not gzip
    out: BinaryIO
    if isinstance(out_path, (str, os.PathLike)):
        try:
            out = open(out_path, "w+b")  # noqa: SIM115 - closed below
        except OSError as e:
            raise ObdError(f"cannot create: {e.strerror}", path=os.fspath(out_path)) from e
        owned_out = True
    else:
        out = out_path
        owned_out = False
    try:
        header = GzipIndexHeader(
            dict_compress_algo=algo, dict_compress_level=level, span=span, gzip_file_size=src.size
        )
        out.seek(0)
        out.write(bytes(HEADER_SIZE))
        recorder = _Recorder(out, header)
        uncompressed = _scan(src, recorder)
        table = b"".join(recorder.entries)
        # the C++ sizes this buffer as twice the raw table plus 4096
        area = table if algo == ALGO_NONE else _deflate(table, level, 2 * len(table) + 4096)
        index_start = recorder.win_end
        out.seek(index_start)
        out.write(area)
        header = replace(
            header,
            index_num=len(recorder.entries),
            uncompress_file_size=uncompressed,
            index_start=index_start,
            index_area_len=len(area),
            index_file_size=index_start + len(area),
        ).sealed()
        out.seek(0)
        out.write(header.pack())
        out.flush()
        return header
    finally:
        if owned_out:
            out.close()
        if owned_src:
            src.close()


def _scan(src: Source, recorder: _Recorder) -> int:
    """Inflate the first gzip member with Z_BLOCK, proposing every non-final block boundary.

    Mirrors ``build_index``: 32 KiB input reads, a 32 KiB circular output window, and a candidate
    after every inflate call that stops at a boundary. Returns the uncompressed size.
    """
    inf = _Inflate(47, path=src.name)  # 15 + 32: zlib or gzip header, parsed by inflate
    try:
        z, ref, strm = inf.z, inf.ref, inf.strm
        inbuf = ctypes.create_string_buffer(WINSIZE)
        inview = memoryview(inbuf).cast("B")
        window = ctypes.create_string_buffer(WINSIZE)
        winview = memoryview(window).cast("B")
        win_addr = ctypes.addressof(window)
        pos = 0
        strm.avail_out = 0
        while True:
            got = src.readinto(inview, pos)
            if got <= 0:
                raise TruncatedError(
                    f"gzip data ends at {pos} before the end of the deflate stream",
                    path=src.name,
                    field="gzip data",
                )
            pos += got
            strm.next_in = ctypes.addressof(inbuf)
            strm.avail_in = got
            while True:
                if strm.avail_out == 0:
                    strm.avail_out = WINSIZE
                    strm.next_out = win_addr
                rc = inf.check(z.inflate(ref, Z_BLOCK), "")
                if rc == Z_STREAM_END:
                    return strm.total_out
                if rc == Z_NEED_DICT:
                    raise FormatError("gzip stream asks for a dictionary", path=src.name, field="gzip data")
                if rc == Z_BUF_ERROR and strm.avail_in:  # pragma: no cover - cannot happen, never spin
                    raise FormatError("inflate made no progress", path=src.name, field="gzip data")
                dt = strm.data_type
                if dt & _AT_BOUNDARY and not dt & _LAST_BLOCK:
                    split = WINSIZE - strm.avail_out
                    history = bytes(winview[split:]) + bytes(winview[:split])
                    recorder.record(dt & 7, strm.total_in, strm.total_out, history)
                if strm.avail_in == 0:
                    break
    finally:
        inf.close()


__all__ = [
    "ALGO_NONE",
    "ALGO_ZLIB",
    "DEFAULT_SPAN",
    "ENTRY_DTYPE",
    "ENTRY_STRUCT",
    "HEADER_SIZE",
    "HEADER_STRUCT",
    "WINSIZE",
    "GzipIndex",
    "GzipIndexHeader",
    "GzipIndexedSource",
    "build_gzip_index",
    "is_gzip",
    "open_gzip_indexed",
]
