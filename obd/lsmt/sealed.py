"""Read-only LSMT layers: committed, merged and close-sealed blobs (docs/formats.md §1.6, §1.13, §1.18).

Opening is two steps. :class:`~obd.lsmt.format.SealedLayout` reads the header and trailer and checks
where the index lies against the file size; :func:`read_sealed_index` then reads the index and
checks its entries: order, and (for normal layers) that every mapping points inside the data area.
On-disk tags are ignored for normal layers; warp (turboOCI) layers keep them (normalised to start
at 0) because tag 1 means "data lives in the target".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from obd.errors import FormatError
from obd.io.source import Source
from obd.lsmt.format import HT_SPACE, INVALID_OFFSET, MappingColumns, SealedLayout
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


def read_sealed_index(
    source: Source, layout: SealedLayout, *, warp: bool = False
) -> tuple[Index, IndexCounts]:
    """Read the index of a sealed blob and check every entry before it is used.

    Padding entries are dropped, then entries must be strictly ordered. A normal layer's tags are
    reset to 0 and its data mappings must lie in the data area; an index that can only be a warp
    layer's is refused with a ``targetFile`` error. A warp layer's tags are normalised to 0/1 and
    its moffsets are not checked (tag-1 mappings point into the target). Empty mappings are
    dropped last; :class:`IndexCounts` says what was on disk.
    """
    name = layout.name
    begin, end = layout.data_sectors
    cols = layout.read_entries(source)
    valid = cols.offset != INVALID_OFFSET
    n_valid = int(valid.sum())
    cols = cols.take(valid)
    if warp:
        if len(cols):
            cols.tag = cols.tag - cols.tag.min()
    else:
        if _is_warp_index(cols, end - begin):
            raise FormatError(
                "a turboOCI (warp) meta layer: its file data lives in the original layer tar; open it "
                "with its targetFile (plus gzipIndex for a .tar.gz)",
                path=name,
                field="targetFile",
            )
        cols.tag = np.zeros(len(cols), np.int64)
    index = Index(cols)
    index.check_sorted(path=name, field="index")
    if not warp:
        index.check_moffsets(begin, end, path=name, field="index")
    n_empty = int((index.length == 0).sum())
    index = index.drop_empty()
    slots = layout.index_slots
    counts = IndexCounts(slots=slots, valid=n_valid, padding=slots - n_valid, empty=n_empty)
    if warp and len(index) and int(index.tag.max()) > 1:
        raise FormatError(
            "warp layer tags must be 0 (meta) or 1 (target) after normalisation",
            path=name,
            field="index.tag",
            value=int(index.tag.max()),
        )
    return index, counts


class SealedLayer:
    """A sealed LSMT blob opened from a :class:`~obd.io.source.Source` (already unwrapped from tar/ZFile).

    ``files`` lists the sources the index's tags refer to: ``[blob]`` for a normal layer,
    ``[blob, target]`` for a warp layer. Data for tag ``t`` lives at ``moffset * 512`` in ``files[t]``.
    ``layout`` may be passed when the caller already read it from ``source``.
    """

    def __init__(
        self,
        source: Source,
        *,
        warp: bool = False,
        target: Source | None = None,
        name: str | None = None,
        blob: object = None,
        layout: SealedLayout | None = None,
    ):
        self.source = source
        self.name = name or source.name
        #: what the LSMT bytes were unwrapped from (an :class:`obd.layer.blob.Blob`), closed with the layer
        self.blob = blob
        self.warp = warp
        self.layout = layout if layout is not None else SealedLayout.read(source, self.name)
        self.header = self.layout.header
        self.trailer = self.layout.trailer
        self.index, self.counts = read_sealed_index(source, self.layout, warp=warp)
        self.files: list[Source] = [source]
        if not warp:
            return
        if target is not None:
            self.files.append(target)
        elif len(self.index) and bool((self.index.tag == 1).any()):
            raise FormatError(
                "warp (turboOCI) layer needs its target layer to read file data",
                path=self.name,
                field="targetFile",
            )

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
