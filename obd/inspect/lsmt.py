"""Describers of LSMT files: classifying what an LSMT header starts, and sealed (read-only) layers.

A sealed layer is described by its records, identity, index slot counts, device coverage, garbage in
its data area and fragmentation; turboOCI (warp) layers are recognised and opened without their
target, since inspection never reads data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from obd.errors import FormatError, TruncatedError
from obd.inspect.stats import DATA_BEGIN, coverage, fragmentation, looks_turbooci, referenced_sectors
from obd.io.source import BytesSource, Source
from obd.layer.blob import Blob
from obd.lsmt.format import (
    HT_SPACE,
    INVALID_OFFSET,
    MAGIC0,
    NULL_UUID,
    SECTOR,
    HeaderTrailer,
    MappingColumns,
    decode_mappings,
)
from obd.lsmt.sealed import SealedLayer

#: What each ``lsmt.variant`` value means (the one-line description and the text report).
VARIANT_TEXT = {
    "commit": "committed (overlaybd-commit / overlaybd-merge)",
    "close-sealed": "close-sealed RW data file (overlaybd-commit --seal)",
    "turbooci": "turboOCI (warp) meta layer; tag-1 mappings point into the original OCI layer tar",
}


def describe_lsmt_record(ht: HeaderTrailer) -> dict[str, Any]:
    """An LSMT header or trailer record as a dict (flags decoded by name)."""
    out = ht.to_dict()
    out["reserved"] = ht.reserved
    return out


def classify_lsmt(source: Source, path: str) -> tuple[str, HeaderTrailer]:
    """``"layer"``, ``"rw-data"`` or ``"rw-index"`` for bytes that start with the LSMT magic."""
    if source.size < HT_SPACE:
        raise TruncatedError(
            f"file is {source.size} bytes, shorter than the {HT_SPACE}-byte LSMT header",
            path=path,
            field="header",
        )
    header = HeaderTrailer.parse(source.read_exact(0, HT_SPACE, "header"), path=path)
    if not header.is_header:
        raise FormatError(
            "the record at offset 0 is a trailer, not a header",
            path=path,
            field="header.flags",
            value=header.flags,
        )
    if not header.is_data:
        return "rw-index", header
    if header.is_sealed or (
        source.size >= 2 * HT_SPACE and source.pread(source.size - HT_SPACE, len(MAGIC0)) == MAGIC0
    ):
        return "layer", header
    return "rw-data", header


def _raw_index(source: Source, trailer: HeaderTrailer) -> MappingColumns:
    """The valid, non-empty on-disk entries in file order, tags as stored (the trailer is validated)."""
    cols = decode_mappings(source.read_exact(trailer.index_offset, trailer.index_size * 16, "index"))
    return cols.take((cols.offset != INVALID_OFFSET) & (cols.length > 0))


def open_sealed(source: Source, name: str, blob: Blob | None = None) -> tuple[SealedLayer, bool]:
    """Open a sealed layer for inspection; returns it and whether it is a turboOCI (warp) layer.

    A warp layer's remote mappings point into a target tar that is not given here: the normal loader
    either recognises it (``targetFile`` error) or rejects its remote mappings as outside the data
    area (``…moffset`` error). Such a layer is reopened as warp with an empty stand-in target, since
    inspection never reads data.
    """
    try:
        layer = SealedLayer(source, name=name)
    except FormatError as e:
        fld = e.field or ""
        if fld != "targetFile" and not fld.endswith(".moffset"):
            raise
        if fld != "targetFile":
            raw_trailer = source.read_exact(source.size - HT_SPACE, HT_SPACE, "trailer")
            if not looks_turbooci(_raw_index(source, HeaderTrailer.parse(raw_trailer, path=name))):
                raise
        layer = SealedLayer(source, name=name, warp=True, target=BytesSource(b"", name="<no target>"))
        layer.blob = blob
        return layer, True
    layer.blob = blob
    return layer, looks_turbooci(_raw_index(source, layer.trailer))


def describe_sealed(layer: SealedLayer, warp: bool | None = None) -> tuple[dict[str, Any], list[str]]:
    """A read-only LSMT layer: records, identity, index counts, device coverage, garbage, fragmentation."""
    warnings: list[str] = []
    h, t = layer.header, layer.trailer
    raw = _raw_index(layer.source, t)
    warp = layer.warp if warp is None else warp
    tags_on_disk = sorted(int(x) for x in np.unique(raw.tag))
    if warp:
        variant = "turbooci"
    elif h.is_sealed:
        variant = "commit"
    else:
        variant = "close-sealed"
    idx = layer.index
    vsize = t.virtual_size
    extent = vsize or (int(idx.end.max()) * SECTOR if len(idx) else 0)
    data = ~raw.zeroed
    remote = np.zeros(len(raw), dtype=bool)
    if warp:
        remote = data & ((raw.tag - raw.tag.min()) == 1)
    local = data & ~remote
    area_end = t.index_offset // SECTOR
    live = referenced_sectors(raw.moffset[local], raw.length[local], DATA_BEGIN, area_end) * SECTOR
    area = layer.data_bytes
    out = {
        "variant": variant,
        "header": describe_lsmt_record(h),
        "trailer": describe_lsmt_record(t),
        "uuid": t.uuid,
        "parent_uuid": t.parent_uuid,
        "virtual_size": vsize,
        "user_tag": t.tag_text,
        "version": t.version,
        "sub_version": t.sub_version,
        "warp": bool(warp),
        "index": {
            "offset": t.index_offset,
            "slots": layer.counts.slots,
            "valid": layer.counts.valid,
            "padding": layer.counts.padding,
            "empty": layer.counts.empty,
            "entries": len(idx),
            "tags_on_disk": tags_on_disk,
        },
        "space": {"size": extent, **coverage(idx.offset, idx.length, idx.zeroed, extent)},
        "storage": {
            "data_area_bytes": area,
            "live_data_bytes": live,
            "garbage_bytes": area - live,
            "remote_bytes": int(raw.length[remote].sum()) * SECTOR,
        },
        "fragmentation": fragmentation(idx.offset, idx.length, idx.zeroed),
    }
    if not warp and len(tags_on_disk) > 1:
        warnings.append(
            f"on-disk tags {tags_on_disk}: source layer numbers kept by overlaybd-merge (0 = top); "
            "readers ignore them"
        )
    if t.uuid == NULL_UUID:
        warnings.append("uuid is null (committed without --uuid)")
    if vsize == 0:
        warnings.append(
            "virtual size 0: in a stack, the device size comes from the top-most layer that has one"
        )
    if t.is_sparse:
        warnings.append("sparse: the data area is the device image, so its holes count as garbage here")
    if h.uuid != t.uuid or h.parent_uuid != t.parent_uuid or h.virtual_size != t.virtual_size:
        warnings.append(
            "header and trailer disagree on uuid, parent_uuid or virtual_size (the trailer is used)"
        )
    return out, warnings
