"""What a blob, an RW layer or a stack of layers is made of: the report behind ``obd inspect``.

Everything here builds plain dicts (JSON-ready: numbers are numbers, sizes are bytes, no units) and
never prints. The entry point is :func:`inspect_files`; it opens every file once, describes each
wrapper from the outside in (tar envelope → ZFile → LSMT, FORMATS.md §2.13), and when the files form
a stack (or a ``config.v1.json`` is given) describes the merged device too. :class:`Inspection` also
carries the per-layer mapping arrays that :mod:`obd.inspect.plot` draws.

Report shape (``SCHEMA_VERSION`` 1; every key is always present, ``None`` when it does not apply)::

    {"schema": 1, "files": [FILE...], "stack": STACK | None, "notes": [str...]}

    FILE  = {"path", "size", "kinds", "kind", "description", "tar", "zfile", "lsmt", "rw_data",
             "rw_index", "warnings"}
    STACK = {"layer_count", "virtual_size", "virtual_size_from", "layers": [LAYER...], "uuid_chain_ok",
             "merged_entries", "data_bytes", "zero_bytes", "hole_bytes", "fragmentation", "warnings"}

``docs/inspect.md`` lists every field. Statistics are computed with numpy over the index columns;
nothing reads layer data, so inspecting a 64 GiB layer costs what loading its index costs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from obd.errors import FormatError, ObdError, TruncatedError
from obd.io.source import BytesSource, FileSource, Source
from obd.layer.blob import Blob, open_blob
from obd.lsmt.format import (
    HT_SPACE,
    INVALID_OFFSET,
    MAGIC0,
    MAX_RW_INDEX_SIZE,
    NULL_UUID,
    SECTOR,
    HeaderTrailer,
    MappingColumns,
    decode_mappings,
)
from obd.lsmt.index import Index, MutableIndex, merge_indexes
from obd.lsmt.rw import AppendRWLayer, RWLayer, SparseRWLayer
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack

if TYPE_CHECKING:
    from obd.image.config import ImageConfig
    from obd.image.remote import RemoteOptions

SCHEMA_VERSION = 1
#: Mapping lengths are 14-bit sector counts, so ``floor(log2(length))`` is 0..13.
HISTOGRAM_BUCKETS = 14
#: First sector of the data area of every LSMT data file (after the 4096-byte header).
DATA_BEGIN = HT_SPACE // SECTOR

KIND_TEXT = {
    "layer": "read-only LSMT layer",
    "rw-data": "RW data file",
    "rw-index": "RW index file",
    "data": "not LSMT inside",
    "raw": "not an overlaybd blob",
    "empty": "empty file",
}
VARIANT_TEXT = {
    "commit": "committed (overlaybd-commit / overlaybd-merge)",
    "close-sealed": "close-sealed RW data file (overlaybd-commit --seal)",
    "turbooci": "turboOCI (warp) meta layer; tag-1 mappings point into the original OCI layer tar",
}


# --- index statistics ----------------------------------------------------------------------------


def length_histogram(lengths: np.ndarray) -> list[dict[str, int]]:
    """Mapping lengths in power-of-two sector buckets: bucket k holds lengths in ``[2**k, 2**(k+1))``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    lengths = lengths[lengths > 0]
    if len(lengths):
        # frexp is exact for integers: x = m * 2**e with m in [0.5, 1), so floor(log2 x) = e - 1
        buckets = np.frexp(lengths.astype(np.float64))[1] - 1
        counts = np.bincount(buckets, minlength=HISTOGRAM_BUCKETS)
    else:
        counts = np.zeros(HISTOGRAM_BUCKETS, dtype=np.int64)
    return [
        {"min_sectors": 1 << k, "max_sectors": (2 << k) - 1, "count": int(c)} for k, c in enumerate(counts)
    ]


def fragmentation(offset: np.ndarray, length: np.ndarray, zeroed: np.ndarray) -> dict[str, Any]:
    """Entry counts, mean and longest mapping, and the length histogram of a list of mappings (sectors)."""
    n = len(length)
    zeroed = np.asarray(zeroed, dtype=bool)
    longest = None
    if n:
        i = int(np.argmax(length))
        longest = {
            "offset": int(offset[i]) * SECTOR,
            "length": int(length[i]) * SECTOR,
            "zeroed": bool(zeroed[i]),
        }
    return {
        "entries": n,
        "data_entries": int((~zeroed).sum()),
        "zero_entries": int(zeroed.sum()),
        "mean_bytes": float(length.mean()) * SECTOR if n else 0.0,
        "longest": longest,
        "histogram": length_histogram(length),
    }


def coverage(offset: np.ndarray, length: np.ndarray, zeroed: np.ndarray, size: int) -> dict[str, int]:
    """Bytes of ``[0, size)`` mapped to data, zeroed (trimmed) and unmapped, and bytes mapped past it."""
    start = np.asarray(offset, dtype=np.int64) * SECTOR
    end = start + np.asarray(length, dtype=np.int64) * SECTOR
    inside = np.clip(end, 0, size) - np.clip(start, 0, size)
    zeroed = np.asarray(zeroed, dtype=bool)
    data = int(inside[~zeroed].sum())
    zero = int(inside[zeroed].sum())
    return {
        "data_bytes": data,
        "zero_bytes": zero,
        "unmapped_bytes": size - data - zero,
        "beyond_size_bytes": int((end - start).sum()) - data - zero,
    }


def referenced_sectors(moffset: np.ndarray, length: np.ndarray, begin: int, end: int) -> int:
    """Sectors of ``[begin, end)`` that at least one data mapping ``[moffset, moffset+length)`` points at."""
    if not len(moffset):
        return 0
    s = np.clip(np.asarray(moffset, dtype=np.int64), begin, end)
    e = np.clip(np.asarray(moffset, dtype=np.int64) + np.asarray(length, dtype=np.int64), begin, end)
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    # union length: each interval adds what lies beyond the furthest end seen before it
    reach = np.concatenate(([begin], np.maximum.accumulate(e)[:-1]))
    return int(np.maximum(e - np.maximum(s, reach), 0).sum())


def _follows_cursor(moffset: np.ndarray, length: np.ndarray) -> bool:
    """Whether data mappings sit back to back from sector 8 in index order, as ``compact()`` writes them."""
    if not len(moffset):
        return True
    expect = DATA_BEGIN + np.concatenate(([0], np.cumsum(length)[:-1]))
    return bool(np.array_equal(moffset, expect))


def looks_turbooci(cols: MappingColumns) -> bool:
    """Heuristic: an on-disk index with tags 0/1 whose tag-1 data does not live in the blob.

    A committed turboOCI layer copies its fs-meta (tag 0) mappings into the blob back to back, like any
    commit, but leaves the remote (tag 1) mappings pointing into the target tar (FORMATS.md §1.18). A
    merged blob (tags = source layer numbers) has *all* its data back to back, so the two differ.
    """
    if not len(cols):
        return False
    tags = cols.tag - cols.tag.min()
    if int(tags.max()) != 1:
        return False
    data = ~cols.zeroed
    meta = data & (tags == 0)
    return not _follows_cursor(cols.moffset[data], cols.length[data]) and _follows_cursor(
        cols.moffset[meta], cols.length[meta]
    )


# --- record describers ---------------------------------------------------------------------------


def describe_lsmt_record(ht: HeaderTrailer) -> dict[str, Any]:
    """An LSMT header or trailer record as a dict (flags decoded by name)."""
    out = ht.to_dict()
    out["reserved"] = ht.reserved
    return out


def digest_status(rec: Any) -> str:
    """``"absent"`` (digest flag clear), ``"valid"`` or ``"bad"`` for a ZFile record."""
    if not rec.digest_enabled:
        return "absent"
    return "valid" if rec.digest_valid else "bad"


def describe_zfile_record(rec: Any) -> dict[str, Any] | None:
    """A ZFile header or trailer record (:class:`obd.zfile.ZFileRecord`) as a dict."""
    if rec is None:
        return None
    out = rec.as_dict()
    out["algorithm_id"] = rec.algorithm
    out["digest_status"] = digest_status(rec)
    out["nonzero_padding"] = bool(rec.raw is not None and any(rec.raw[96:]))
    return out


def describe_zfile(z: Any) -> tuple[dict[str, Any], list[str]]:
    """A ZFile (:class:`obd.zfile.ZFileReader`): the options in use, sizes, block statistics, both records."""
    warnings: list[str] = []
    lengths = np.asarray(z.compressed_lengths, dtype=np.int64)
    n = int(z.block_count)
    blocks = None
    if n:
        full = np.full(n, z.block_size, dtype=np.int64)
        full[-1] = z.block_length(n - 1)
        blocks = {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
            "mean": float(lengths.mean()),
            "total": int(lengths.sum()),
            "not_smaller": int((lengths >= full).sum()),
        }
    header = describe_zfile_record(z.header)
    trailer = describe_zfile_record(z.trailer)
    for name, rec in (("header", z.header), ("trailer", z.trailer)):
        if rec is None:
            continue
        if rec.garbage_flag_bits:
            warnings.append(
                f"ZFile {name} flags 0x{rec.flags:x} have garbage high bits 0x{rec.garbage_flag_bits:x} "
                "(an old writer; only the low 6 bits mean anything)"
            )
        if rec.digest_enabled and not rec.digest_valid:
            warnings.append(
                f"ZFile {name} digest 0x{rec.digest:08x} does not match its record"
                + (" (overlaybd never checks the trailer's)" if name == "trailer" else "")
            )
    if z.trailer is None:
        warnings.append("ZFile trailer missing or unreadable (not needed: the header was overwritten)")
    elif z.header.header_overwritten:
        fields = ("index_offset", "index_size", "original_file_size", "index_crc")
        differ = [f for f in fields if getattr(z.header, f) != getattr(z.trailer, f)]
        if differ:
            warnings.append(f"ZFile header and trailer disagree on {', '.join(differ)} (the header is used)")
    compressed = int(z.compressed_size)
    out = {
        "record_used": z.record_kind,
        "algorithm": z.algorithm_name,
        "algorithm_id": int(z.algorithm),
        "block_size": int(z.block_size),
        "verify": bool(z.verify_flag),
        "block_count": n,
        "index_offset": int(z.record.index_offset),
        "index_crc": int(z.record.index_crc),
        "index_crc_checked": bool(z.record.digest_enabled),
        "compressed_size": compressed,
        "original_size": int(z.original_size),
        "ratio": (int(z.original_size) / compressed) if compressed else None,
        "compressed_blocks": blocks,
        "header": header,
        "trailer": trailer,
    }
    return out, warnings


def describe_envelope(env: Any) -> tuple[dict[str, Any], list[str]]:
    """A tar envelope (:class:`obd.formats.tar_envelope.TarEnvelope`)."""
    warnings: list[str] = []
    head = env.header
    padding = -env.end_offset % 512
    out = {
        "entry_name": env.name,
        "mode": int(env.mode),
        "uid": int(head.uid),
        "gid": int(head.gid),
        "uname": head.uname.decode("utf-8", "replace"),
        "gname": head.gname.decode("utf-8", "replace"),
        "mtime": int(head.mtime),
        "headers": [
            {
                "offset": int(h.offset),
                "typeflag": h.typeflag.decode("latin-1"),
                "name": h.name.decode("utf-8", "replace"),
            }
            for h in env.headers
        ],
        "pax_records": dict(env.pax_records),
        "global_records": dict(env.global_records),
        "payload_offset": int(env.payload_offset),
        "payload_size": int(env.payload_size),
        "overlaybd_offset": int(env.overlaybd_offset),
        "trailing_size": int(env.trailing_size),
        "trailing_padding": padding,
        "trailing_extra": int(env.trailing_size) - padding - 1024,
    }
    if env.overlaybd_offset != env.payload_offset:
        warnings.append(
            f"overlaybd reads the payload at offset {env.overlaybd_offset} (it assumes a one-block PAX "
            f"record), but it starts at {env.payload_offset}"
        )
    return out, warnings


# --- LSMT layers ---------------------------------------------------------------------------------


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


# --- RW layers -----------------------------------------------------------------------------------


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


# --- files ---------------------------------------------------------------------------------------


@dataclass
class Band:
    """One row of the layout picture: mappings in bytes, with their zeroed flag (and winner layer)."""

    label: str
    offset: np.ndarray
    length: np.ndarray
    zeroed: np.ndarray
    layer: np.ndarray | None = None  # merged band only: position of the winning layer


@dataclass
class Layout:
    """What :func:`obd.inspect.plot.plot_layout` draws: the device size, one band per layer (bottom first)."""

    size: int
    bands: list[Band]
    merged: Band | None = None


@dataclass
class Inspection:
    """The result of :func:`inspect_files`: the JSON-ready report and the arrays for a picture."""

    report: dict[str, Any]
    layout: Layout | None


@dataclass
class _Item:
    path: str
    report: dict[str, Any]
    layer: SealedLayer | None = None
    rw: RWLayer | None = None
    pair: str | None = None  # the index file an RW data item was opened with
    closers: list[Any] = field(default_factory=list)

    def index(self) -> Index | None:
        if self.layer is not None:
            return self.layer.index
        if self.rw is not None:
            return self.rw.to_index()
        return None

    def close(self) -> None:
        while self.closers:
            self.closers.pop().close()


def _new_report(path: str, size: int) -> dict[str, Any]:
    return {
        "path": path,
        "size": size,
        "kinds": [],
        "kind": None,
        "description": None,
        "tar": None,
        "zfile": None,
        "lsmt": None,
        "rw_data": None,
        "rw_index": None,
        "warnings": [],
    }


def _describe_wrappers(blob: Blob, rep: dict[str, Any]) -> None:
    rep["kinds"] = list(blob.kinds)
    if blob.envelope is not None:
        rep["tar"], w = describe_envelope(blob.envelope)
        rep["warnings"] += w
    if blob.zfile is not None:
        rep["zfile"], w = describe_zfile(blob.zfile)
        rep["warnings"] += w


def _set_kind(rep: dict[str, Any], kind: str, detail: str = "") -> None:
    """Set ``kind`` and the one-line ``description`` (``detail`` brings its own punctuation)."""
    rep["kind"] = kind
    text = KIND_TEXT[kind] + detail
    rep["description"] = f"{' → '.join(rep['kinds'])}: {text}" if rep["kinds"] else text


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


def _item_from_layer(layer: SealedLayer, warp: bool | None = None) -> _Item:
    path = layer.name
    blob = layer.blob if isinstance(layer.blob, Blob) else None
    rep = _new_report(path, blob.raw.size if blob is not None else layer.source.size)
    if blob is not None:
        _describe_wrappers(blob, rep)
    else:
        rep["kinds"] = ["lsmt"]
    rep["lsmt"], w = describe_sealed(layer, warp)
    rep["warnings"] += w
    _set_kind(rep, "layer", f": {VARIANT_TEXT[rep['lsmt']['variant']]}")
    return _Item(path, rep, layer=layer)


def _item_from_rw(rw: RWLayer, pairing: str | None) -> _Item:
    rep = _new_report(rw.data_path, os.stat(rw.data_path).st_size)
    rep["kinds"] = ["lsmt"]
    rep["rw_data"], w = describe_rw_data(rw.header, rw, pairing=pairing)
    rep["warnings"] += w
    _set_kind(rep, "rw-data", f", {rep['rw_data']['mode']} mode")
    pair = getattr(rw, "index_path", None)
    return _Item(rw.data_path, rep, rw=rw, pair=pair)


def open_item(path: str | os.PathLike[str], index_path: str | None = None) -> _Item:
    """Open and describe one file; sealed layers and RW data files stay open for a stack."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ObdError(f"cannot open: {e.strerror}", path=path) from e
    if not stat.S_ISREG(st.st_mode):
        raise ObdError("not a regular file", path=path)
    if st.st_size == 0:
        rep = _new_report(path, 0)
        _set_kind(rep, "empty", " (e.g. the index file of a sparse RW layer, which stays empty)")
        return _Item(path, rep)
    blob = open_blob(path)
    try:
        inner = blob.kinds[-1]
        if inner == "lsmt":
            kind, header = classify_lsmt(blob.source, path)
            if kind == "layer":
                layer, warp = open_sealed(blob.source, path, blob)
                try:
                    item = _item_from_layer(layer, warp)
                except BaseException:
                    layer.close()
                    raise
                item.closers.append(layer)
                return item
            if kind == "rw-data" and blob.kinds == ["lsmt"]:
                blob.close()
                return _open_rw_item(path, header, index_path)
        rep = _new_report(path, st.st_size)
        _describe_wrappers(blob, rep)
        if inner == "raw":
            head = blob.raw.pread(0, 8).hex()
            _set_kind(rep, "raw", f" (no tar envelope, ZFile or LSMT magic; it starts with {head})")
        elif inner == "data":
            _set_kind(rep, "data", f" (the payload is {blob.source.size} bytes of something else)")
        elif kind == "rw-index":
            data_path = find_data_for(path, header) if blob.kinds == ["lsmt"] else None
            rep["rw_index"], w = describe_rw_index(header, blob.source, data_path=data_path)
            rep["warnings"] += w
            _set_kind(rep, "rw-index", ", turboOCI (warp)" if rep["rw_index"]["warp"] else "")
        else:  # an RW data file inside a wrapper: overlaybd never writes one
            rep["rw_data"], w = describe_rw_data(header, None)
            rep["warnings"] += [*w, "an RW data file inside a tar/ZFile wrapper cannot be used as a layer"]
            _set_kind(rep, "rw-data", ", wrapped")
        blob.close()
        return _Item(path, rep)
    except BaseException:
        blob.close()
        raise


def _open_rw_item(path: str, header: HeaderTrailer, index_path: str | None) -> _Item:
    pairing = None
    if header.is_sparse:
        rw: RWLayer | None = SparseRWLayer.open(path, header, readonly=True)
    else:
        if index_path:
            pairing = "explicit"
        else:
            index_path = find_index_for(path, header)
            pairing = "sibling" if index_path else None
        rw = AppendRWLayer.open(path, index_path, header, readonly=True) if index_path else None
    if rw is None:
        rep = _new_report(path, os.stat(path).st_size)
        rep["kinds"] = ["lsmt"]
        rep["rw_data"], w = describe_rw_data(header, None)
        rep["warnings"] += w
        _set_kind(rep, "rw-data", ", append mode, index file not found")
        return _Item(path, rep)
    try:
        item = _item_from_rw(rw, pairing)
    except BaseException:
        rw.close()
        raise
    item.closers.append(rw)
    if header.is_sparse and index_path:
        item.report["warnings"].append("a sparse RW layer has no index; INDEX was ignored")
    return item


# --- stacks --------------------------------------------------------------------------------------


def _band(label: str, idx: Index) -> Band:
    return Band(label, idx.offset * SECTOR, idx.length * SECTOR, idx.zeroed.copy())


def describe_stack(stack: Stack, labels: Sequence[str] | None = None) -> tuple[dict[str, Any], Band]:
    """The merged device of a stack: uuid chain, who supplies which bytes, merged index statistics.

    Per-layer contributions come from :meth:`Stack.extents` (the device as a reader sees it): for each
    layer, the bytes of the device it supplies as data and as zeros. ``hidden_bytes`` is what the layer
    maps inside the device but a layer above covers. Also returns the merged band for the picture.
    """
    layers: list[Any] = [*stack.lowers, *([stack.upper] if stack.upper is not None else [])]
    if labels is None:
        labels = [getattr(ly, "name", None) or ly.data_path for ly in layers]
    warnings: list[str] = []
    size = stack.size
    entries = []
    chain_ok = True
    for k, ly in enumerate(layers):
        link = None
        if k:
            prev = layers[k - 1].uuid
            link = ly.parent_uuid.upper() == prev.upper()
            if not link:
                chain_ok = False
                warnings.append(
                    f"layer {k} ({labels[k]}): parent_uuid {ly.parent_uuid} is not the uuid of layer "
                    f"{k - 1} ({prev}); overlaybd does not check this"
                )
        own = ly.index if isinstance(ly, SealedLayer) else ly.to_index()
        cov = coverage(own.offset, own.length, own.zeroed, size)
        entries.append(
            {
                "position": k,
                "path": labels[k],
                "role": "upper" if k == len(stack.lowers) else "lower",
                "uuid": ly.uuid,
                "parent_uuid": ly.parent_uuid,
                "parent_ok": link,
                "virtual_size": ly.virtual_size,
                "entries": len(own),
                "mapped_bytes": cov["data_bytes"] + cov["zero_bytes"],
                "data_bytes": 0,
                "zero_bytes": 0,
                "hidden_bytes": 0,
            }
        )
    vfrom = next((k for k in range(len(layers) - 1, -1, -1) if layers[k].virtual_size > 0), None)
    totals = {"data": 0, "zero": 0, "hole": 0}
    m_off: list[int] = []
    m_len: list[int] = []
    m_zero: list[bool] = []
    m_layer: list[int] = []
    for e in stack.extents():
        totals[e.kind] += e.length
        if e.kind == "hole":
            continue
        entries[e.layer][f"{e.kind}_bytes"] += e.length
        m_off.append(e.offset)
        m_len.append(e.length)
        m_zero.append(e.kind == "zero")
        m_layer.append(e.layer)
    for ent in entries:
        ent["hidden_bytes"] = ent["mapped_bytes"] - ent["data_bytes"] - ent["zero_bytes"]
    merged = stack.lower_index
    if stack.upper is not None:
        merged = merge_indexes([stack.upper.to_index(), stack.lower_index])
    out = {
        "layer_count": len(layers),
        "virtual_size": size,
        "virtual_size_from": vfrom,
        "layers": entries,
        "uuid_chain_ok": chain_ok,
        "merged_entries": len(merged),
        "data_bytes": totals["data"],
        "zero_bytes": totals["zero"],
        "hole_bytes": totals["hole"],
        "fragmentation": fragmentation(merged.offset, merged.length, merged.zeroed),
        "warnings": warnings,
    }
    band = Band(
        "merged",
        np.array(m_off, dtype=np.int64),
        np.array(m_len, dtype=np.int64),
        np.array(m_zero, dtype=bool),
        np.array(m_layer, dtype=np.int64),
    )
    return out, band


def short_names(paths: Sequence[str]) -> list[str]:
    """File names for labels; a name shared by several paths gets as many parent folders as it needs."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    depth = [1] * len(parts)
    while True:
        names = [os.sep.join(ps[-d:]) for ps, d in zip(parts, depth, strict=True)]
        grow = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def _extent_of(item: _Item, idx: Index) -> int:
    vsize = 0
    for key in ("lsmt", "rw_data"):
        part = item.report.get(key)
        if part:
            vsize = part["virtual_size"]
    return vsize or (int(idx.end.max()) * SECTOR if len(idx) else 0)


def inspect_files(
    paths: Sequence[str | os.PathLike[str]] = (),
    *,
    config: str | os.PathLike[str] | ImageConfig | None = None,
    upper: Sequence[str] | None = None,
    remote: RemoteOptions | None = None,
) -> Inspection:
    """Describe ``paths`` (lowest layer first), or the layers of ``config``, plus an RW ``upper``.

    ``upper`` is ``[DATA]`` or ``[DATA, INDEX]``. An append-mode RW data file finds its index by
    itself when a sibling with ``data`` → ``index`` in its name exists (``writable_data`` →
    ``writable_index``, ``L2.data`` → ``L2.index``) and carries the same uuid.

    The files form a stack when there are at least two layers (read-only layers, then at most one
    RW data file as the last, or ``upper``) and nothing else; ``config`` (a path or an
    :class:`~obd.image.config.ImageConfig`, e.g. of a registry image) is always a stack.
    """
    if config is not None and paths:
        raise ObdError("give either FILE arguments or --config, not both")
    if not paths and config is None and not upper:
        raise ObdError("nothing to inspect (give FILE... or --config CONFIG)")
    if upper is not None and not 1 <= len(upper) <= 2:
        raise ObdError("--upper takes DATA and optionally INDEX")
    items: list[_Item] = []
    notes: list[str] = []
    stack: Stack | None = None
    owned_stack: Stack | None = None
    try:
        upper_item = None
        if upper:
            upper_item = open_item(upper[0], upper[1] if len(upper) > 1 else None)
            if upper_item.rw is None:
                upper_item.close()
                raise ObdError(
                    f"--upper needs an RW data file (and its index unless sparse); this is: "
                    f"{upper_item.report['description']}",
                    path=upper[0],
                )
        if config is not None:
            from obd.image.local import open_config

            owned_stack = open_config(config, readonly=True, remote=remote)
            lowers = list(owned_stack.lowers)
            if upper_item is not None and owned_stack.upper is not None:
                raise ObdError("the config already has an upper; drop --upper", path=str(config))
            items = [_item_from_layer(ly) for ly in lowers]
            if owned_stack.upper is not None:
                items.append(_item_from_rw(owned_stack.upper, "config"))
                stack = owned_stack
            else:
                stack = Stack(lowers, upper_item.rw if upper_item else None, name=owned_stack.name)
            if upper_item is not None:
                items.append(upper_item)
        else:
            for p in paths:
                items.append(open_item(p))
            stack = _stack_of(items, upper_item, notes)
            if upper_item is not None:
                items.append(upper_item)
        report: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "files": [it.report for it in items],
            "stack": None,
            "notes": notes,
        }
        layout = None
        if stack is not None:
            members = [*stack.lowers, *([stack.upper] if stack.upper is not None else [])]
            by_obj = {id(it.layer if it.layer is not None else it.rw): it for it in items}
            labels = [by_obj[id(m)].path if id(m) in by_obj else m.name for m in members]
            report["stack"], merged = describe_stack(stack, labels)
            names = short_names(labels)
            bands = [
                _band(n, m.index if isinstance(m, SealedLayer) else m.to_index())
                for n, m in zip(names, members, strict=True)
            ]
            layout = Layout(stack.size, bands, merged)
        else:
            shown = [(it, idx) for it in items if (idx := it.index()) is not None]
            names = short_names([it.path for it, _ in shown])
            bands = [_band(n, idx) for n, (_, idx) in zip(names, shown, strict=True)]
            size = max((_extent_of(it, idx) for it, idx in shown), default=0)
            layout = Layout(size, bands) if bands else None
        return Inspection(report, layout)
    finally:
        for it in items:
            it.close()
        if owned_stack is not None:
            owned_stack.close()
        if upper_item is not None:
            upper_item.close()


def _stack_of(items: list[_Item], upper_item: _Item | None, notes: list[str]) -> Stack | None:
    """The stack FILE arguments form, or None (with a note saying why, when there are several)."""
    absorbed = {os.path.realpath(it.pair) for it in items if it.pair}
    if upper_item is not None and upper_item.pair:
        absorbed.add(os.path.realpath(upper_item.pair))
    seq = [
        it
        for it in items
        if not (it.layer is None and it.rw is None and os.path.realpath(it.path) in absorbed)
    ]
    lowers: list[SealedLayer] = []
    top: RWLayer | None = upper_item.rw if upper_item is not None else None
    blockers = []
    for i, it in enumerate(seq):
        if it.layer is not None:
            lowers.append(it.layer)
        elif it.rw is not None and top is None and i == len(seq) - 1:
            top = it.rw
        else:
            blockers.append(it)
    count = len(lowers) + (top is not None)
    if blockers:
        if count + len(blockers) > 1:
            notes.append(
                "no stack section: "
                + "; ".join(f"{it.path} is not a layer ({it.report['description']})" for it in blockers)
            )
        return None
    if count < 2:
        return None
    return Stack(lowers, top)
