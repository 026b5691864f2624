"""Writing ZFiles: a streaming :class:`ZFileWriter` and whole-file helpers.

The layout is exactly what overlaybd's ``ZFileBuilder`` writes (docs/formats.md §2.8): a 0x13 header
with zero index fields, then each ``block_size`` piece of the input compressed on its own (plus
its raw CRC32C, seed 100007, when ``verify``), the uint32 index of record lengths, and a 0x16
trailer. With ``overwrite_header`` the header is rewritten at the end with the trailer's fields
and flags 0x1B (what ``overlaybd-commit -z`` does); that needs a seekable stream, otherwise the
stream may be a pipe or a socket. An empty input gives the 1024-byte header + trailer file.

Blocks are cut at ``block_size`` however the caller slices its writes, and compressed in batches.
zstd batches go to python-zstandard's native multi-frame call, which spreads them over
``threads`` native threads without the GIL. LZ4 is compressed serially: python-lz4 releases the
GIL per call, but at 4 KiB per call the GIL hand-offs between Python threads cost more than the
second core gains (measured: 1,130 MB/s on one thread, 930 MB/s on two), and one thread already
beats overlaybd's own compressor. Every block is compressed independently, so the output bytes
and their order do not depend on the thread count.

**LZ4 byte-identity.** python-lz4 bundles liblz4 1.9.4, whose compressor picks different matches
than the lz4 1.8.3 bundled with overlaybd in a small fraction of blocks (26 of 17,463 blocks of
fixture F2, 157 of 132,309 of F1; docs/formats.md §2.7). Such files are valid and read back identically
everywhere, but are not byte-for-byte what ``overlaybd-zfile`` makes; the header, trailer fields
(except ``index_crc`` and the digests) and layout rules are the same. zstd frames come from the
libzstd python-zstandard ships and may differ from overlaybd's system libzstd in the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import repeat
from typing import BinaryIO, cast

import numpy as np

from obd.errors import LayerStateError, ObdError
from obd.formats.crc import ZFILE_BLOCK_SEED, crc32c_raw
from obd.io.publish import publishing
from obd.io.source import FileSource
from obd.zfile.codecs import Buffer, codec_by_name
from obd.zfile.format import (
    DEFAULT_BLOCK_SIZE,
    FLAGS_HEADER,
    FLAGS_HEADER_OVERWRITTEN,
    FLAGS_TRAILER,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    Algorithm,
    ZFileRecord,
    is_power_of_two,
)
from obd.zfile.reader import ZFileReader

#: Input compressed per batch (small writes are gathered until this much is pending).
BATCH_BYTES = 1 << 20
#: The same for zstd with several threads.
ZSTD_BATCH_BYTES = 8 << 20
#: Chunk size of :func:`compress_file` / :func:`decompress_file`.
IO_CHUNK = 4 << 20


def default_threads() -> int:
    """Compression threads used when none are given: the CPUs we may run on, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class ZFileWriter:
    """Compress a byte stream into a ZFile written to ``stream``.

    ``write(data)`` accepts any slicing of the input; ``close()`` writes the index and trailer
    (and the rewritten header) and returns the trailer record. The stream is not closed. Use as
    a context manager to close on success; on an exception the file is left unfinished.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        algorithm: str | int | Algorithm = "lz4",
        block_size: int = DEFAULT_BLOCK_SIZE,
        verify: bool = True,
        overwrite_header: bool = False,
        threads: int | None = None,
    ):
        self.codec = codec_by_name(algorithm)
        if not is_power_of_two(block_size) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(
                f"block_size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, "
                f"got {block_size}"
            )
        self.block_size = block_size
        self.verify = bool(verify)
        self.overwrite_header = bool(overwrite_header)
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._stream = stream
        self._start = 0
        if self.overwrite_header:
            if not (hasattr(stream, "seekable") and stream.seekable()):
                raise ValueError("overwrite_header needs a seekable stream")
            self._start = stream.tell()
        # zstd compresses a batch with native threads in one call; bigger batches amortise the
        # thread start-up of that call. lz4 compresses serially (see codecs.Lz4Codec).
        parallel = self.threads > 1 and self.codec.algorithm == Algorithm.ZSTD
        self._batch = ZSTD_BATCH_BYTES if parallel else BATCH_BYTES
        self._pending = bytearray()
        self._lengths: list[np.ndarray] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.block_count = 0
        self.trailer: ZFileRecord | None = None
        self._closed = False
        self.header = ZFileRecord(
            flags=FLAGS_HEADER, block_size=block_size, algorithm=self.codec.algorithm, verify=int(self.verify)
        ).sealed_copy()
        self._emit(self.header.pack())

    # -- output --------------------------------------------------------------------------------

    def _emit(self, data: Buffer) -> None:
        self._stream.write(data)
        self.bytes_out += len(data)

    def _compress(self, region: memoryview) -> None:
        """Compress and write ``region``: whole blocks, except at close where the last may be short."""
        bs = self.block_size
        for a in range(0, len(region), self._batch):
            piece = region[a : a + self._batch]
            comps = self.codec.compress_region(piece, bs, self.threads)
            lengths = np.fromiter(map(len, comps), dtype=np.uint32, count=len(comps))
            if self.verify:
                crcs = np.fromiter(
                    map(crc32c_raw, comps, repeat(ZFILE_BLOCK_SEED)), dtype="<u4", count=len(comps)
                )
                cv = memoryview(crcs.tobytes())
                parts: list[Buffer] = [b""] * (2 * len(comps))
                parts[0::2] = comps
                parts[1::2] = [cv[i : i + 4] for i in range(0, 4 * len(comps), 4)]
                lengths += np.uint32(4)
            else:
                parts = list(comps)
            self._emit(b"".join(parts))
            self._lengths.append(lengths)
            self.block_count += len(lengths)

    # -- public API ----------------------------------------------------------------------------

    def write(self, data: Buffer) -> int:
        """Append ``data`` to the original stream; returns ``len(data)``."""
        if self._closed:
            raise LayerStateError("write to a closed ZFileWriter")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        n = len(mv)
        self.bytes_in += n
        bs = self.block_size
        batch_bytes = self._batch
        if self._pending:
            take = min(n, batch_bytes - len(self._pending))
            self._pending += mv[:take]
            mv = mv[take:]
            if len(self._pending) < batch_bytes:
                return n
            batch, self._pending = self._pending, bytearray()
            self._compress(memoryview(batch))
        if len(mv) >= batch_bytes:
            full = len(mv) - len(mv) % bs
            self._compress(mv[:full])
            mv = mv[full:]
        if len(mv):
            self._pending += mv
        return n

    def close(self) -> ZFileRecord:
        """Flush the last blocks, write index and trailer (and the header rewrite); return the trailer."""
        if self._closed:
            if self.trailer is None:
                raise LayerStateError("ZFileWriter was aborted")
            return self.trailer
        self._closed = True
        try:
            if self._pending:
                batch, self._pending = self._pending, bytearray()
                self._compress(memoryview(batch))
            index = (np.concatenate(self._lengths) if self._lengths else np.empty(0, np.uint32)).astype("<u4")
            index_bytes = index.tobytes()
            index_offset = self.bytes_out
            self._emit(index_bytes)
            fields = {
                "index_offset": index_offset,
                "index_size": len(index),
                "original_file_size": self.bytes_in,
                "index_crc": crc32c_raw(index_bytes),
            }
            self.trailer = self.header.sealed_copy(flags=FLAGS_TRAILER, **fields)
            self._emit(self.trailer.pack())
            if self.overwrite_header:
                end = self._stream.tell()
                self.header = self.header.sealed_copy(flags=FLAGS_HEADER_OVERWRITTEN, **fields)
                self._stream.seek(self._start)
                self._stream.write(self.header.pack())
                self._stream.seek(end)
            return self.trailer
        except BaseException:
            self.trailer = None
            raise

    def abort(self) -> None:
        """Stop without writing index or trailer (the output is left incomplete)."""
        self._closed = True
        self._pending = bytearray()

    def __enter__(self) -> ZFileWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _publish(dst_path: str | os.PathLike[str], fill: Callable[[BinaryIO], None]) -> None:
    """Write ``dst_path`` atomically and durably (:func:`obd.io.publish.publishing`), mode 0644
    whatever the umask, as ZFile outputs have always been."""
    with publishing(dst_path) as out:
        os.fchmod(out.fileno(), 0o644)
        fill(cast(BinaryIO, out))


def compress_file(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    *,
    algorithm: str | int | Algorithm = "lz4",
    block_size: int = DEFAULT_BLOCK_SIZE,
    verify: bool = True,
    overwrite_header: bool = False,
    threads: int | None = None,
) -> ZFileRecord:
    """Compress the file ``src_path`` into the ZFile ``dst_path`` (streamed; returns the trailer).

    The defaults match ``overlaybd-zfile`` (lz4, 4 KiB, verify, header not rewritten).
    """
    result: list[ZFileRecord] = []

    def fill(out: BinaryIO) -> None:
        buf = bytearray(IO_CHUNK)
        mv = memoryview(buf)
        with open(src_path, "rb", buffering=0) as src:
            writer = ZFileWriter(
                out,
                algorithm=algorithm,
                block_size=block_size,
                verify=verify,
                overwrite_header=overwrite_header,
                threads=threads,
            )
            try:
                while True:
                    n = src.readinto(mv)
                    if not n:
                        break
                    writer.write(mv[:n])
            except BaseException:
                writer.abort()
                raise
            result.append(writer.close())

    try:
        _publish(dst_path, fill)
    except OSError as e:
        raise ObdError(f"cannot compress: {e.strerror or e}", path=e.filename or os.fspath(src_path)) from e
    return result[0]


def decompress_file(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]) -> int:
    """Write the original bytes of the ZFile ``src_path`` to ``dst_path``; returns their count."""
    source = FileSource(src_path)
    try:
        reader = ZFileReader(source)

        def fill(out: BinaryIO) -> None:
            buf = bytearray(min(IO_CHUNK, max(reader.size, 1)))
            mv = memoryview(buf)
            pos = 0
            while pos < reader.size:
                n = reader.readinto(mv, pos)
                out.write(mv[:n])
                pos += n

        try:
            _publish(dst_path, fill)
        except OSError as e:
            raise ObdError(f"cannot write: {e.strerror or e}", path=e.filename or os.fspath(dst_path)) from e
        return reader.size
    finally:
        source.close()


__all__ = [
    "BATCH_BYTES",
    "ZSTD_BATCH_BYTES",
    "ZFileWriter",
    "compress_file",
    "decompress_file",
    "default_threads",
]
