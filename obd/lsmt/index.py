"""LSMT indexes: sorted, non-overlapping mappings from virtual sectors to backing-file sectors.

Two kinds:

* :class:`Index` — immutable, held as numpy int64 columns; what sealed layers load and what the
  N-layer merge produces. Lookups are a ``bisect`` over a memoryview of the ``end`` column (O(log n)
  and cheap per request); bulk work (merge, validation, statistics) is vectorised.
* :class:`MutableIndex` — overlaybd's level-0 RW index (``Index0``): every write inserts a mapping
  that cuts, splits or removes what it overlaps; neighbours are never merged in memory.

A mapping is the tuple ``(offset, length, moffset, zeroed, tag)`` in sectors; ``tag`` selects the
backing file (in a stack: the slot of the layer file the data lives in).
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

import numpy as np

from obd.errors import FormatError
from obd.lsmt.format import MAX_LENGTH, MAX_OFFSET, MappingColumns

Mapping = tuple[int, int, int, bool, int]

_I64 = np.int64


def _col(values: object) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=_I64)


def _scan(offs, ends, moffs, zeros, tags, base: int, start: int, end: int) -> list[Mapping]:
    """The mappings of sorted parallel sequences overlapping ``[start, end)``, cut to it.

    Works on memoryviews (immutable indexes) and lists (RW indexes) alike; the tag of entry ``i``
    is ``base + tags[i]``. The first piece's moffset moves with its cut start unless it is zeroed.
    """
    i = bisect_right(ends, start)
    n = len(offs)
    out: list[Mapping] = []
    while i < n:
        o = offs[i]
        if o >= end:
            break
        e = ends[i]
        m = moffs[i]
        z = zeros[i]
        if o < start:
            if not z:
                m += start - o
            o = start
        if e > end:
            e = end
        out.append((o, e - o, m, z, base + tags[i]))
        i += 1
    return out


class Index:
    """An immutable sorted index. Build with :meth:`from_columns` or :func:`merge_indexes`."""

    __slots__ = ("_end_mv", "_len_mv", "_moff_mv", "_off_mv", "_tag_mv", "_zero_mv", "cols", "end")

    def __init__(self, cols: MappingColumns):
        self.cols = MappingColumns(
            _col(cols.offset),
            _col(cols.length),
            _col(cols.moffset),
            np.ascontiguousarray(cols.zeroed, bool),
            _col(cols.tag),
        )
        self.end = self.cols.offset + self.cols.length
        # memoryviews hand out plain Python ints (numpy scalars are slow and mix badly with ints)
        self._off_mv = self.cols.offset.data
        self._len_mv = self.cols.length.data
        self._end_mv = self.end.data
        self._moff_mv = self.cols.moffset.data
        self._zero_mv = self.cols.zeroed.data
        self._tag_mv = self.cols.tag.data

    @classmethod
    def empty(cls) -> Index:
        z = np.zeros(0, _I64)
        return cls(MappingColumns(z, z, z, np.zeros(0, bool), z))

    @classmethod
    def from_arrays(
        cls,
        offset: object,
        length: object,
        moffset: object,
        zeroed: object,
        tag: object = 0,
    ) -> Index:
        off = _col(offset)
        n = len(off)
        tags = np.full(n, tag, _I64) if np.isscalar(tag) else _col(tag)
        return cls(MappingColumns(off, _col(length), _col(moffset), np.asarray(zeroed, bool), tags))

    def __len__(self) -> int:
        return len(self.cols.offset)

    @property
    def offset(self) -> np.ndarray:
        return self.cols.offset

    @property
    def length(self) -> np.ndarray:
        return self.cols.length

    @property
    def moffset(self) -> np.ndarray:
        return self.cols.moffset

    @property
    def zeroed(self) -> np.ndarray:
        return self.cols.zeroed

    @property
    def tag(self) -> np.ndarray:
        return self.cols.tag

    def with_tag(self, tag: int | np.ndarray) -> Index:
        """A copy whose tags are all ``tag`` (or the given per-entry array)."""
        tags = np.full(len(self), tag, _I64) if np.isscalar(tag) else _col(tag)
        return Index(MappingColumns(self.offset, self.length, self.moffset, self.zeroed, tags))

    def lookup(self, start: int, end: int) -> list[Mapping]:
        """Mappings overlapping sectors ``[start, end)``, cut to that range, in order."""
        return _scan(self._off_mv, self._end_mv, self._moff_mv, self._zero_mv, self._tag_mv, 0, start, end)

    def __iter__(self) -> Iterator[Mapping]:
        for i in range(len(self)):
            off, zeroed = self._off_mv[i], bool(self._zero_mv[i])
            yield (off, self._len_mv[i], self._moff_mv[i], zeroed, self._tag_mv[i])

    def check_sorted(self, *, path: object = None, field: str = "index") -> None:
        """Require strictly ordered, non-overlapping entries (``a.end <= b.offset``)."""
        if len(self) > 1:
            bad = np.nonzero(self.end[:-1] > self.offset[1:])[0]
            if len(bad):
                i = int(bad[0])
                raise FormatError(
                    f"entries {i} and {i + 1} overlap or are out of order "
                    f"([{self.offset[i]}, {self.end[i]}) then [{self.offset[i + 1]}, {self.end[i + 1]}))",
                    path=path,
                    field=f"{field}[{i + 1}].offset",
                    value=int(self.offset[i + 1]),
                )

    def check_moffsets(
        self, data_begin: int, data_end: int, *, path: object = None, field: str = "index"
    ) -> None:
        """Require data entries inside ``[data_begin, data_end)`` sectors, as overlaybd's loader does."""
        if not len(self):
            return
        z = self.zeroed
        m = self.moffset
        mend = m + np.where(z, 0, self.length)
        bad_data = ~z & ((m < data_begin) | (m >= data_end) | (mend <= data_begin) | (mend > data_end))
        bad_zero = z & ((m < data_begin) | (m > data_end))
        bad = np.nonzero(bad_data | bad_zero)[0]
        if len(bad):
            i = int(bad[0])
            raise FormatError(
                f"mapping [{self.offset[i]}, +{self.length[i]}) points at sectors [{m[i]}, {mend[i]}) "
                f"outside the data area [{data_begin}, {data_end})",
                path=path,
                field=f"{field}[{i}].moffset",
                value=int(m[i]),
            )

    def drop_empty(self) -> Index:
        keep = self.length > 0
        if keep.all():
            return self
        return Index(self.cols.take(keep))

    # --- statistics -------------------------------------------------------------------------------
    def mapped_sectors(self) -> int:
        return int(self.length[~self.zeroed].sum())

    def zeroed_sectors(self) -> int:
        return int(self.length[self.zeroed].sum())


def merge_indexes(layers: list[Index]) -> Index:
    """Merge indexes given **top first**: for every sector the top-most layer with a mapping wins.

    Each lower layer contributes only the parts of its mappings that fall into gaps of everything
    above it (a zeroed mapping counts as a mapping: it hides what is below). This is overlaybd's
    recursive ``merge_indexes`` computed as vectorised interval subtraction; the tags of the inputs
    are kept, so callers set them to the file slot of each layer first.
    """
    if not layers:
        return Index.empty()
    acc = layers[0]
    for lower in layers[1:]:
        if not len(lower):
            continue
        if not len(acc):
            acc = lower
            continue
        pieces = _subtract(lower, acc)
        if len(pieces):
            acc = _union_disjoint(acc, pieces)
    return acc


def _subtract(lower: Index, cover: Index) -> Index:
    """The parts of ``lower``'s mappings lying in the gaps between ``cover``'s mappings."""
    gs = np.concatenate(([0], cover.end))
    ge = np.concatenate((cover.offset, [MAX_OFFSET + MAX_LENGTH]))
    open_gap = gs < ge
    gs, ge = gs[open_gap], ge[open_gap]
    lo = np.searchsorted(ge, lower.offset, side="right")
    hi = np.searchsorted(gs, lower.end, side="left")
    cnt = np.maximum(hi - lo, 0)
    total = int(cnt.sum())
    if total == 0:
        return Index.empty()
    li = np.repeat(np.arange(len(lower), dtype=_I64), cnt)
    first = np.cumsum(cnt) - cnt
    gi = lo[li] + (np.arange(total, dtype=_I64) - first[li])
    start = np.maximum(lower.offset[li], gs[gi])
    stop = np.minimum(lower.end[li], ge[gi])
    keep = stop > start
    li, start, stop = li[keep], start[keep], stop[keep]
    zeroed = lower.zeroed[li]
    moff = lower.moffset[li] + np.where(zeroed, 0, start - lower.offset[li])
    return Index(MappingColumns(start, stop - start, moff, zeroed, lower.tag[li]))


def _union_disjoint(a: Index, b: Index) -> Index:
    off = np.concatenate((a.offset, b.offset))
    order = np.argsort(off, kind="stable")
    cols = MappingColumns(
        off[order],
        np.concatenate((a.length, b.length))[order],
        np.concatenate((a.moffset, b.moffset))[order],
        np.concatenate((a.zeroed, b.zeroed))[order],
        np.concatenate((a.tag, b.tag))[order],
    )
    return Index(cols)


def compress_mappings(mappings: list[Mapping]) -> list[Mapping]:
    """overlaybd's ``compress_raw_index``: one greedy pass joining contiguous neighbours.

    ``c`` absorbs the next entry ``x`` when they touch in both offset and moffset, agree on
    ``zeroed`` and ``tag``, and the joined length stays **below** 16383 sectors.
    """
    out: list[Mapping] = []
    if not mappings:
        return out
    co, cl, cm, cz, ct = mappings[0]
    for xo, xl, xm, xz, xt in mappings[1:]:
        mend = cm if cz else cm + cl
        if co + cl == xo and mend == xm and cz == xz and ct == xt and cl + xl < MAX_LENGTH:
            cl += xl
        else:
            out.append((co, cl, cm, cz, ct))
            co, cl, cm, cz, ct = xo, xl, xm, xz, xt
    out.append((co, cl, cm, cz, ct))
    return out


class MutableIndex:
    """overlaybd's level-0 index of a RW layer: inserts cut what they overlap (docs/formats.md §1.7).

    Kept as parallel Python lists (bisect + slice assignment); safe for concurrent readers and
    writers through an internal lock. Each entry has a *relative* tag (0 for normal RW layers; 0
    fs-meta / 1 target for turboOCI warp layers); lookups report ``tag + relative tag`` so that a
    stack can point :attr:`tag` at the slot of the layer's first file.
    """

    def __init__(self, tag: int = 0):
        self.tag = tag
        self._off: list[int] = []
        self._end: list[int] = []
        self._moff: list[int] = []
        self._zero: list[bool] = []
        self._rel: list[int] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._off)

    def insert(self, offset: int, length: int, moffset: int, zeroed: bool = False, rel: int = 0) -> None:
        """Insert one mapping; whatever it overlaps is cut, split or removed (the pieces keep their tags)."""
        if length <= 0:
            return
        end = offset + length
        with self._lock:
            offs, ends, moffs, zeros, rels = self._off, self._end, self._moff, self._zero, self._rel
            i = bisect_right(ends, offset)
            j = bisect_left(offs, end, lo=i)
            new = [(offset, end, moffset, zeroed, rel)]
            if i < j:
                if offs[i] < offset:
                    new.insert(0, (offs[i], offset, moffs[i], zeros[i], rels[i]))
                last = j - 1
                if ends[last] > end:
                    z = zeros[last]
                    m = moffs[last] if z else moffs[last] + (end - offs[last])
                    new.append((end, ends[last], m, z, rels[last]))
            cols = list(zip(*new, strict=True))
            offs[i:j], ends[i:j], moffs[i:j], zeros[i:j], rels[i:j] = cols

    def lookup(self, start: int, end: int) -> list[Mapping]:
        """Mappings overlapping ``[start, end)``, cut to it, tagged ``tag + relative tag``."""
        with self._lock:
            return _scan(self._off, self._end, self._moff, self._zero, self._rel, self.tag, start, end)

    def dump(self, *, relative: bool = False) -> list[Mapping]:
        """All mappings in order (a snapshot); tags are ``tag + relative`` unless ``relative``."""
        base = 0 if relative else self.tag
        with self._lock:
            return [
                (o, e - o, m, z, base + r)
                for o, e, m, z, r in zip(self._off, self._end, self._moff, self._zero, self._rel, strict=True)
            ]

    def to_index(self) -> Index:
        with self._lock:
            off = np.array(self._off, _I64)
            return Index(
                MappingColumns(
                    off,
                    np.array(self._end, _I64) - off,
                    np.array(self._moff, _I64),
                    np.array(self._zero, bool),
                    np.array(self._rel, _I64) + self.tag,
                )
            )

    def max_end(self) -> int:
        with self._lock:
            return self._end[-1] if self._end else 0
