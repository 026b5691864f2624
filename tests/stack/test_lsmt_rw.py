"""RW layers in both flavours: writes, trims, reopen/replay, torn tails, sparse hole maps, crash safety."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import random
import signal
from pathlib import Path

import pytest

from fixtures import FIXTURES
from obd.errors import AlignmentError, FormatError, LayerStateError
from obd.lsmt.format import HT_SPACE, INVALID_ENTRY, MAX_LENGTH, decode_mappings, encode_mapping
from obd.lsmt.rw import AppendRWLayer, SparseRWLayer, create_rw, open_rw
from obd.lsmt.stack import Stack

ROOT = FIXTURES / "overlaybd"
MiB = 1 << 20


def make_inputs():
    spec = importlib.util.spec_from_file_location("make_inputs", ROOT / "make_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def records(index_path) -> list[tuple]:
    raw = Path(index_path).read_bytes()[HT_SPACE:]
    c = decode_mappings(raw)
    return list(zip(c.offset.tolist(), c.length.tolist(), c.moffset.tolist(), c.zeroed.tolist(), strict=True))


@pytest.fixture(params=["append", "sparse"])
def flavour(request):
    return request.param


def new_layer(tmp_path, flavour, vsize=64 * MiB):
    return create_rw(
        str(tmp_path / "data"),
        str(tmp_path / "index"),
        vsize,
        sparse=flavour == "sparse",
        uuid="11111111-1111-4111-8111-111111111111",
    )


def reopen(tmp_path, **kw):
    return open_rw(str(tmp_path / "data"), str(tmp_path / "index"), **kw)


def test_create_writes_overlaybd_headers(tmp_path):
    ly = new_layer(tmp_path, "append")
    ly.close()
    data = (tmp_path / "data").read_bytes()
    index = (tmp_path / "index").read_bytes()
    assert len(data) == len(index) == HT_SPACE
    assert data[28] == 0x03 and index[28] == 0x01
    assert int.from_bytes(index[32:40], "little") == HT_SPACE  # index_offset
    (tmp_path / "s").mkdir()
    new_layer(tmp_path / "s", "sparse").close()
    sdata = tmp_path / "s" / "data"
    assert sdata.stat().st_size == 64 * MiB + HT_SPACE and sdata.read_bytes()[28] == 0x13
    assert (tmp_path / "s" / "index").stat().st_size == 0


def test_writes_read_back_and_survive_reopen(tmp_path, flavour):
    ly = new_layer(tmp_path, flavour)
    rng = random.Random(3)
    model = bytearray(64 * MiB)
    for _ in range(200):
        off = rng.randrange(0, 64 * MiB // 512 - 64) * 512
        n = rng.randrange(1, 64) * 512
        if rng.random() < 0.25:
            ly.trim(off, n)
            model[off : off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            ly.pwrite(data, off)
            model[off : off + n] = data
    ly.close()
    for readonly in (True, False):
        ly = reopen(tmp_path, readonly=readonly)
        st = Stack([], ly)
        assert hashlib.sha256(st.pread(0, st.size)).digest() == hashlib.sha256(model).digest()
        ly.close()


def test_append_replay_equals_memory_and_records_are_a_log(tmp_path):
    ly = new_layer(tmp_path, "append")
    ly.pwrite(b"a" * 4096, 0)
    ly.pwrite(b"b" * 1024, 1024)
    ly.trim(8192, 4096)
    ly.pwrite(b"c" * 4096, 0)  # rewrite: appended again, garbage left behind
    before = ly.dump()
    ly.close()
    assert records(tmp_path / "index") == [
        (0, 8, 8, False),
        (2, 2, 16, False),
        (16, 8, 18, True),
        (0, 8, 18, False),
    ]
    assert (tmp_path / "data").stat().st_size == HT_SPACE + 4096 + 1024 + 4096
    ly = reopen(tmp_path)
    assert ly.dump() == before
    ly.close()


def test_large_writes_and_trims_are_split(tmp_path):
    ly = new_layer(tmp_path, "append")
    ly.pwrite(bytes(9 * MiB), 0)
    ly.trim(16 * MiB, (MAX_LENGTH + 10) * 512)
    ly.close()
    recs = records(tmp_path / "index")
    assert [r[1] for r in recs] == [8192, 8192, 2048, MAX_LENGTH, 10]


def test_alignment_and_readonly_are_enforced(tmp_path, flavour):
    ly = new_layer(tmp_path, flavour)
    with pytest.raises(AlignmentError):
        ly.pwrite(b"x" * 100, 0)
    with pytest.raises(AlignmentError):
        ly.trim(512, 100)
    ly.close()
    ly = reopen(tmp_path, readonly=True)
    with pytest.raises(LayerStateError, match="read-only"):
        ly.pwrite(bytes(512), 0)
    ly.close()


def test_torn_tail_is_ignored_damage_elsewhere_is_refused(tmp_path):
    ly = new_layer(tmp_path, "append")
    for k in range(4):
        ly.pwrite(bytes([k + 1]) * 4096, k * 4096)
    ly.close()
    index = tmp_path / "index"
    good = index.read_bytes()
    # a partial record at the end is ignored
    index.write_bytes(good + b"\x01\x02\x03")
    ly = reopen(tmp_path)
    assert len(ly.dump()) == 4
    ly.pwrite(bytes(4096), 65536)  # appends after the last whole record
    ly.close()
    assert len(records(index)) == 5
    # records pointing past the end of the data file (data lost in a power cut) are a torn tail
    index.write_bytes(good + encode_mapping(64, 8, 1000, False) + encode_mapping(72, 8, 1008, False))
    ly = reopen(tmp_path)
    assert ly.dropped_records == 2 and len(ly.dump()) == 4
    ly.close()
    assert index.stat().st_size == len(good)
    # ...but a bad record followed by good ones is damage, not a torn tail
    index.write_bytes(good[:HT_SPACE] + encode_mapping(64, 8, 1000, False) + good[HT_SPACE:])
    with pytest.raises(FormatError, match=r"index\[0\]\.moffset"):
        reopen(tmp_path)
    # INVALID (padding) records are skipped
    index.write_bytes(good + INVALID_ENTRY)
    ly = reopen(tmp_path)
    assert len(ly.dump()) == 4
    ly.close()


def test_rw_index_header_is_checked(tmp_path):
    ly = new_layer(tmp_path, "append")
    ly.close()
    (tmp_path / "index").write_bytes((tmp_path / "data").read_bytes())  # a data header in the index file
    with pytest.raises(FormatError, match="not an RW index file"):
        reopen(tmp_path)


def sparse_extents(path):
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            b = os.lseek(fd, a, os.SEEK_HOLE)
            out.append(
                {"offset": a, "length": b - a, "sha256": hashlib.sha256(os.pread(fd, b - a, a)).hexdigest()}
            )
            pos = b
    finally:
        os.close(fd)
    return out


@pytest.mark.parametrize("name", ["L0", "L1", "L2"])
def test_sparse_layer_file_equals_overlaybds(tmp_path, name):
    """The same ops through a sparse RW layer give the same data file (holes included) as overlaybd's."""
    mi = make_inputs()
    ly = SparseRWLayer.create(
        str(tmp_path / "data"),
        mi.LSMT_VSIZE,
        index_path=str(tmp_path / "index"),
        uuid="11111111-1111-4111-8111-111111111111",
    )
    for op in mi.LSMT_OPS[name]:
        if op[0] == "write":
            ly.pwrite(mi.LSMT_PAYLOADS[op[2]](), op[1])
        else:
            ly.trim(op[1], op[2])
    ly.close()
    facts = json.loads((ROOT / "facts" / "sparse_maps.json").read_text())[f"lsmt/rw-sparse/{name}.data"]
    assert (tmp_path / "data").stat().st_size == facts["apparent_size"]
    ours = sparse_extents(tmp_path / "data")
    # the header block differs (uuid); everything after it must be the same bytes in the same places
    assert [(e["offset"], e["length"]) for e in ours] == [
        (e["offset"], e["length"]) for e in facts["data_extents"]
    ]
    assert [e["sha256"] for e in ours[1:]] == [e["sha256"] for e in facts["data_extents"][1:]]


def test_sparse_discard_is_forgotten_after_reopen(tmp_path):
    """overlaybd's documented behaviour: a trimmed range of a sparse layer becomes unmapped on reopen."""
    ly = SparseRWLayer.create(str(tmp_path / "data"), 1 * MiB)
    ly.pwrite(b"x" * 8192, 0)
    ly.trim(0, 4096)
    assert [m[3] for m in ly.dump()] == [True, False]  # zeroed in memory
    ly.close()
    ly = open_rw(str(tmp_path / "data"))
    assert [(m[0], m[1], m[3]) for m in ly.dump()] == [(8, 8, False)]
    ly.close()


def _crash_writer(data, index, conn):
    ly = AppendRWLayer.open(data, index)
    rng = random.Random(os.getpid())
    k = 0
    while True:
        ly.pwrite(rng.randbytes(4096) if k % 3 else bytes([k % 251 + 1]) * 4096, k * 4096)
        k += 1
        if k % 8 == 0:
            ly.flush()
            conn.send(k)


def test_flushed_writes_survive_kill_9(tmp_path):
    """Writes acknowledged before the last completed flush read back after SIGKILL, 20 times over."""
    ly = new_layer(tmp_path, "append", vsize=256 * MiB)
    ly.close()
    ctx = mp.get_context("fork")
    rng = random.Random(11)
    for _ in range(20):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_crash_writer, args=(str(tmp_path / "data"), str(tmp_path / "index"), child)
        )
        proc.start()
        flushed = 0
        target = rng.randrange(1, 6)
        while parent.poll(10) and target > 0:
            flushed = parent.recv()
            target -= 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        while parent.poll():
            flushed = parent.recv()
        ly = reopen(tmp_path)
        st = Stack([], ly)
        got = st.pread(0, flushed * 4096)
        # each round overwrites from block 0; the data of every flushed block must be intact and complete
        assert len(got) == flushed * 4096
        for k in range(0, flushed, 3):
            assert got[k * 4096 : (k + 1) * 4096] == bytes([k % 251 + 1]) * 4096
        ly.close()
