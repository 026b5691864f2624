"""turboOCI's gzip index ("ddgzidx", ``gzip.meta``): random access into a gzip layer (docs/formats.md §8).

A turboOCI warp layer maps file data into the *uncompressed* tar stream of the original OCI layer.
For a gzip layer that stream is reached through this index, a zran-style list of restart points:
each entry names a deflate block boundary (``de_pos`` uncompressed, ``en_pos`` the first whole
compressed byte after it, ``bits`` still unread in the byte before) and the 32 KiB of output before
it (the window).

The package is split by concern: :mod:`.format` (the file: header, entries, validation, windows),
:mod:`.libz` (the system libz through ctypes, for ``inflatePrime`` and ``Z_BLOCK``), :mod:`.source`
(:class:`GzipIndexedSource`, the seekable decompressed stream) and :mod:`.build` (the builder,
byte-compatible with overlaybd's). The names below are the public API.
"""

from obd.formats.gzindex.build import build_gzip_index
from obd.formats.gzindex.format import (
    ALGO_NONE,
    ALGO_ZLIB,
    DEFAULT_SPAN,
    ENTRY_DTYPE,
    ENTRY_STRUCT,
    HEADER_SIZE,
    HEADER_STRUCT,
    WINSIZE,
    GzipIndex,
    GzipIndexHeader,
)
from obd.formats.gzindex.source import GzipIndexedSource, is_gzip, open_gzip_indexed

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
