"""The system's liblz4 and libzstd decoders through :mod:`ctypes`: a run of blocks into the caller's buffer.

python-lz4 decodes one block per call (its Python overhead per 4 KiB block is larger than the
decoding) or one frame per call into a new ``bytes`` that must then be copied (and a large one is
a fresh mapping, page faults included); python-zstandard's multi-frame call returns one object
per block, each copied on its own. The C libraries write into any buffer they are given: called
here through ctypes (which releases the GIL for the call), a whole read of up to 4 MiB is decoded
with one call, into the destination itself.

- :data:`LZ4`: ``LZ4F_decompress`` of one LZ4 frame (the codec turns a run of ZFile records into
  one, see :mod:`obd.zfile.codecs`).
- :data:`LZ4_BLOCK`: ``LZ4_decompress_safe`` of one raw block, holding the GIL (small reads, see
  :class:`NativeLz4Block`).
- :data:`ZSTD`: ``ZSTD_decompressDCtx`` of concatenated zstd frames. ZFile records are
  ``frame ‖ crc32``; with each frame's content-checksum flag set, the 4 bytes after it are its
  checksum, which the context is told to skip (``ZSTD_d_forceIgnoreChecksum``, libzstd ≥ 1.4.7),
  so the run decodes as one input. The window is capped at 128 KiB (``ZSTD_d_windowLogMax``):
  a ZFile frame holds at most 64 KiB, so a frame asking for more is refused, not allocated.

Both libraries are part of every Debian system (``liblz4-1`` and ``libzstd1`` are required by
apt and systemd). Where one cannot be loaded, or lacks an entry point, its decoder is ``None`` and
the codec uses the Python package instead. Only decoders are used: what obd writes is still
compressed by python-lz4 and python-zstandard.
"""

from __future__ import annotations

import ctypes
import threading

#: The sonames (stable since 1.0 of each); no ``find_library``: it runs ldconfig, slow at start-up.
LZ4_SONAME = "liblz4.so.1"
ZSTD_SONAME = "libzstd.so.1"
#: ``LZ4F_VERSION``: the frame API version the context is made for.
_LZ4F_VERSION = 100
#: ``ZSTD_d_windowLogMax`` and ``ZSTD_d_experimentalParam3`` (``ZSTD_d_forceIgnoreChecksum``).
_ZSTD_D_WINDOW_LOG_MAX = 100
_ZSTD_D_FORCE_IGNORE_CHECKSUM = 1002
#: log2 of the largest zstd window a ZFile frame may ask for (a block is at most 64 KiB).
ZSTD_WINDOW_LOG = 17

_size_p = ctypes.POINTER(ctypes.c_size_t)


class NativeDecodeError(RuntimeError):
    """A C library rejected its input (the codecs catch RuntimeError like their packages' own errors)."""


class _Lz4Context:
    """One thread's liblz4 decompression context, freed with the thread's ``threading.local``."""

    __slots__ = ("lib", "ptr")

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.ptr: ctypes.c_void_p | None = ctypes.c_void_p()
        err = lib.LZ4F_createDecompressionContext(ctypes.byref(self.ptr), _LZ4F_VERSION)
        if lib.LZ4F_isError(err):
            raise MemoryError("liblz4 cannot create a decompression context")

    def __del__(self) -> None:
        # No module globals here: at interpreter exit they may already be gone.
        ptr, self.ptr = self.ptr, None
        if ptr:
            self.lib.LZ4F_freeDecompressionContext(ptr)


class _ZstdContext:
    """One thread's libzstd decompression context (checksums skipped, window capped)."""

    __slots__ = ("lib", "ptr")

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.ptr: int | None = lib.ZSTD_createDCtx()
        if not self.ptr:
            raise MemoryError("libzstd cannot create a decompression context")
        for param, value in ((_ZSTD_D_FORCE_IGNORE_CHECKSUM, 1), (_ZSTD_D_WINDOW_LOG_MAX, ZSTD_WINDOW_LOG)):
            if lib.ZSTD_isError(lib.ZSTD_DCtx_setParameter(self.ptr, param, value)):
                raise OSError(f"libzstd refuses decompression parameter {param}")

    def __del__(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr:
            self.lib.ZSTD_freeDCtx(ptr)


class NativeLz4:
    """``decompress_into(frame, out)`` over liblz4; one context per thread, safe to share."""

    def __init__(self, lib: ctypes.CDLL):
        lib.LZ4F_createDecompressionContext.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.LZ4F_createDecompressionContext.restype = ctypes.c_size_t
        lib.LZ4F_freeDecompressionContext.argtypes = [ctypes.c_void_p]
        lib.LZ4F_freeDecompressionContext.restype = ctypes.c_size_t
        lib.LZ4F_resetDecompressionContext.argtypes = [ctypes.c_void_p]
        lib.LZ4F_resetDecompressionContext.restype = None
        lib.LZ4F_decompress.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            _size_p,
            ctypes.c_void_p,
            _size_p,
            ctypes.c_void_p,
        ]
        lib.LZ4F_decompress.restype = ctypes.c_size_t
        lib.LZ4F_isError.argtypes = [ctypes.c_size_t]
        lib.LZ4F_isError.restype = ctypes.c_uint
        lib.LZ4F_getErrorName.argtypes = [ctypes.c_size_t]
        lib.LZ4F_getErrorName.restype = ctypes.c_char_p
        self.lib = lib
        self._local = threading.local()

    def _context(self) -> _Lz4Context:
        ctx: _Lz4Context | None = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = _Lz4Context(self.lib)
        return ctx

    def decompress_into(self, frame: memoryview, out: memoryview) -> None:
        """Decode the one complete LZ4 frame ``frame`` into exactly all of ``out``.

        Both must be writable, contiguous byte views (ctypes takes their addresses; ``frame`` is
        only read). Raises :class:`NativeDecodeError` unless the frame is valid, ends exactly at the
        end of ``frame`` and decodes to exactly ``len(out)`` bytes: liblz4 never writes past
        ``len(out)``, so a frame that would decode to more is an error, not an overflow.
        """
        lib = self.lib
        # A context that finished a frame is ready for the next one; one that failed is reset below.
        ctx = self._context().ptr
        src = (ctypes.c_char * len(frame)).from_buffer(frame)
        dst = (ctypes.c_char * len(out)).from_buffer(out)
        dst_len = ctypes.c_size_t(len(out))
        src_len = ctypes.c_size_t(len(frame))
        ret = lib.LZ4F_decompress(ctx, dst, ctypes.byref(dst_len), src, ctypes.byref(src_len), None)
        if lib.LZ4F_isError(ret):
            name = lib.LZ4F_getErrorName(ret).decode("ascii", "replace")
            lib.LZ4F_resetDecompressionContext(ctx)
            raise NativeDecodeError(f"liblz4: {name}")
        if ret or dst_len.value != len(out) or src_len.value != len(frame):
            lib.LZ4F_resetDecompressionContext(ctx)
            raise NativeDecodeError(
                f"liblz4: the frame decoded {dst_len.value} of {len(out)} bytes from "
                f"{src_len.value} of {len(frame)} ({'unfinished' if ret else 'finished'})"
            )


class NativeZstd:
    """``decompress_into(frames, out)`` over libzstd; one context per thread, safe to share."""

    def __init__(self, lib: ctypes.CDLL):
        lib.ZSTD_createDCtx.argtypes = []
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
        lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_decompressDCtx.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        self.lib = lib
        self._local = threading.local()
        self._context()  # fails here, at load, if this libzstd lacks a parameter

    def _context(self) -> _ZstdContext:
        ctx: _ZstdContext | None = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = _ZstdContext(self.lib)
        return ctx

    def decompress_into(self, frames: memoryview, out: memoryview) -> None:
        """Decode the concatenated zstd frames ``frames`` into exactly all of ``out``.

        Writable, contiguous byte views, as for :meth:`NativeLz4.decompress_into`. Every frame
        must decode to the content size its header announces (libzstd checks that); raises
        :class:`NativeDecodeError` on any error or if the frames do not fill ``out`` exactly.
        """
        lib = self.lib
        src = (ctypes.c_char * len(frames)).from_buffer(frames)
        dst = (ctypes.c_char * len(out)).from_buffer(out)
        ret = lib.ZSTD_decompressDCtx(self._context().ptr, dst, len(out), src, len(frames))
        if lib.ZSTD_isError(ret):
            raise NativeDecodeError(f"libzstd: {lib.ZSTD_getErrorName(ret).decode('ascii', 'replace')}")
        if ret != len(out):
            raise NativeDecodeError(f"libzstd: the frames decoded to {ret} bytes, expected {len(out)}")


class NativeLz4Block:
    """One raw LZ4 block by ``LZ4_decompress_safe``, *holding* the GIL, straight into the destination.

    Loaded with :class:`ctypes.PyDLL`, so the call does not release the GIL: decoding a 4 KiB block
    takes well under a microsecond, less than the hand-off a release can cost when many threads
    serve small reads (nbdkit's 16): each release is a chance for another thread to take the GIL
    and for this one to wait to get it back. There is no intermediate ``bytes`` and no copy either.
    """

    def __init__(self, lib: ctypes.PyDLL):
        fn = lib.LZ4_decompress_safe
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn
        self._at = ctypes.addressof
        self._char = ctypes.c_char

    def address(self, buf: bytearray) -> int:
        """The address of ``buf``'s bytes: valid as long as ``buf`` lives and is not resized."""
        return self._at(self._char.from_buffer(buf))

    def decompress_block_into(self, src: int, length: int, out: memoryview) -> bool:
        """Decode the ``length`` bytes at address ``src`` into ``out``; True if that yielded exactly
        ``len(out)`` bytes.

        ``out`` must be a non-empty, writable, contiguous byte view. liblz4 never reads past
        ``length`` nor writes past ``len(out)``; on False, ``out`` holds garbage and the caller
        re-runs its checked decoder to name the error.
        """
        n = len(out)
        return self._fn(src, self._at(self._char.from_buffer(out)), length, n) == n


def _load_lz4() -> NativeLz4 | None:
    try:
        return NativeLz4(ctypes.CDLL(LZ4_SONAME))
    except (OSError, AttributeError):  # no library, or one without the frame API
        return None


def _load_lz4_block() -> NativeLz4Block | None:
    try:
        return NativeLz4Block(ctypes.PyDLL(LZ4_SONAME))
    except (OSError, AttributeError):
        return None


def _load_zstd() -> NativeZstd | None:
    try:
        return NativeZstd(ctypes.CDLL(ZSTD_SONAME))
    except (OSError, AttributeError):  # no library, one without these calls, or too old (< 1.4.7)
        return None


#: The decoders, or ``None`` where the library cannot be loaded.
LZ4 = _load_lz4()
LZ4_BLOCK = _load_lz4_block()
ZSTD = _load_zstd()

__all__ = [
    "LZ4",
    "LZ4_BLOCK",
    "LZ4_SONAME",
    "ZSTD",
    "ZSTD_SONAME",
    "ZSTD_WINDOW_LOG",
    "NativeDecodeError",
    "NativeLz4",
    "NativeLz4Block",
    "NativeZstd",
]
