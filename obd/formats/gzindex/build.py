"""Building a ``ddgzidx`` index for a gzip file (docs/formats.md §8.2), byte for byte as overlaybd does.

The builder follows ``gzip_index_create.cpp`` call for call (same input chunks, same circular output
window, same entry selection, windows and index area through ``compress2``), so with the same libz
it writes the same bytes as overlaybd's turboOCI tools.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import replace
from typing import BinaryIO

from obd.errors import FormatError, ObdError, TruncatedError
from obd.formats.gzindex.format import (
    ALGO_NONE,
    ALGO_ZLIB,
    DEFAULT_LEVEL,
    DEFAULT_SPAN,
    ENTRY_STRUCT,
    HEADER_SIZE,
    MAX_WIN_LEN,
    MIN_SPAN,
    WINSIZE,
    GzipIndexHeader,
)
from obd.formats.gzindex.libz import (
    AT_BOUNDARY,
    LAST_BLOCK,
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_NEED_DICT,
    Z_STREAM_END,
    Inflate,
    deflate,
)
from obd.io.source import FileSource, Source


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
        stored = window if self.algo == ALGO_NONE else deflate(window, self.level, MAX_WIN_LEN)
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
        area = table if algo == ALGO_NONE else deflate(table, level, 2 * len(table) + 4096)
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
    inf = Inflate(47, path=src.name)  # 15 + 32: zlib or gzip header, parsed by inflate
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
                if dt & AT_BOUNDARY and not dt & LAST_BLOCK:
                    split = WINSIZE - strm.avail_out
                    history = bytes(winview[split:]) + bytes(winview[:split])
                    recorder.record(dt & 7, strm.total_in, strm.total_out, history)
                if strm.avail_in == 0:
                    break
    finally:
        inf.close()
