"""The ZFile codec table: LZ4 raw blocks (algo 1) and zstd frames (algo 2), one per block.

- **LZ4**: the LZ4 *block* format, no frame and no stored size (python-lz4 ``lz4.block`` with
  ``store_size=False``); decompressed with ``uncompressed_size`` = the block's expected length,
  which is also the allocation bound.
- **zstd**: one frame per block at level 3, with the content size, without checksum or
  dictionary. Decompression is bounded by the block size: a frame header announcing more than
  that is rejected *before* python-zstandard would allocate it.
- **MINI_LZO** (algo 0) is defined upstream but no tool writes it: :class:`UnsupportedError`.

Every codec keeps its library contexts per thread, so one codec object serves any number of
reader and writer threads. The checked entry point :meth:`Codec.decompress` turns every library
failure into a :class:`FormatError` naming the block and the file; the batch helpers used on hot
paths (:meth:`Codec.decompress_span`, :meth:`Codec.compress_region`) let library errors through so
the caller can re-run the checked path to name the block.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

import lz4.block
import numpy as np
import zstandard

from obd.errors import FormatError, UnsupportedError
from obd.zfile.format import Algorithm, algorithm_name

#: zstd level used by overlaybd's compressor (``opt.level`` is written as 0 and ignored).
ZSTD_LEVEL = 3

Buffer = bytes | bytearray | memoryview


class Codec:
    """One compression algorithm. Subclasses implement the four primitives below."""

    algorithm: Algorithm
    name: str
    #: Exceptions the library raises on bad input (caught and reported as FormatError).
    errors: tuple[type[BaseException], ...] = ()

    def compress(self, data: Buffer) -> bytes:
        """Compress one block."""
        raise NotImplementedError

    def compress_region(self, region: memoryview, block_size: int, threads: int = 1) -> Sequence[Buffer]:
        """Compress each ``block_size`` piece of ``region`` on its own (the last may be short).

        Output order equals input order, and the bytes equal one :meth:`compress` call per piece
        whatever ``threads`` is; codecs with a native multi-block API use that many threads.
        """
        comp = self.compress
        return [comp(region[p : p + block_size]) for p in range(0, len(region), block_size)]

    def decompress_span(
        self, span: memoryview, starts: np.ndarray, ends: np.ndarray, size: int
    ) -> Iterable[Buffer]:
        """Decompress the blocks ``span[starts[i]:ends[i]]``, each expected to yield ``size`` bytes.

        This is the unchecked fast path of large reads: it raises the library's own errors (see
        :attr:`errors`) or ``ValueError``, and a damaged block may come back shorter than
        ``size``, so callers check lengths (assigning into a ``size``-byte slice does). Every
        per-block step runs in C (``map`` over slices), with no Python bytecode per block.
        """
        blocks = map(span.__getitem__, map(slice, starts.tolist(), ends.tolist()))
        return map(self._decompress_one, blocks, repeat(size))

    def _decompress_one(self, data: Buffer, size: int) -> bytes:
        raise NotImplementedError

    def decompress(self, data: Buffer, size: int, *, block: int | None = None, path: object = None) -> bytes:
        """Decompress one block that must yield exactly ``size`` bytes, or raise :class:`FormatError`."""
        where = "block" if block is None else f"block {block}"
        field = "block" if block is None else f"block[{block}]"
        try:
            out = self._decompress_one(data, size)
        except FormatError as e:
            raise FormatError(f"{where}: {e.detail}", path=path, field=field) from None
        except self.errors as e:
            raise FormatError(f"{where}: {self.name} data is corrupt ({e})", path=path, field=field) from None
        if len(out) != size:
            raise FormatError(
                f"{where}: decompressed to {len(out)} bytes, expected {size}",
                path=path,
                field=field,
                value=len(out),
            )
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Lz4Codec(Codec):
    """LZ4 block format (liblz4 through python-lz4)."""

    algorithm = Algorithm.LZ4
    name = "lz4"
    errors = (lz4.block.LZ4BlockError, ValueError, MemoryError)

    def compress(self, data: Buffer) -> bytes:
        return lz4.block.compress(data, store_size=False)

    def compress_region(self, region: memoryview, block_size: int, threads: int = 1) -> Sequence[Buffer]:
        # python-lz4 has no multi-block call; it releases the GIL per call, but at 4 KiB per call
        # the GIL hand-offs cost more than a second thread gains (measured), so this is serial.
        comp = lz4.block.compress
        return [comp(region[p : p + block_size], store_size=False) for p in range(0, len(region), block_size)]

    def decompress_span(
        self, span: memoryview, starts: np.ndarray, ends: np.ndarray, size: int
    ) -> Iterable[Buffer]:
        # ``uncompressed_size`` is a capacity: liblz4 refuses to write more, so it bounds memory.
        blocks = map(span.__getitem__, map(slice, starts.tolist(), ends.tolist()))
        return map(lz4.block.decompress, blocks, repeat(size))

    def _decompress_one(self, data: Buffer, size: int) -> bytes:
        return lz4.block.decompress(data, size)


class ZstdCodec(Codec):
    """zstd, one frame per block (python-zstandard).

    Bytes after a block's frame (inside its record) are ignored, as python-zstandard's batch
    call does; overlaybd's ``ZSTD_decompress`` would reject them. No writer puts any there, the
    block CRC covers them, and the frame itself must still yield exactly the block's length.
    """

    algorithm = Algorithm.ZSTD
    name = "zstd"
    errors = (zstandard.ZstdError, ValueError, MemoryError)
    #: The C backend has the native multi-frame calls; the cffi one (PyPy) does not.
    native_batches = zstandard.backend == "cext"

    def __init__(self) -> None:
        self._local = threading.local()

    def _cctx(self) -> zstandard.ZstdCompressor:
        ctx = getattr(self._local, "cctx", None)
        if ctx is None:
            ctx = self._local.cctx = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
            )
        return ctx

    def _dctx(self) -> zstandard.ZstdDecompressor:
        ctx = getattr(self._local, "dctx", None)
        if ctx is None:
            ctx = self._local.dctx = zstandard.ZstdDecompressor()
        return ctx

    def compress(self, data: Buffer) -> bytes:
        return self._cctx().compress(data)

    def compress_region(self, region: memoryview, block_size: int, threads: int = 1) -> Sequence[Buffer]:
        n = -(-len(region) // block_size)
        if threads <= 1 or n < 2 or not self.native_batches:
            comp = self._cctx().compress
            return [comp(region[p : p + block_size]) for p in range(0, len(region), block_size)]
        # One native call, native threads, GIL released; every frame is compressed on its own,
        # so the bytes equal those of ``compress`` (checked in the tests).
        segments = np.empty((n, 2), dtype=np.uint64)
        segments[:, 0] = np.arange(n, dtype=np.uint64) * block_size
        segments[:, 1] = block_size
        segments[-1, 1] = len(region) - (n - 1) * block_size
        pieces = zstandard.BufferWithSegments(region, segments.tobytes())
        out: Any = self._cctx().multi_compress_to_buffer(pieces, threads=threads)
        return [out[i] for i in range(len(out))]

    def decompress_span(
        self, span: memoryview, starts: np.ndarray, ends: np.ndarray, size: int
    ) -> Iterable[Buffer]:
        if not self.native_batches:
            return super().decompress_span(span, starts, ends, size)
        # One native call for all frames. With ``decompressed_sizes`` given, python-zstandard
        # decompresses each frame into exactly that many bytes and fails on any other length,
        # whatever size the frame header announces (so no outsized allocation either).
        segments = np.empty((len(starts), 2), dtype=np.uint64)
        segments[:, 0] = starts
        segments[:, 1] = ends - starts
        frames = zstandard.BufferWithSegments(span, segments.tobytes())
        sizes = np.full(len(starts), size, dtype=np.uint64).tobytes()
        out: Any = self._dctx().multi_decompress_to_buffer(frames, decompressed_sizes=sizes, threads=1)
        return map(out.__getitem__, range(len(out)))

    def _decompress_one(self, data: Buffer, size: int) -> bytes:
        announced = zstandard.frame_content_size(data)
        if announced > size:
            raise FormatError(f"zstd frame announces {announced} bytes, more than the {size} expected")
        return self._dctx().decompress(data, size)


LZ4 = Lz4Codec()
ZSTD = ZstdCodec()
_CODECS: dict[int, Codec] = {Algorithm.LZ4: LZ4, Algorithm.ZSTD: ZSTD}


def get_codec(algo: int, *, path: object = None, field: str = "algo") -> Codec:
    """The codec for an ``opt.algo`` value.

    MINI_LZO → :class:`UnsupportedError` (valid, but never written and not implemented);
    an unknown id → :class:`FormatError`.
    """
    codec = _CODECS.get(algo)
    if codec is not None:
        return codec
    if algo == Algorithm.MINI_LZO:
        raise UnsupportedError("MINI_LZO compression is not supported", path=path, field=field, value=algo)
    raise FormatError(
        f"unknown compression algorithm {algorithm_name(algo)}", path=path, field=field, value=algo
    )


def codec_by_name(name: str | int | Algorithm) -> Codec:
    """``"lz4"`` / ``"zstd"`` (or an algorithm id) → codec, for writers. ValueError for anything else."""
    if isinstance(name, str):
        for codec in _CODECS.values():
            if codec.name == name.lower():
                return codec
        if name.lower() in ("mini_lzo", "minilzo", "lzo"):
            raise UnsupportedError("MINI_LZO compression is not supported", field="algorithm", value=name)
        raise ValueError(f"unknown ZFile algorithm {name!r} (expected 'lz4' or 'zstd')")
    return get_codec(int(name))


__all__ = ["LZ4", "ZSTD", "ZSTD_LEVEL", "Codec", "Lz4Codec", "ZstdCodec", "codec_by_name", "get_codec"]
