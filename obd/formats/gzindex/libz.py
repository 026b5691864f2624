"""The few libz calls the gzip index needs, through :mod:`ctypes`, with checked return codes.

Python's :mod:`zlib` has no ``inflatePrime`` (resuming mid-byte at a deflate block boundary) and does
not report ``Z_BLOCK`` stops (the boundaries the builder records), so reading and building drive
the system libz directly. The builder's windows and index area go through ``compress2`` so that
with the same libz they are the bytes overlaybd writes.
"""

from __future__ import annotations

import ctypes
import threading

from obd.errors import FormatError, ObdError, UnsupportedError

Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_DATA_ERROR = -3
Z_BUF_ERROR = -5
Z_NO_FLUSH = 0
Z_BLOCK = 5
#: ``data_type`` bits reported by inflate: stopped at a block boundary / in the last block.
AT_BOUNDARY = 0x80
LAST_BLOCK = 0x40


class ZStream(ctypes.Structure):
    """zlib's ``z_stream`` (the layout of every libz build on the platforms obd runs on)."""

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


_ZP = ctypes.POINTER(ZStream)
_libz: ctypes.CDLL | None = None
_libz_version = b""
_libz_lock = threading.Lock()


def load() -> ctypes.CDLL:
    """Load the system libz once and declare the few functions used."""
    global _libz, _libz_version
    with _libz_lock:
        if _libz is not None:
            return _libz
        name = "libz.so.1"  # the soname since zlib 1.0; find_library would fork ldconfig
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


def deflate(data: bytes, level: int, capacity: int) -> bytes:
    """``deflateInit(level)`` + one ``deflate(Z_FINISH)`` into ``capacity`` bytes, as the C++ builder.

    ``compress2`` is exactly that call sequence; the output buffer size is passed through because
    zlib's stored-block path (level 0) sizes its blocks by the room left in it.
    """
    z = load()
    out = ctypes.create_string_buffer(capacity)
    out_len = ctypes.c_ulong(capacity)
    rc = z.compress2(out, ctypes.byref(out_len), data, len(data), level)
    if rc != Z_OK:
        raise ObdError(f"zlib compress2 failed ({rc})", field="level", value=level)
    return out.raw[: out_len.value]


class Inflate:
    """One libz inflate stream; ``close()`` (or garbage collection) frees it."""

    def __init__(self, window_bits: int, *, path: str):
        self.z = load()
        self.path = path
        self.strm = ZStream()
        self.ref = ctypes.byref(self.strm)
        self._live = False
        self.check(self.z.inflateInit2_(self.ref, window_bits, _libz_version, ctypes.sizeof(ZStream)), "init")
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
