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
paths (:meth:`Codec.decompress_span`, :meth:`Codec.decompress_run`, :meth:`Codec.compress_region`)
let library errors through so the caller can re-run the checked path to name the block.

**Runs of LZ4 blocks as one frame.** python-lz4 has no multi-block call, and one call per 4 KiB
block costs more in Python overhead than the decoding itself, and releases and retakes the GIL
once per block (with several threads reading, as nbdkit's do, that hand-off dominates). A ZFile
with block CRCs stores ``block ‖ crc32 ‖ block ‖ crc32 …``; the LZ4 *frame* format (independent
blocks) stores ``header ‖ size32 ‖ block ‖ size32 ‖ block … ‖ 0``. Once the CRCs of a run are
checked, :meth:`Lz4Codec.decompress_run` overwrites each CRC with the next block's size and the
last with the end mark, puts a frame header (with the content size) in the scratch bytes in
front, and decodes the whole run with one call: liblz4's own ``LZ4F_decompress`` straight into the
destination (:mod:`obd.zfile.native`), or where that library cannot be loaded python-lz4's
``lz4.frame.decompress``, 64 KiB at a time. **zstd runs** go to libzstd as concatenated frames
(:meth:`ZstdCodec.decompress_run`, the trick is in :mod:`obd.zfile.native`), or without it to
python-zstandard's multi-frame call. The file's bytes on disk and the decoded bytes are unchanged;
only the reader's scratch copy is rewritten.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

import lz4.block
import lz4.frame
import numpy as np
import zstandard

from obd.errors import FormatError, UnsupportedError
from obd.zfile import native as _native
from obd.zfile.format import Algorithm, algorithm_name

#: zstd level used by overlaybd's compressor (``opt.level`` is written as 0 and ignored).
ZSTD_LEVEL = 3

Buffer = bytes | bytearray | memoryview

#: Bytes of the trailer after every record that :meth:`Codec.decompress_run` may overwrite (the CRC).
RUN_TRAILER = 4
#: Decoded bytes per LZ4 frame of a run: below glibc's mmap threshold (128 KiB), so the output of
#: every frame comes from (and returns to) the heap instead of fresh, page-faulting mappings.
_RUN_BYTES = 64 << 10
_ARANGE_TRAILER = np.arange(RUN_TRAILER, dtype=np.int64)


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

    def block_decoder(self) -> _native.NativeLz4Block | None:
        """A decoder of one block from a raw address into a buffer, holding the GIL (for one-block
        reads, see :class:`obd.zfile.native.NativeLz4Block`), or None where this codec has none."""
        return None

    #: Scratch bytes :meth:`decompress_run` needs in front of the first record.
    run_headroom = 0

    def decompress_run(
        self, buf: memoryview, starts: np.ndarray, ends: np.ndarray, size: int, out: memoryview
    ) -> None:
        """Decompress the contiguous records ``buf[starts[i]:ends[i]]`` into ``out`` (``size`` bytes each).

        Every record is followed by :data:`RUN_TRAILER` bytes (its CRC, already checked) that the
        next record starts after, and ``buf`` holds at least :attr:`run_headroom` bytes before
        ``starts[0]``: codecs may rewrite ``buf`` (see the module docstring), so after an error
        its contents are undefined. Unchecked like :meth:`decompress_span`: library errors and
        ``ValueError`` (a block of the wrong length) go to the caller, which redoes the blocks one
        checked block at a time. This default decodes block by block with :meth:`decompress_span`.
        """
        n = len(starts)
        slices = map(slice, range(0, n * size, size), range(size, (n + 1) * size, size))
        deque(map(out.__setitem__, slices, self.decompress_span(buf, starts, ends, size)), maxlen=0)

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
    #: python-lz4's frame calls report liblz4's errors as RuntimeError.
    errors = (lz4.block.LZ4BlockError, RuntimeError, ValueError, MemoryError)

    def compress(self, data: Buffer) -> bytes:
        return lz4.block.compress(data, store_size=False)

    def block_decoder(self) -> _native.NativeLz4Block | None:
        return _native.LZ4_BLOCK

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

    #: The frame header (15 bytes with the content size) plus the first block's size field.
    run_headroom = 15 + RUN_TRAILER

    def decompress_run(
        self, buf: memoryview, starts: np.ndarray, ends: np.ndarray, size: int, out: memoryview
    ) -> None:
        n = len(starts)
        native = _native.LZ4
        # liblz4 itself decodes the whole run into ``out``; python-lz4 returns new bytes, so its
        # frames are kept small enough to come from the heap.
        per = n if native is not None else _RUN_BYTES // size
        if per < 2:
            super().decompress_run(buf, starts, ends, size, out)
            return
        # Every trailer holds the size of the record after it, except at the end of a frame of
        # ``per`` blocks (and of the run), where it is the end mark: a zero size.
        sizes = np.zeros(n, dtype="<u4")
        sizes[:-1] = ends[1:] - starts[1:]
        sizes[per - 1 :: per] = 0
        arr = np.frombuffer(buf, dtype=np.uint8)
        arr[(ends[:, None] + _ARANGE_TRAILER).ravel()] = sizes.view(np.uint8)
        if native is not None:  # one frame: no per-frame bookkeeping (this runs once per read)
            first = int(starts[0])
            head = _lz4_frame_header(n * size, size) + int(ends[0] - starts[0]).to_bytes(
                RUN_TRAILER, "little"
            )
            buf[first - len(head) : first] = head
            native.decompress_into(buf[first - len(head) : int(ends[-1]) + RUN_TRAILER], out[: n * size])
            return
        lasts = np.minimum(np.arange(per - 1, n + per - 1, per), n - 1)
        firsts = starts[::per].tolist()
        lengths = (ends[::per] - starts[::per]).tolist()
        stops = (ends[lasts] + RUN_TRAILER).tolist()
        full = _lz4_frame_header(per * size, size)
        hl = len(full) + RUN_TRAILER
        decompress = lz4.frame.decompress
        pos = 0
        for first, length, stop in zip(firsts, lengths, stops, strict=True):
            want = min(per * size, n * size - pos)
            head = full if want == per * size else _lz4_frame_header(want, size)
            # The frame's header and first size go in front of its first record: over the headroom,
            # or over the end of the frame before, which is decoded by now.
            buf[first - hl : first] = head + length.to_bytes(RUN_TRAILER, "little")
            data = decompress(buf[first - hl : stop])
            if len(data) != want:
                raise ValueError(f"a frame of {want // size} blocks decompressed to {len(data)} bytes")
            out[pos : pos + want] = data
            pos += want

    def _decompress_one(self, data: Buffer, size: int) -> bytes:
        return lz4.block.decompress(data, size)


@functools.lru_cache(maxsize=64)
def _lz4_frame_header(content_size: int, block_size: int) -> bytes:
    """An LZ4 frame header for independent blocks of up to ``block_size`` bytes, with the content size.

    The maximum block size must hold the largest *compressed* block, or liblz4 rejects it: 64 KB
    covers LZ4's bound for blocks up to 32 KiB, 256 KB the 64 KiB ones. Made by python-lz4 itself
    (``compress_begin``), so the header checksum is liblz4's.
    """
    max_block = lz4.frame.BLOCKSIZE_MAX64KB if block_size <= 32 << 10 else lz4.frame.BLOCKSIZE_MAX256KB
    head = lz4.frame.compress_begin(
        lz4.frame.create_compression_context(),
        source_size=content_size,
        block_size=max_block,
        block_linked=False,
        content_checksum=False,
        auto_flush=True,
    )
    return bytes(head)


class ZstdCodec(Codec):
    """zstd, one frame per block (python-zstandard).

    Bytes after a block's frame (inside its record) are ignored, as python-zstandard's batch
    call does; overlaybd's ``ZSTD_decompress`` would reject them. No writer puts any there, the
    block CRC covers them, and the frame itself must still yield exactly the block's length.
    """

    algorithm = Algorithm.ZSTD
    name = "zstd"
    #: The native decoder (obd.zfile.native) reports libzstd's errors as RuntimeError.
    errors = (zstandard.ZstdError, RuntimeError, ValueError, MemoryError)
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

    def decompress_run(
        self, buf: memoryview, starts: np.ndarray, ends: np.ndarray, size: int, out: memoryview
    ) -> None:
        native = _native.ZSTD
        if native is None:
            super().decompress_run(buf, starts, ends, size, out)
            return
        # Each frame's content-checksum flag set: its CRC trailer then reads as its checksum, which
        # the native context skips, and the run is one input of concatenated frames. Only plain
        # zstd frames (magic, no checksum of their own) are taken.
        arr = np.frombuffer(buf, dtype=np.uint8)
        magic = arr[(starts[:, None] + _ARANGE_TRAILER).ravel()].reshape(-1, RUN_TRAILER)
        desc = starts + _ZSTD_DESCRIPTOR
        flags = arr[desc]
        if not (magic == _ZSTD_MAGIC).all() or (flags & _ZSTD_CHECKSUM_FLAG).any():
            super().decompress_run(buf, starts, ends, size, out)
            return
        arr[desc] = flags | _ZSTD_CHECKSUM_FLAG
        native.decompress_into(buf[int(starts[0]) : int(ends[-1]) + RUN_TRAILER], out[: len(starts) * size])

    def _decompress_one(self, data: Buffer, size: int) -> bytes:
        announced = zstandard.frame_content_size(data)
        if announced > size:
            raise FormatError(f"zstd frame announces {announced} bytes, more than the {size} expected")
        return self._dctx().decompress(data, size)


#: A zstd frame's magic number, the offset of its header descriptor and the descriptor's checksum bit.
_ZSTD_MAGIC = np.frombuffer((0xFD2FB528).to_bytes(4, "little"), dtype=np.uint8)
_ZSTD_DESCRIPTOR = 4
_ZSTD_CHECKSUM_FLAG = 0x04

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


__all__ = [
    "LZ4",
    "RUN_TRAILER",
    "ZSTD",
    "ZSTD_LEVEL",
    "Codec",
    "Lz4Codec",
    "ZstdCodec",
    "codec_by_name",
    "get_codec",
]
