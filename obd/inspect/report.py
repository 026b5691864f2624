"""What a blob, an RW layer or a stack of layers is made of: the report behind ``obd inspect``.

Everything here builds plain dicts (JSON-ready: numbers are numbers, sizes are bytes, no units) and
never prints. The entry point is :func:`inspect_files`; it opens every file once, describes each
wrapper from the outside in (tar envelope → ZFile → LSMT, docs/formats.md §2.13), and when the files form
a stack (or a ``config.v1.json`` is given) describes the merged device too. :class:`Inspection` also
carries the per-layer mapping arrays that :mod:`obd.inspect.plot` draws.

The describers live beside this driver: :mod:`.stats` (numpy over mapping columns), :mod:`.wrappers`
(ZFile, tar envelope), :mod:`.lsmt` (LSMT records, sealed layers), :mod:`.rw` (RW data and index
files) and :mod:`.stack` (the merged device, the bands of the picture).

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
from typing import TYPE_CHECKING, Any, cast

from obd.errors import ObdError
from obd.image.local import open_config
from obd.inspect.lsmt import VARIANT_TEXT, classify_lsmt, describe_sealed, open_sealed
from obd.inspect.rw import describe_rw_data, describe_rw_index, find_data_for, find_index_for
from obd.inspect.stack import Layout, band_of, describe_stack, short_names
from obd.inspect.wrappers import describe_envelope, describe_zfile
from obd.layer.blob import Blob, open_blob
from obd.lsmt.format import SECTOR, HeaderTrailer
from obd.lsmt.index import Index
from obd.lsmt.rw import AppendRWLayer, RWLayer, SparseRWLayer
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack

if TYPE_CHECKING:
    from obd.image.config import ImageConfig
    from obd.image.remote import RemoteOptions

SCHEMA_VERSION = 1

KIND_TEXT = {
    "layer": "read-only LSMT layer",
    "rw-data": "RW data file",
    "rw-index": "RW index file",
    "data": "not LSMT inside",
    "raw": "not an overlaybd blob",
    "empty": "empty file",
}


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
            owned_stack = open_config(config, readonly=True, remote=remote)
            lowers = list(owned_stack.lowers)
            if upper_item is not None and owned_stack.upper is not None:
                raise ObdError("the config already has an upper; drop --upper", path=str(config))
            # open_config opens sealed lowers
            items = [_item_from_layer(cast(SealedLayer, ly)) for ly in lowers]
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
            members: list[Any] = [*stack.lowers, *([stack.upper] if stack.upper is not None else [])]
            by_obj = {id(it.layer if it.layer is not None else it.rw): it for it in items}
            labels = [by_obj[id(m)].path if id(m) in by_obj else m.name for m in members]
            report["stack"], merged = describe_stack(stack, labels)
            names = short_names(labels)
            bands = [
                band_of(n, m.index if isinstance(m, SealedLayer) else m.to_index())
                for n, m in zip(names, members, strict=True)
            ]
            layout = Layout(stack.size, bands, merged)
        else:
            shown = [(it, idx) for it in items if (idx := it.index()) is not None]
            names = short_names([it.path for it, _ in shown])
            bands = [band_of(n, idx) for n, (_, idx) in zip(names, shown, strict=True)]
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
