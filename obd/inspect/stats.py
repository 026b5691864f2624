"""Statistics over LSMT mapping columns: length histograms, coverage, referenced data, fragmentation.

Everything works on the numpy columns of an index (sectors in, bytes out), never on layer data, so
describing a 64 GiB layer costs what loading its index costs. :func:`looks_turbooci` lives here
because it is a statement about the columns alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from obd.lsmt.format import HT_SPACE, SECTOR, MappingColumns

#: Mapping lengths are 14-bit sector counts, so ``floor(log2(length))`` is 0..13.
HISTOGRAM_BUCKETS = 14
#: First sector of the data area of every LSMT data file (after the 4096-byte header).
DATA_BEGIN = HT_SPACE // SECTOR


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
    commit, but leaves the remote (tag 1) mappings pointing into the target tar (docs/formats.md §1.18). A
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
