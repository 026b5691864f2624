"""The ``ddgzidx`` file itself (docs/formats.md §8.1): the 333-byte header, the 29-byte entries, validation.

Layout::

    [header 333 bytes][window 0][window 1]...[window K-1][index area]

The index area is the entry table, zlib-compressed when ``dict_compress_algo`` is 1 (so are the
windows). :class:`GzipIndex` checks every field before trusting it and loads windows on demand.
Python's :mod:`zlib` is enough here: only the gzip data itself needs the system libz (``libz``).
"""

from __future__ import annotations

import bisect
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from obd.errors import ChecksumError, FormatError, TruncatedError, UnsupportedError
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
    check of docs/formats.md §8.1 is made before anything is trusted; ``gzip_size``, when given, must
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

    def has_window(self, i: int) -> bool:
        """Whether entry ``i``'s window is at hand (cached, or the index is in memory or a file)."""
        if isinstance(self.source, (BytesSource, FileSource)):
            return True
        with self._lock:
            return i in self._windows

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
