"""Writing sealed LSMT blobs: commit, merge and seal (docs/formats.md §1.12–§1.16).

:func:`write_sealed` is overlaybd's ``compact()``: it streams ``[header][data][index][trailer]``
strictly sequentially, so its output can go straight into a ZFile writer and a tar envelope. Data
is copied mapping by mapping; each mapping is cut into 64-sector chunks (one index entry each)
and the entry list is then compressed greedily, which is why long runs come out as 16320-sector
entries. The result is byte-identical to ``overlaybd-commit`` for the same inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from obd.errors import LayerStateError
from obd.io.source import Source
from obd.lsmt.format import (
    COMMIT_CHUNK_SECTORS,
    FLAG_SPARSE,
    FLAGS_SEALED_HEADER,
    FLAGS_SEALED_TRAILER,
    HT_SPACE,
    INDEX_PAD_ENTRIES,
    INVALID_ENTRY,
    SEAL_PAD_ENTRIES,
    SECTOR,
    TAG_SIZE,
    HeaderTrailer,
    MappingColumns,
    encode_mappings,
    format_uuid,
    is_valid_uuid,
)
from obd.lsmt.index import Mapping, compress_mappings
from obd.lsmt.rw import RWLayer

#: Data is read from the sources in pieces of at most this many bytes.
COPY_PIECE = 4 << 20


class Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


@dataclass(frozen=True)
class SealedInfo:
    """What :func:`write_sealed` wrote."""

    header: HeaderTrailer
    trailer: HeaderTrailer
    entries: int  # valid index entries
    data_bytes: int
    total_bytes: int


def encode_entries(entries: list[Mapping]) -> bytes:
    """Index bytes for a list of mapping tuples."""
    if not entries:
        return b""
    arr = np.array(entries, dtype=np.int64)
    return encode_mappings(MappingColumns(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3].astype(bool), arr[:, 4]))


def layer_info(
    virtual_size: int,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    user_tag: str | bytes = b"",
) -> HeaderTrailer:
    """The header of a sealed blob: null uuid unless a valid one is given, tag at most 256 bytes."""
    tag = user_tag.encode() if isinstance(user_tag, str) else bytes(user_tag)
    if len(tag) > TAG_SIZE:
        raise LayerStateError(f"commit message is {len(tag)} bytes; at most {TAG_SIZE} fit", field="user_tag")
    return HeaderTrailer(
        flags=FLAGS_SEALED_HEADER,
        virtual_size=virtual_size,
        uuid=format_uuid(uuid) if uuid and is_valid_uuid(uuid) else format_uuid(None),
        parent_uuid=format_uuid(parent_uuid)
        if parent_uuid and is_valid_uuid(parent_uuid)
        else format_uuid(None),
        user_tag=tag,
    )


def write_sealed(
    out: Writable,
    mappings: Iterable[Mapping],
    files: Sequence[Source],
    header: HeaderTrailer,
    *,
    pad_index: bool = True,
    keep_tag: int | None = None,
    progress: object = None,
) -> SealedInfo:
    """Stream a sealed blob for ``mappings`` (sorted; tags index ``files``) to ``out``.

    Mappings tagged ``keep_tag`` are emitted unchanged and their data is not copied (a warp
    commit's remote mappings, which keep pointing into the target). ``progress``, if given, is
    called with the number of data bytes copied so far.
    """
    header = header.with_(flags=FLAGS_SEALED_HEADER & ~FLAG_SPARSE, index_offset=0, index_size=0)
    out.write(header.pack())
    moffset = HT_SPACE // SECTOR
    raw: list[Mapping] = []
    buf = bytearray(COPY_PIECE)
    view = memoryview(buf)
    copied = 0
    for o, ln, m, z, t in mappings:
        if t == keep_tag:
            raw.append((o, ln, m, z, t))
            continue
        if z:
            raw.append((o, ln, moffset, True, t))
            continue
        src = files[t]
        done = 0
        while done < ln:
            k = min(ln - done, COPY_PIECE // SECTOR)
            piece = view[: k * SECTOR]
            got = src.readinto(piece, (m + done) * SECTOR)
            if got < len(piece):  # past the end of the source: zeros, as overlaybd's pread does
                piece[got:] = bytes(len(piece) - got)
            out.write(piece)
            c = 0
            while c < k:
                cl = min(COMMIT_CHUNK_SECTORS - ((done + c) % COMMIT_CHUNK_SECTORS), k - c)
                raw.append((o + done + c, cl, moffset, False, t))
                moffset += cl
                c += cl
            done += k
            copied += k * SECTOR
            if progress:
                progress(copied)  # type: ignore[operator]
    entries = compress_mappings(raw)
    index_offset = moffset * SECTOR
    n = len(entries)
    index_bytes = encode_entries(entries)
    pad = (-n) % INDEX_PAD_ENTRIES if pad_index else 0
    out.write(index_bytes)
    if pad:
        out.write(INVALID_ENTRY * pad)
    trailer = header.with_(flags=FLAGS_SEALED_TRAILER, index_offset=index_offset, index_size=n + pad)
    out.write(trailer.pack())
    total = index_offset + (n + pad) * 16 + HT_SPACE
    return SealedInfo(header, trailer, n, index_offset - HT_SPACE, total)


def seal_in_place(layer: RWLayer) -> HeaderTrailer:
    """``overlaybd-commit --seal``: append the index and a sealed trailer to an RW data file.

    The header at offset 0 stays as it is (0x03, or 0x13 for sparse); the trailer's ``index_size``
    counts the real entries only, while the written index is padded with zero entries to a multiple
    of 32 (overlaybd leaves that padding uninitialised). The layer is closed afterwards.
    """
    entries = [(o, ln, m, z, 0) for o, ln, m, z, _t in layer.dump()]
    layer.flush()
    fd = os.open(layer.data_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        end = -(-end // SECTOR) * SECTOR
        n = len(entries)
        index_bytes = encode_entries(entries)
        index_bytes += bytes(16 * ((-n) % SEAL_PAD_ENTRIES))
        flags = FLAGS_SEALED_TRAILER | (FLAG_SPARSE if layer.header.is_sparse else 0)
        trailer = layer.header.with_(flags=flags, index_offset=end, index_size=n)
        os.pwrite(fd, index_bytes + trailer.pack(), end)
        os.fsync(fd)
    finally:
        os.close(fd)
    layer.close()
    return trailer
