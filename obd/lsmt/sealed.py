"""Read-only LSMT layers: committed, merged and close-sealed blobs (FORMATS.md §1.6, §1.13, §1.18).

Layout: ``[header 4096][data …][index: index_size × 16][trailer 4096]``. overlaybd's loader trusts
only the header's magic and type bits; every other field comes from the trailer. The index is
validated before use: its size against the file, entry order, and (for normal layers) that every
mapping points inside the data area. On-disk tags are ignored for normal layers; warp (turboOCI)
layers keep them (normalised to start at 0) because tag 1 means "data lives in the target".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from obd.errors import FormatError, TruncatedError
from obd.io.source import Source
from obd.lsmt.format import (
    HT_SPACE,
    INVALID_OFFSET,
    MAGIC0,
    MAX_OFFSET,
    MAX_RO_INDEX_SIZE,
    SECTOR,
    HeaderTrailer,
    MappingColumns,
    decode_mappings,
)
from obd.lsmt.index import Index


@dataclass(frozen=True)
class IndexCounts:
    """What the on-disk index held before padding was dropped (for inspectors)."""

    slots: int
    valid: int
    padding: int
    empty: int


def _is_warp_index(cols: MappingColumns, data_sectors: int) -> bool:
    """True if a sealed index can only be a committed warp layer's.

    A commit (or merge) copies every data mapping into the blob, so the data mappings' lengths add
    up to the data area exactly. A warp commit copies only its fs-meta (tag 0) mappings: its
    index has data mappings tagged 1 whose sectors are *not* in the blob, while the tag-0 ones
    alone fill the data area. (Normal layers ignore tags; merged blobs carry several, but all of
    their data is in the blob.)
    """
    if not len(cols):
        return False
    rel = cols.tag - cols.tag.min()
    data = ~cols.zeroed
    remote = data & (rel == 1) & (cols.length > 0)
    if int(rel.max()) > 1 or not remote.any():
        return False
    return int(cols.length[data & (rel == 0)].sum()) == data_sectors


class SealedLayer:
    """A sealed LSMT blob opened from a :class:`~obd.io.source.Source` (already unwrapped from tar/ZFile).

    ``files`` lists the sources the index's tags refer to: ``[blob]`` for a normal layer,
    ``[blob, target]`` for a warp layer. Data for tag ``t`` lives at ``moffset * 512`` in ``files[t]``.
    """

    def __init__(
        self,
        source: Source,
        *,
        warp: bool = False,
        target: Source | None = None,
        name: str | None = None,
        blob: object = None,
    ):
        self.source = source
        self.name = name or source.name
        #: what the LSMT bytes were unwrapped from (an :class:`obd.layer.blob.Blob`), closed with the layer
        self.blob = blob
        self.warp = warp
        size = source.size
        if size < HT_SPACE:
            raise TruncatedError(
                f"file is {size} bytes, shorter than the {HT_SPACE}-byte LSMT header",
                path=self.name,
                field="size",
            )
        self.header = HeaderTrailer.parse(
            source.read_exact(0, HT_SPACE, "header"), path=self.name, what="header"
        )
        if not self.header.is_header:
            raise FormatError(
                "record at offset 0 is not a header",
                path=self.name,
                field="header.flags",
                value=self.header.flags,
            )
        if not self.header.is_data:
            raise FormatError(
                "not an LSMT data file (an RW index file?)",
                path=self.name,
                field="header.flags",
                value=self.header.flags,
            )
        trailer_offset = size - HT_SPACE
        raw_trailer = source.read_exact(trailer_offset, HT_SPACE, "trailer") if size >= 2 * HT_SPACE else b""
        if raw_trailer[:8] != MAGIC0 and not self.header.is_sealed:
            raise FormatError(
                "an RW data file that was never committed or sealed (no trailer); commit it with "
                "`obd commit`, or stack it as an upper layer",
                path=self.name,
                field="trailer",
            )
        if size < 2 * HT_SPACE:
            raise TruncatedError(
                f"file is {size} bytes; a sealed LSMT layer needs at least {2 * HT_SPACE}",
                path=self.name,
                field="size",
            )
        self.trailer = HeaderTrailer.parse(raw_trailer, path=self.name, what="trailer")
        t = self.trailer
        if t.is_header or not t.is_data or not t.is_sealed:
            raise FormatError(
                "the last 4096 bytes are not a sealed data trailer (an RW data file never committed?)",
                path=self.name,
                field="trailer.flags",
                value=t.flags,
            )
        if t.virtual_size > MAX_OFFSET * SECTOR:
            raise FormatError(
                f"larger than the {MAX_OFFSET * SECTOR} bytes an LSMT index can address",
                path=self.name,
                field="trailer.virtual_size",
                value=t.virtual_size,
            )
        if t.index_size > MAX_RO_INDEX_SIZE:
            raise FormatError(
                f"more than the {MAX_RO_INDEX_SIZE} entries a sealed layer may hold",
                path=self.name,
                field="trailer.index_size",
                value=t.index_size,
            )
        if t.index_offset < HT_SPACE or t.index_offset % SECTOR:
            raise FormatError(
                "index must start at or after byte 4096, on a 512-byte boundary",
                path=self.name,
                field="trailer.index_offset",
                value=t.index_offset,
            )
        if t.index_offset > trailer_offset or t.index_size * 16 > trailer_offset - t.index_offset:
            raise FormatError(
                f"index of {t.index_size} entries at {t.index_offset} does not fit before the trailer "
                f"at {trailer_offset}",
                path=self.name,
                field="trailer.index_offset",
                value=t.index_offset,
            )
        raw = source.read_exact(t.index_offset, t.index_size * 16, "index")
        cols = decode_mappings(raw)
        valid = cols.offset != INVALID_OFFSET
        n_valid = int(valid.sum())
        cols = cols.take(valid)
        if warp:
            if len(cols):
                cols.tag = cols.tag - cols.tag.min()
        else:
            if _is_warp_index(cols, t.index_offset // SECTOR - HT_SPACE // SECTOR):
                raise FormatError(
                    "a turboOCI (warp) meta layer: its file data lives in the original layer tar; open it "
                    "with its targetFile (plus gzipIndex for a .tar.gz)",
                    path=self.name,
                    field="targetFile",
                )
            cols.tag = np.zeros(len(cols), np.int64)
        index = Index(cols)
        index.check_sorted(path=self.name, field="index")
        if not warp:
            index.check_moffsets(HT_SPACE // SECTOR, t.index_offset // SECTOR, path=self.name, field="index")
        n_empty = int((index.length == 0).sum())
        self.index = index.drop_empty()
        self.counts = IndexCounts(
            slots=t.index_size, valid=n_valid, padding=t.index_size - n_valid, empty=n_empty
        )
        self.files: list[Source] = [source]
        if warp:
            if len(self.index) and int(self.index.tag.max()) > 1:
                raise FormatError(
                    "warp layer tags must be 0 (meta) or 1 (target) after normalisation",
                    path=self.name,
                    field="index.tag",
                    value=int(self.index.tag.max()),
                )
            if target is None:
                if len(self.index) and bool((self.index.tag == 1).any()):
                    raise FormatError(
                        "warp (turboOCI) layer needs its target layer to read file data",
                        path=self.name,
                        field="targetFile",
                    )
            else:
                self.files.append(target)

    @property
    def virtual_size(self) -> int:
        return self.trailer.virtual_size

    @property
    def uuid(self) -> str:
        return self.trailer.uuid

    @property
    def parent_uuid(self) -> str:
        return self.trailer.parent_uuid

    @property
    def user_tag(self) -> str:
        return self.trailer.tag_text

    @property
    def data_bytes(self) -> int:
        """Bytes between the header and the index (live data plus garbage)."""
        return self.trailer.index_offset - HT_SPACE

    def close(self) -> None:
        for f in self.files:
            f.close()
        if self.blob is not None:
            self.blob.close()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<SealedLayer {self.name!r} vsize={self.virtual_size} entries={len(self.index)}>"
