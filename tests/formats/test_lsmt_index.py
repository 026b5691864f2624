"""Index semantics: RW inserts, lookups, N-layer merges, commit compaction.

docs/formats.md §1.7, §1.10, §1.12.
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from obd.lsmt.index import Index, MutableIndex, compress_mappings, merge_indexes


def idx(*maps):
    """Index from (offset, length, moffset[, zeroed[, tag]]) tuples."""
    rows = [(*m, *(False, 0)[len(m) - 3 :]) for m in maps]
    if not rows:
        return Index.empty()
    o, ln, mo, z, t = zip(*rows, strict=True)
    return Index.from_arrays(o, ln, mo, z, t)


def rw(*inserts):
    m = MutableIndex()
    for ins in inserts:
        m.insert(*ins)
    return [x[:4] for x in m.dump()]


def test_insert_exact_overlap_replaces():
    assert rw((10, 5, 100), (10, 5, 200)) == [(10, 5, 200, False)]


def test_insert_left_partial_cuts_the_old_tail():
    assert rw((10, 10, 100), (15, 10, 200)) == [(10, 5, 100, False), (15, 10, 200, False)]


def test_insert_right_partial_moves_the_old_start():
    assert rw((10, 10, 100), (5, 10, 200)) == [(5, 10, 200, False), (15, 5, 105, False)]


def test_insert_contained_splits_in_two_with_moffsets():
    assert rw((10, 20, 100), (15, 5, 200)) == [(10, 5, 100, False), (15, 5, 200, False), (20, 10, 110, False)]


def test_insert_covering_several():
    assert rw((10, 2, 100), (13, 2, 102), (16, 2, 104), (9, 10, 200)) == [(9, 10, 200, False)]


def test_insert_cutting_a_zeroed_mapping_keeps_its_moffset():
    assert rw((10, 20, 100, True), (15, 5, 200)) == [
        (10, 5, 100, True),
        (15, 5, 200, False),
        (20, 10, 100, True),
    ]


def test_adjacent_inserts_are_not_merged_in_memory():
    assert rw((10, 5, 100), (15, 5, 105)) == [(10, 5, 100, False), (15, 5, 105, False)]


def test_zero_length_insert_is_ignored():
    assert rw((10, 0, 100)) == []


def test_lookup_cuts_first_and_last_and_moves_moffset():
    i = idx((0, 10, 100), (20, 10, 200, True), (40, 10, 300))
    assert i.lookup(5, 45) == [(5, 5, 105, False, 0), (20, 10, 200, True, 0), (40, 5, 300, False, 0)]
    assert i.lookup(10, 20) == []
    assert i.lookup(25, 26) == [(25, 1, 200, True, 0)]  # zeroed: moffset does not move


def test_merge_top_wins_over_data_zeroed_and_holes():
    top = idx((10, 10, 100, False, 0), (30, 5, 8, True, 0))
    bottom = idx((0, 50, 500, False, 1))
    merged = list(merge_indexes([top, bottom]))
    assert merged == [
        (0, 10, 500, False, 1),
        (10, 10, 100, False, 0),
        (20, 10, 520, False, 1),
        (30, 5, 8, True, 0),
        (35, 15, 535, False, 1),
    ]


def test_merge_partial_overlaps_at_both_ends():
    top = idx((10, 10, 100, False, 0))
    bottom = idx((5, 10, 500, False, 1), (18, 10, 600, False, 1))
    assert list(merge_indexes([top, bottom])) == [
        (5, 5, 500, False, 1),
        (10, 10, 100, False, 0),
        (20, 8, 602, False, 1),
    ]


def paint(layers, size):
    """Reference model: a per-sector array of (layer, moffset, zeroed) painted bottom to top."""
    cells = [None] * size
    for layer in reversed(layers):  # layers are top first
        for o, ln, m, z, t in layer:
            for k in range(ln):
                cells[o + k] = (t, m if z else m + k, z)
    return cells


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30), st.booleans()), max_size=12),
        min_size=1,
        max_size=5,
    )
)
def test_merge_equals_a_painted_model(raw_layers):
    layers = []
    for t, writes in enumerate(raw_layers):
        m = MutableIndex(tag=t)
        for k, (o, ln, z) in enumerate(writes):
            m.insert(o, ln, 1000 * (k + 1), z)
        layers.append(m.to_index())
    merged = merge_indexes(layers)
    merged.check_sorted()
    assert paint([list(merged)], 260) == paint([list(x) for x in layers], 260)


def test_mutable_index_matches_a_model_under_random_inserts():
    rng = random.Random(7)
    m = MutableIndex()
    model = [None] * 500
    for k in range(2000):
        o = rng.randrange(0, 480)
        ln = rng.randrange(1, 20)
        z = rng.random() < 0.2
        m.insert(o, ln, 10_000 + 50 * k, z)
        for j in range(ln):
            model[o + j] = (10_000 + 50 * k + (0 if z else j), z)
    got = [None] * 500
    for o, ln, mo, z, _ in m.dump():
        for j in range(ln):
            got[o + j] = (mo + (0 if z else j), z)
    assert got == model
    assert m.to_index().lookup(0, 500) == m.lookup(0, 500)


def test_compress_joins_contiguous_below_16383():
    chunks = [(64 * i, 64, 8 + 64 * i, False, 0) for i in range(256)]  # 16384 sectors in 64-sector chunks
    out = compress_mappings(chunks)
    assert [m[1] for m in out] == [16320, 64]


def test_compress_keeps_breaks():
    out = compress_mappings(
        [
            (0, 8, 8, False, 0),
            (8, 8, 16, False, 0),  # joined
            (16, 8, 30, False, 0),  # moffset gap
            (24, 8, 38, False, 1),  # other tag
            (32, 4, 46, True, 1),
            (36, 4, 46, True, 1),  # zeroed runs with equal moffsets join
            (40, 4, 50, True, 1),  # zeroed with another moffset does not
        ]
    )
    assert out == [
        (0, 16, 8, False, 0),
        (16, 8, 30, False, 0),
        (24, 8, 38, False, 1),
        (32, 8, 46, True, 1),
        (40, 4, 50, True, 1),
    ]


def test_compress_16383_run_splits_as_overlaybd():
    chunks = []
    pos = 0
    while pos < 16383:
        n = min(64, 16383 - pos)
        chunks.append((pos, n, 8 + pos, False, 0))
        pos += n
    assert [m[1] for m in compress_mappings(chunks)] == [16320, 63]


def test_index_checks():
    import pytest

    from obd.errors import FormatError

    with pytest.raises(FormatError, match="overlap"):
        idx((0, 10, 8), (5, 10, 30)).check_sorted(path="x")
    with pytest.raises(FormatError, match="outside the data area"):
        idx((0, 10, 8)).check_moffsets(8, 12, path="x")
    with pytest.raises(FormatError, match="moffset"):
        idx((0, 10, 4)).check_moffsets(8, 100, path="x")
    idx((0, 10, 100, True)).check_moffsets(8, 100)  # a zeroed entry may sit at the data end
    assert len(idx((0, 0, 8), (0, 1, 8)).drop_empty()) == 1
    assert np.array_equal(idx((1, 2, 8)).end, [3])
