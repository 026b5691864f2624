"""zstd layers read at random: seek points at zstd frame boundaries (docs/index.md, "zstd layers").

A zstd frame can only be decoded from its start, so a zstd layer is seekable exactly where its
frames begin. An image built with several frames per layer (zstd:chunked, estargz-zstd: one frame
per file chunk) gets a *frame index*, ``zstd.meta``: for each frame, where it starts in the blob,
how many compressed bytes it holds, and where its output starts in the tar stream. A read then
fetches and decodes only the frames it touches. A layer written as one frame (what ``zstd`` and
``docker buildx --compression zstd`` make by default), or with a frame too large to decode per read,
has no useful seek point: it is fetched once and kept decompressed in the cache (not lazy), and the
builder says so.

``zstd.meta`` is obd's own file (overlaybd's turboOCI refuses zstd layers)::

    header  "OBDZSTF1", version u32 (1), frames u32, tar size u64, blob size u64     (32 bytes)
    frames  blob offset u64, compressed length u64, tar offset u64                    (24 bytes each)

all little-endian; frames are in blob order, tar offsets strictly increasing from 0, empty frames
and skippable frames left out.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from obd.errors import FormatError, ObdError, TruncatedError
from obd.io.publish import publish_bytes, publishing
from obd.io.source import FileSource, Source
from obd.verify.local import write_sidecar_table

MAGIC = b"OBDZSTF1"
VERSION = 1
HEADER_STRUCT = struct.Struct("<8sIIQQ")
FRAME_STRUCT = struct.Struct("<QQQ")
#: Frame magic numbers (RFC 8878 §3.1.1 and §3.1.2: skippable frames use 0x184D2A50..5F).
FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MASK, SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
#: A layer is read through its frames only if it has at least two and none decodes to more than
#: this: a read costs at most one frame's decode (zstd:chunked and estargz-zstd frames are ≤ 4 MiB).
MAX_SEEK_FRAME = 8 << 20
#: Decoded frames kept per layer, so reads within one frame decode it once.
FRAME_CACHE = 4
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Frame:
    """One zstd frame: blob bytes ``[offset, offset+length)`` decode to tar bytes from ``tar_offset``."""

    offset: int
    length: int
    tar_offset: int


class ZstdFrameIndex:
    """A parsed, validated ``zstd.meta`` (``data``, named ``name`` in errors)."""

    def __init__(self, data: bytes, *, name: str, blob_size: int | None = None):
        self.name = name
        if len(data) < HEADER_STRUCT.size:
            raise TruncatedError("shorter than its header", path=name, field="header", value=len(data))
        magic, version, count, tar_size, blob = HEADER_STRUCT.unpack_from(data)
        if magic != MAGIC:
            raise FormatError("not a zstd frame index", path=name, field="magic", value=magic)
        if version != VERSION:
            raise FormatError("unknown version", path=name, field="version", value=version)
        if len(data) != HEADER_STRUCT.size + count * FRAME_STRUCT.size:
            raise FormatError(f"{len(data)} bytes for {count} frames", path=name, field="frames", value=count)
        if blob_size is not None and blob != blob_size:
            raise FormatError(
                f"built for a {blob}-byte blob, the layer holds {blob_size}", path=name, field="blob size"
            )
        frames = [
            Frame(*FRAME_STRUCT.unpack_from(data, HEADER_STRUCT.size + i * FRAME_STRUCT.size))
            for i in range(count)
        ]
        prev_end, prev_tar = 0, -1
        for i, f in enumerate(frames):
            if f.offset < prev_end or f.length <= 0 or f.offset + f.length > blob:
                raise FormatError("frame outside the blob or overlapping", path=name, field=f"frames[{i}]")
            if f.tar_offset <= prev_tar or f.tar_offset >= tar_size or (i == 0 and f.tar_offset):
                raise FormatError("tar offsets not increasing from 0", path=name, field=f"frames[{i}]")
            prev_end, prev_tar = f.offset + f.length, f.tar_offset
        if not frames and tar_size:
            raise FormatError("no frames for a non-empty tar", path=name, field="frames")
        self.frames = frames
        self.tar_size = tar_size
        self.blob_size = blob
        self.starts = [f.tar_offset for f in frames]

    def frame_size(self, i: int) -> int:
        """How many tar bytes frame ``i`` decodes to."""
        end = self.starts[i + 1] if i + 1 < len(self.frames) else self.tar_size
        return end - self.starts[i]

    @property
    def largest(self) -> int:
        return max((self.frame_size(i) for i in range(len(self.frames))), default=0)

    @property
    def seekable(self) -> bool:
        """Whether reading through the frames is lazy enough to be worth it (see :data:`MAX_SEEK_FRAME`)."""
        return len(self.frames) >= 2 and self.largest <= MAX_SEEK_FRAME

    def to_bytes(self) -> bytes:
        head = HEADER_STRUCT.pack(MAGIC, VERSION, len(self.frames), self.tar_size, self.blob_size)
        return head + b"".join(FRAME_STRUCT.pack(f.offset, f.length, f.tar_offset) for f in self.frames)

    @classmethod
    def build(cls, frames: list[Frame], tar_size: int, blob_size: int, *, name: str) -> ZstdFrameIndex:
        head = HEADER_STRUCT.pack(MAGIC, VERSION, len(frames), tar_size, blob_size)
        body = b"".join(FRAME_STRUCT.pack(f.offset, f.length, f.tar_offset) for f in frames)
        return cls(head + body, name=name)


def is_frame_index(path: str | os.PathLike[str]) -> bool:
    """True if the file at ``path`` starts with the ``zstd.meta`` magic."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _frames(f: FileSource) -> Iterator[tuple[int, int, int]]:
    """``(blob offset, compressed length, decoded length)`` of each data frame of a zstd blob."""
    pos = 0
    while pos < f.size:
        head = f.read_exact(pos, 8 if f.size - pos >= 8 else 4, f"frame at {pos}")
        magic = int.from_bytes(head[:4], "little")
        if magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC:
            if len(head) < 8:
                raise TruncatedError("skippable frame header cut short", path=f.name, field=f"frame at {pos}")
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        if magic != FRAME_MAGIC:
            raise FormatError("not a zstd frame", path=f.name, field=f"frame at {pos}", value=hex(magic))
        obj = zstandard.ZstdDecompressor().decompressobj()
        start, out = pos, 0
        while not obj.eof:
            if pos >= f.size:
                raise TruncatedError("zstd frame cut short", path=f.name, field=f"frame at {start}")
            chunk = f.pread(pos, _CHUNK)
            try:
                out += len(obj.decompress(chunk))
            except zstandard.ZstdError as e:
                raise FormatError(f"bad zstd data: {e}", path=f.name, field=f"frame at {start}") from None
            pos += len(chunk)
        pos -= len(obj.unused_data)
        yield start, pos - start, out


def scan_frames(blob: str | os.PathLike[str], *, name: str | None = None) -> ZstdFrameIndex:
    """The frame index of the zstd layer blob at ``blob`` (one pass over it, decoding every frame)."""
    label = name or os.fspath(blob)
    src = FileSource(blob)
    try:
        frames = []
        tar = 0
        for offset, length, out in _frames(src):
            if out:
                frames.append(Frame(offset, length, tar))
                tar += out
        return ZstdFrameIndex.build(frames, tar, src.size, name=label)
    finally:
        src.close()


def write_frame_index(index: ZstdFrameIndex, path: str | os.PathLike[str]) -> None:
    """Publish ``index`` at ``path`` atomically."""
    publish_bytes(path, index.to_bytes())


def decompress_file(blob: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Decode the zstd blob ``blob`` (every frame) into ``out``, published atomically with its digest
    table beside it (every later read of ``out`` is checked against it); its size."""
    data = 0
    with open(blob, "rb") as fi, publishing(out) as fo:
        reader = zstandard.ZstdDecompressor().stream_reader(fi, read_across_frames=True)
        while chunk := reader.read(_CHUNK):
            fo.write(chunk)
            data += len(chunk)
    write_sidecar_table(out)
    return data


class ZstdFramedSource(Source):
    """The tar stream of a multi-frame zstd blob, read at random through its frame index.

    A read decodes each frame it touches whole (fetching its compressed bytes from ``blob``, a
    remote blob for a registry layer); the last few decoded frames are kept. Thread-safe.
    """

    def __init__(self, blob: Source, index: ZstdFrameIndex, *, name: str | None = None):
        if index.blob_size != blob.size:
            raise FormatError(
                f"frame index was built for a {index.blob_size}-byte blob, the layer holds {blob.size}",
                path=index.name,
                field="blob size",
            )
        self.blob = blob
        self.index = index
        self.name = name or blob.name
        self.size = index.tar_size
        self._frames: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _frame(self, i: int) -> bytes:
        with self._lock:
            hit = self._frames.get(i)
            if hit is not None:
                self._frames.move_to_end(i)
                return hit
        f = self.index.frames[i]
        want = self.index.frame_size(i)
        comp = self.blob.read_exact(f.offset, f.length, f"zstd frame {i}")
        try:
            data = zstandard.ZstdDecompressor().decompress(comp, max_output_size=want)
        except zstandard.ZstdError as e:
            raise FormatError(f"bad zstd frame: {e}", path=self.name, field=f"frames[{i}]") from None
        if len(data) != want:
            raise FormatError(
                f"frame decodes to {len(data)} bytes, the index says {want}",
                path=self.name,
                field=f"frames[{i}]",
            )
        with self._lock:
            self._frames[i] = data
            while len(self._frames) > FRAME_CACHE:
                self._frames.popitem(last=False)
        return data

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset < 0:
            raise ObdError("negative read offset", path=self.name, field="offset", value=offset)
        view = memoryview(buf).cast("B")
        n = min(len(view), max(0, self.size - offset))
        done = 0
        while done < n:
            pos = offset + done
            i = bisect.bisect_right(self.index.starts, pos) - 1
            data = self._frame(i)
            at = pos - self.index.starts[i]
            k = min(n - done, len(data) - at)
            view[done : done + k] = data[at : at + k]
            done += k
        return n

    def close(self) -> None:
        with self._lock:
            self._frames.clear()
        self.blob.close()


def open_seekable(blob: Source, index_path: str) -> Source:
    """The tar stream of ``blob`` through the index at ``index_path``: a zstd frame index or a gzip
    index (``ddgzidx``), told apart by magic. ``blob`` is closed on failure."""
    try:
        if is_frame_index(index_path):
            with open(index_path, "rb") as f:
                index = ZstdFrameIndex(f.read(), name=index_path, blob_size=blob.size)
            return ZstdFramedSource(blob, index)
        # lazy: the gzip index reader costs ~6 ms at start-up and only gzip targets need it
        from obd.formats.gzindex import GzipIndexedSource

        return GzipIndexedSource(blob, FileSource(index_path))
    except BaseException:
        blob.close()
        raise


__all__ = [
    "MAX_SEEK_FRAME",
    "Frame",
    "ZstdFrameIndex",
    "ZstdFramedSource",
    "decompress_file",
    "is_frame_index",
    "open_seekable",
    "scan_frames",
    "write_frame_index",
]
