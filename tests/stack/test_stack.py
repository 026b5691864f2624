"""Stacks with an RW upper: reads, unaligned writes, zero/trim, extents, commit-then-stack round trips."""

from __future__ import annotations

import io
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obd.errors import LayerStateError
from obd.io.source import BytesSource
from obd.lsmt.commit import layer_info, write_sealed
from obd.lsmt.rw import create_rw
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Extent, Stack

SIZE = 1 << 20


def sealed_from_ops(tmp_path, name, ops, sparse=False):
    """Run (op, offset, bytes-or-length) ops through a fresh RW layer and commit it in memory."""
    d = tmp_path / name
    d.mkdir()
    rw = create_rw(str(d / "data"), str(d / "index"), SIZE, sparse=sparse)
    for op, off, arg in ops:
        if op == "w":
            rw.pwrite(arg, off)
        else:
            rw.trim(off, arg)
    out = io.BytesIO()
    write_sealed(out, [(o, ln, m, z, 0) for o, ln, m, z, _ in rw.dump()], rw.files, layer_info(SIZE))
    rw.close()
    return SealedLayer(BytesSource(out.getvalue(), name))


def apply(model, ops):
    for op, off, arg in ops:
        if op == "w":
            model[off : off + len(arg)] = arg
        else:
            model[off : off + arg] = bytes(arg)


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from("wt"),
        st.integers(0, SIZE // 512 - 64).map(lambda s: s * 512),
        st.integers(1, 40),
        st.integers(0, 255),
    ),
    max_size=25,
)


def materialise(raw_ops):
    return [
        ("w", off, bytes([fill]) * (n * 512)) if op == "w" else ("t", off, n * 512)
        for op, off, n, fill in raw_ops
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(ops_strategy, min_size=1, max_size=4), top=ops_strategy, sparse=st.booleans())
def test_committed_layers_plus_upper_equal_a_byte_model(tmp_path_factory, layers, top, sparse):
    tmp = tmp_path_factory.mktemp("stack")
    model = bytearray(SIZE)
    lowers = []
    for i, raw in enumerate(layers):
        ops = materialise(raw)
        lowers.append(sealed_from_ops(tmp, f"l{i}", ops))
        apply(model, ops)
    upper = create_rw(str(tmp / "udata"), str(tmp / "uindex"), SIZE, sparse=sparse)
    stack = Stack(lowers, upper)
    ops = materialise(top)
    for op, off, arg in ops:
        if op == "w":
            stack.pwrite(arg, off)
        else:
            stack.trim(off, arg)
    apply(model, ops)
    assert stack.pread(0, SIZE) == bytes(model)
    # the extents describe the same bytes: data runs hold what the device holds, the rest is zero
    for e in stack.extents():
        if e.kind != "data":
            assert stack.pread(e.offset, e.length) == bytes(e.length)
    stack.close()


def test_unaligned_writes_and_zeroes_read_modify_write(tmp_path):
    base = sealed_from_ops(tmp_path, "base", [("w", 0, b"\xaa" * 8192)])
    upper = create_rw(str(tmp_path / "d"), str(tmp_path / "i"), SIZE)
    st = Stack([base], upper)
    st.pwrite(b"hello", 1000)
    st.zero(3000, 2000)  # covers sector 6..9 partially: edges written, middle trimmed
    expect = bytearray(b"\xaa" * 8192) + bytearray(SIZE - 8192)
    expect[1000:1005] = b"hello"
    expect[3000:5000] = bytes(2000)
    assert st.pread(0, 16384) == bytes(expect[:16384])
    kinds = [(e.offset, e.length, e.kind) for e in st.extents(0, 8192)]
    assert (3072, 1536, "zero") in kinds  # whole sectors 6..8 became a zeroed mapping


def test_read_only_stack_refuses_writes_and_ranges_are_checked(tmp_path):
    base = sealed_from_ops(tmp_path, "base", [])
    st = Stack([base])
    assert st.readonly
    with pytest.raises(LayerStateError, match="read-only"):
        st.pwrite(b"x", 0)
    upper = create_rw(str(tmp_path / "d"), str(tmp_path / "i"), SIZE)
    st = Stack([base], upper)
    with pytest.raises(LayerStateError, match="outside"):
        st.pwrite(bytes(512), SIZE)


def test_extents_kinds_and_layers(tmp_path):
    l0 = sealed_from_ops(tmp_path, "l0", [("w", 0, b"a" * 4096), ("w", 8192, b"b" * 4096)])
    l1 = sealed_from_ops(tmp_path, "l1", [("t", 8192, 2048), ("w", 65536, b"c" * 512)])
    st = Stack([l0, l1])
    assert st.extents(0, 70000) == [
        Extent(0, 4096, "data", 0),
        Extent(4096, 4096, "hole"),
        Extent(8192, 2048, "zero", 1),
        Extent(10240, 2048, "data", 0),
        Extent(12288, 65536 - 12288, "hole"),
        Extent(65536, 512, "data", 1),
        Extent(66048, 70000 - 66048, "hole"),
    ]


def test_stack_vsize_is_the_top_most_non_zero_and_zero_upper_inherits(tmp_path):
    a = sealed_from_ops(tmp_path, "a", [])
    assert Stack([a]).size == SIZE
    upper = create_rw(str(tmp_path / "d"), str(tmp_path / "i"), 0)
    st = Stack([a], upper)
    assert st.size == SIZE and upper.virtual_size == SIZE  # written into the upper's headers
    assert (tmp_path / "i").read_bytes()[48:56] == SIZE.to_bytes(8, "little")


class _Logged(BytesSource):
    """A layer file that logs the offsets it is read at."""

    def __init__(self, inner, log):
        super().__init__(inner.pread(0, inner.size), "logged")
        self.log = log

    def readinto(self, buf, offset):
        self.log.append(offset)
        return super().readinto(buf, offset)


def test_trace_replay_reads_in_the_order_the_recording_first_needed(tmp_path):
    """A trace is replayed in first-need order, neighbours merged (a merged range goes where its
    earliest record was), not sorted by size or offset: on a slow link the replay then delivers
    what the guest waits for next."""
    from obd.prefetch.trace import replay

    layer = sealed_from_ops(tmp_path, "l", [("w", 0, bytes([7]) * (SIZE // 2))])
    stack = Stack([layer])
    log: list[int] = []
    stack.files[0] = _Logged(stack.files[0], log)
    page = 4096
    records = [(0, 40 * page, page), (0, 2 * page, page), (0, 90 * page, 8 * page), (0, 41 * page, page)]
    res = replay(stack, records, workers=1)
    assert log == [40 * page, 2 * page, 90 * page]  # 40 and 41 merged, at 40's place
    assert res.ranges == 3 and res.bytes == 11 * page


class _Timed(BytesSource):
    """A layer file that notes how many reads are running at once and their bytes."""

    def __init__(self, inner):
        super().__init__(inner.pread(0, inner.size), "timed")
        self.lock = threading.Lock()
        self.now = self.most = self.bytes_now = self.most_bytes = 0
        self.order: list[int] = []

    def readinto(self, buf, offset):
        with self.lock:
            self.order.append(offset)
            self.now += 1
            self.bytes_now += len(buf)
            self.most, self.most_bytes = max(self.most, self.now), max(self.most_bytes, self.bytes_now)
        time.sleep(0.01)
        try:
            return super().readinto(buf, offset)
        finally:
            with self.lock:
                self.now -= 1
                self.bytes_now -= len(buf)


def test_trace_replay_keeps_a_window_of_bytes_in_flight_in_order(tmp_path):
    """With every range in flight at once they all share a slow link and the first the guest needs
    arrives with the last; the replay holds at most ``window`` bytes at once, taken in order (one
    range larger than the window still goes, alone)."""
    from obd.prefetch.trace import replay

    layer = sealed_from_ops(tmp_path, "l", [("w", 0, bytes([7]) * (SIZE // 2))])
    stack = Stack([layer])
    timed = _Timed(stack.files[0])
    stack.files[0] = timed
    page = 4096
    records = [(0, k * 4 * page, page) for k in range(24)] + [(0, 100 * page, 12 * page)]
    res = replay(stack, records, workers=16, window=3 * page)
    assert res.ranges == 25 and res.bytes == 36 * page
    assert timed.most <= 3 and timed.most_bytes <= 12 * page  # three pages, or the big one alone
    # taken in order: each read starts among the three (the window) due next; the big one last
    assert all(abs(timed.order.index(k * 4 * page) - k) < 3 for k in range(24))
    assert timed.order[-1] == 100 * page
    wide = _Timed(stack.files[0])
    stack.files[0] = wide
    replay(stack, records, workers=16, window=1 << 30)
    assert wide.most >= 4
