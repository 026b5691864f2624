"""The merged device of a stack of layers, and the per-layer bands the layout picture draws.

:func:`describe_stack` says who supplies which bytes of the device; :class:`Layout` and :class:`Band`
carry the mapping arrays :func:`obd.inspect.plot.plot_layout` draws.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from obd.inspect.stats import coverage, fragmentation
from obd.lsmt.format import SECTOR
from obd.lsmt.index import Index, merge_indexes
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack


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


def band_of(label: str, idx: Index) -> Band:
    """The band of one layer's own index (sectors turned into bytes)."""
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
        assert e.layer is not None  # data and zero extents always name their layer
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
