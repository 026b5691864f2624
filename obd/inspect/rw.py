"""Describers of RW layers: append-mode data files with their index log, sparse data files, index files.

An append-mode data file and its index are paired by name (``data`` → ``index``, same uuid); an index
file on its own is described by its record log and the index its replay gives.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from obd.errors import FormatError, ObdError
from obd.inspect.lsmt import describe_lsmt_record
from obd.inspect.stats import DATA_BEGIN, coverage, fragmentation, referenced_sectors
from obd.io.source import FileSource, Source
from obd.lsmt.format import (
    HT_SPACE,
    INVALID_OFFSET,
    MAX_RW_INDEX_SIZE,
    SECTOR,
    HeaderTrailer,
    MappingColumns,
    decode_mappings,
)
from obd.lsmt.index import Index, MutableIndex
from obd.lsmt.rw import AppendRWLayer, RWLayer, SparseRWLayer


def _read_header(path: str) -> HeaderTrailer | None:
    """The LSMT header of a small sibling file, or None if it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HT_SPACE)
        if len(raw) < HT_SPACE:
            return None
        ht = HeaderTrailer.parse(raw, path=path)
    except (OSError, ObdError):
        return None
    return ht if ht.is_header else None


def sibling(path: str, word: str, other: str) -> str | None:
    """``path`` with the last ``word`` of its file name replaced by ``other``, if that file exists.

    This pairs overlaybd's ``writable_data``/``writable_index`` and the tools' ``X.data``/``X.index``.
    """
    folder, base = os.path.split(path)
    i = base.rfind(word)
    if i < 0:
        return None
    cand = os.path.join(folder, base[:i] + other + base[i + len(word) :])
    return cand if cand != path and os.path.isfile(cand) else None


def find_index_for(data_path: str, header: HeaderTrailer) -> str | None:
    """The sibling RW index file of an append-mode data file: same name with ``data`` → ``index``,
    an RW index header (flags 0x01, index_offset 4096) and the same uuid."""
    cand = sibling(data_path, "data", "index")
    if cand is None:
        return None
    ht = _read_header(cand)
    ok = ht is not None and not ht.is_data and not ht.is_sealed and ht.index_offset == HT_SPACE
    return cand if ok and ht is not None and ht.uuid == header.uuid else None


def find_data_for(index_path: str, header: HeaderTrailer) -> str | None:
    """The sibling append-mode RW data file of an index file (``index`` → ``data``, same uuid)."""
    cand = sibling(index_path, "index", "data")
    if cand is None:
        return None
    ht = _read_header(cand)
    ok = ht is not None and ht.is_data and not ht.is_sparse
    return cand if ok and ht is not None and ht.uuid == header.uuid else None


def read_rw_records(source: Source) -> tuple[MappingColumns, int]:
    """All 16-byte records of an RW index file (after its 4096-byte header) and the partial tail's size."""
    body = source.size - HT_SPACE
    count = body // 16
    if count > MAX_RW_INDEX_SIZE:
        raise FormatError(
            f"more than {MAX_RW_INDEX_SIZE} records", path=source.name, field="index.count", value=count
        )
    raw = source.read_exact(HT_SPACE, count * 16, "index") if count else b""
    return decode_mappings(raw), body % 16


def record_stats(cols: MappingColumns, partial: int) -> dict[str, Any]:
    """Counts of an RW index log: writes, trims, padding records, the tags written."""
    real = cols.offset != INVALID_OFFSET
    writes = real & ~cols.zeroed
    trims = real & cols.zeroed
    return {
        "records": len(cols),
        "invalid_records": int((~real).sum()),
        "write_records": int(writes.sum()),
        "trim_records": int(trims.sum()),
        "written_bytes": int(cols.length[writes].sum()) * SECTOR,
        "trimmed_bytes": int(cols.length[trims].sum()) * SECTOR,
        "partial_tail_bytes": partial,
        "record_tags": sorted(int(x) for x in np.unique(cols.tag[real])),
    }


def replay_stats(idx: Index, vsize: int, data_area: int | None, written: int) -> dict[str, Any]:
    """The live index after replaying an RW log: coverage, garbage and fragmentation."""
    extent = vsize or (int(idx.end.max()) * SECTOR if len(idx) else 0)
    data = ~idx.zeroed
    live = referenced_sectors(idx.moffset[data], idx.length[data], DATA_BEGIN, INVALID_OFFSET) * SECTOR
    area = written if data_area is None else data_area
    return {
        "entries": len(idx),
        "space": {"size": extent, **coverage(idx.offset, idx.length, idx.zeroed, extent)},
        "data_area_bytes": area,
        "live_data_bytes": live,
        "garbage_bytes": area - live,
        "max_end": int(idx.end.max()) * SECTOR if len(idx) else 0,
        "fragmentation": fragmentation(idx.offset, idx.length, idx.zeroed),
    }


def _replay(cols: MappingColumns) -> Index:
    mi = MutableIndex()
    real = cols.offset != INVALID_OFFSET
    for o, ln, m, z in zip(
        cols.offset[real].tolist(),
        cols.length[real].tolist(),
        cols.moffset[real].tolist(),
        cols.zeroed[real].tolist(),
        strict=True,
    ):
        mi.insert(o, ln, m, z)
    return mi.to_index()


def describe_rw_data(
    header: HeaderTrailer, layer: RWLayer | None, *, pairing: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """An RW data file: its header, and the replayed index (append) or hole map (sparse) when opened."""
    warnings: list[str] = []
    out: dict[str, Any] = {
        "mode": "sparse" if header.is_sparse else "append",
        "header": describe_lsmt_record(header),
        "uuid": header.uuid,
        "parent_uuid": header.parent_uuid,
        "virtual_size": header.virtual_size,
        "index_file": None,
        "pairing": pairing,
        "index_header": None,
        "records": None,
        "replay": None,
        "holes": None,
    }
    if header.virtual_size == 0:
        warnings.append("virtual size 0: set from the lowers when the layer is stacked")
    if isinstance(layer, AppendRWLayer):
        out["index_file"] = layer.index_path
        out["index_header"] = describe_lsmt_record(layer.index_header)
        isrc = FileSource(layer.index_path)
        try:
            cols, partial = read_rw_records(isrc)
        finally:
            isrc.close()
        stats = record_stats(cols, partial)
        stats["dropped_records"] = layer.dropped_records
        out["records"] = stats
        data_area = os.stat(layer.data_path).st_size - HT_SPACE
        out["replay"] = replay_stats(layer.to_index(), layer.index_header.virtual_size, data_area, 0)
        if layer.index_header.uuid != header.uuid:
            warnings.append("data and index headers carry different uuids")
        if layer.dropped_records:
            warnings.append(f"{layer.dropped_records} torn record(s) at the end of the index are ignored")
    elif isinstance(layer, SparseRWLayer):
        st = os.stat(layer.data_path)
        idx = layer.to_index()
        runs = int(np.count_nonzero(idx.offset[1:] != idx.end[:-1])) + 1 if len(idx) else 0
        extent = header.virtual_size or (int(idx.end.max()) * SECTOR if len(idx) else 0)
        out["holes"] = {
            "apparent_size": st.st_size,
            "allocated_bytes": st.st_blocks * 512,
            "data_extents": runs,
            "entries": len(idx),
            "space": {"size": extent, **coverage(idx.offset, idx.length, idx.zeroed, extent)},
            "fragmentation": fragmentation(idx.offset, idx.length, idx.zeroed),
        }
        if st.st_size != header.virtual_size + HT_SPACE:
            warnings.append(
                f"apparent size {st.st_size} is not virtual size + 4096 ({header.virtual_size + HT_SPACE})"
            )
        if header.virtual_size and out["holes"]["space"]["data_bytes"] >= header.virtual_size:
            warnings.append(
                "no holes: every byte is mapped (a copy that lost its holes maps the whole device)"
            )
    elif not header.is_sparse:
        warnings.append("no index file found: give it with --upper DATA INDEX to replay the index")
    return out, warnings


def describe_rw_index(
    header: HeaderTrailer, source: Source, *, data_path: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """An RW index file on its own: header, record log counts, and the index its replay gives.

    Garbage is the data area (from the sibling data file when found, else the bytes the log says
    were written) minus the data still referenced after replay. A log with two consecutive tag
    values is a turboOCI (warp) index, whose records point in place into fs-meta or into the target,
    so no garbage is computed for it.
    """
    warnings: list[str] = []
    cols, partial = read_rw_records(source)
    stats = record_stats(cols, partial)
    tags = stats["record_tags"]
    warp = len(tags) == 2 and tags[1] - tags[0] == 1
    data_area = os.stat(data_path).st_size - HT_SPACE if data_path else None
    replay = replay_stats(_replay(cols), header.virtual_size, data_area, stats["written_bytes"])
    if warp:
        replay.update(data_area_bytes=None, live_data_bytes=None, garbage_bytes=None)
        warnings.append(
            f"record tags {tags}: a turboOCI (warp) index (tag {tags[0]} = fs-meta written in place, "
            f"tag {tags[1]} = data in the target tar)"
        )
    elif tags and tags[0] > 0:
        warnings.append(f"records carry tag {tags[0]}: written while stacked on {tags[0]} lower layer(s)")
    if header.is_sealed or header.index_offset != HT_SPACE:
        warnings.append(
            "overlaybd refuses this index file (it needs flags 0x01 and index_offset 4096, "
            f"found flags 0x{header.flags:x} and index_offset {header.index_offset})"
        )
    if partial:
        warnings.append(f"a partial record of {partial} bytes at the end is ignored")
    out = {
        "header": describe_lsmt_record(header),
        "uuid": header.uuid,
        "parent_uuid": header.parent_uuid,
        "virtual_size": header.virtual_size,
        "data_file": data_path,
        "warp": warp,
        "records": stats,
        "replay": replay,
    }
    return out, warnings
