"""Sealed layers, stacks, commits and seals against the blobs overlaybd made (fixtures/overlaybd/lsmt)."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import shutil

import pytest

from fixtures import FIXTURES
from obd.errors import FormatError, TruncatedError
from obd.io.source import BytesSource, FileSource
from obd.lsmt.commit import layer_info, seal_in_place, write_sealed
from obd.lsmt.format import HT_SPACE, HeaderTrailer
from obd.lsmt.rw import open_rw
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack

LSMT = FIXTURES / "overlaybd" / "lsmt"
FACTS = LSMT.parent / "facts"
UUIDS = {
    "L0": "11111111-1111-4111-8111-111111111111",
    "L1": "22222222-2222-4222-8222-222222222222",
    "L2": "33333333-3333-4333-8333-333333333333",
}
PARENTS = {"L0": None, "L1": UUIDS["L0"], "L2": UUIDS["L1"]}
DEVICE = {
    "L0": "8c3546e44c9304948d078f42234c2a38be4be018edfb0800ea9e2009ab46d609",
    "L0L1": "096c0f28991a34e928d80559a1231a9cdd52402c7a39b216ca9ed0d22c6e6a3e",
    "L0L1L2": "7e3ad718b2a31ec2b7b1cfa1bc04a262a16079afda2459ec276efcc8dded970b",
    "L1": "8fa11be45a2c2cdae24b7f0f90dd58ea0525f2ba940b08d516147eb10eb7d62d",
}


def blob(name: str) -> bytes:
    p = LSMT / name
    if p.exists():
        return p.read_bytes()
    return bz2.decompress((LSMT / (name + ".bz2")).read_bytes())


def layer(name: str) -> SealedLayer:
    return SealedLayer(BytesSource(blob(name), name))


def device_sha(stack: Stack) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    pos = 0
    while pos < stack.size:
        n = stack.readinto(view, pos)
        h.update(view[:n])
        pos += n
    return h.hexdigest()


@pytest.fixture()
def rw_copy(tmp_path):
    """Writable copies of the RW fixture layers (L0's data file is stored bz2)."""
    for n in ("L0.index", "L1.data", "L1.index", "L2.data", "L2.index"):
        shutil.copy(LSMT / "rw" / n, tmp_path / n)
    (tmp_path / "L0.data").write_bytes(bz2.decompress((LSMT / "rw" / "L0.data.bz2").read_bytes()))
    return tmp_path


@pytest.mark.parametrize(
    "names, key",
    [
        (["commit/L0.commit"], "L0"),
        (["commit/L0.commit", "commit/L1.commit"], "L0L1"),
        (["commit/L0.commit", "commit/L1.commit", "commit/L2.commit"], "L0L1L2"),
        (["commit/L0.commit", "seal/L1.sealed", "commit/L2.commit"], "L0L1L2"),
        (["commit/L0.commit", "commit/L1.commit", "commit/L2.msg.commit"], "L0L1L2"),
        (["commit/L0.commit", "seal/L1.from-sealed.commit"], "L0L1"),
        (["seal/L1.sealed"], "L1"),
    ],
)
def test_stack_device_sha(names, key):
    assert device_sha(Stack([layer(n) for n in names])) == DEVICE[key]


@pytest.mark.parametrize(
    "key, names",
    [
        ("L0", ["commit/L0.commit"]),
        ("L0L1", ["commit/L0.commit", "commit/L1.commit"]),
        ("L0L1L2", ["commit/L0.commit", "commit/L1.commit", "commit/L2.commit"]),
    ],
)
def test_merged_index_and_extents_match_overlaybd(key, names):
    stack = Stack([layer(n) for n in names])
    facts = json.loads((FACTS / f"lsmt_{key}.mergedindex.json").read_text())
    assert facts["vsize"] == stack.size
    ours = [
        {"offset": o, "length": ln, "moffset": m, "zeroed": int(z), "tag": t}
        for o, ln, m, z, t in stack.lower_index
    ]
    assert ours == facts["index"]
    extents = json.loads((FACTS / f"lsmt_{key}.extents.json").read_text())
    for e in extents:
        data = stack.pread(e["offset"] * 512, e["length"] * 512)
        assert hashlib.sha256(data).hexdigest() == e["sha256"], e


def test_sealed_layer_fields():
    ly = layer("commit/L2.msg.commit")
    assert ly.header.flags == 0x07 and ly.trailer.flags == 0x06
    assert ly.uuid == UUIDS["L2"] and ly.parent_uuid == UUIDS["L1"]
    assert ly.user_tag == "hello commit message"
    assert ly.virtual_size == 64 << 20
    assert ly.counts.slots == 256 and ly.counts.valid + ly.counts.padding == 256
    sealed = layer("seal/L1.sealed")
    assert sealed.header.flags == 0x03 and sealed.trailer.flags == 0x06  # close-sealed: header untouched
    assert sealed.counts.padding == 0


@pytest.mark.parametrize("name", ["L0", "L1", "L2"])
def test_commit_is_byte_identical_to_overlaybd(rw_copy, name):
    rw = open_rw(str(rw_copy / f"{name}.data"), str(rw_copy / f"{name}.index"), readonly=True)
    out = io.BytesIO()
    header = layer_info(rw.header.virtual_size, uuid=UUIDS[name], parent_uuid=PARENTS[name] or rw.parent_uuid)
    write_sealed(out, rw.dump(), rw.files, header)
    assert out.getvalue() == blob(f"commit/{name}.commit")
    if name == "L2":
        out = io.BytesIO()
        write_sealed(out, rw.dump(), rw.files, header.with_(user_tag=b"hello commit message"))
        assert out.getvalue() == blob("commit/L2.msg.commit")
    rw.close()


def test_rw_replay_matches_overlaybd_in_memory_index(rw_copy):
    for name in ("L0", "L1", "L2"):
        rw = open_rw(str(rw_copy / f"{name}.data"), str(rw_copy / f"{name}.index"), readonly=True)
        facts = json.loads((LSMT / "rw" / f"{name}.rwindex.json").read_text())
        assert [
            {"offset": o, "length": ln, "moffset": m, "zeroed": int(z), "tag": 0}
            for o, ln, m, z, _ in rw.dump()
        ] == facts["index"]
        rw.close()


def test_seal_matches_overlaybd_except_uninitialised_padding(rw_copy):
    trailer = seal_in_place(open_rw(str(rw_copy / "L1.data"), str(rw_copy / "L1.index")))
    ours = (rw_copy / "L1.data").read_bytes()
    theirs = blob("seal/L1.sealed")
    assert len(ours) == len(theirs)
    pad_start = trailer.index_offset + trailer.index_size * 16
    pad_end = len(theirs) - HT_SPACE
    assert ours[:pad_start] == theirs[:pad_start]
    assert ours[pad_end:] == theirs[pad_end:]
    assert ours[pad_start:pad_end] == bytes(pad_end - pad_start)  # C++ leaves garbage there


def test_commit_of_a_sealed_layer_matches_overlaybd():
    sealed = layer("seal/L1.sealed")
    out = io.BytesIO()
    write_sealed(
        out,
        list(sealed.index),
        sealed.files,
        layer_info(sealed.header.virtual_size, uuid=UUIDS["L1"], parent_uuid=UUIDS["L0"]),
    )
    assert out.getvalue() == blob("seal/L1.from-sealed.commit")


def test_recompacting_a_compacted_layer_keeps_its_index():
    ly = layer("commit/L0.commit")
    out = io.BytesIO()
    write_sealed(out, list(ly.index), ly.files, layer_info(ly.virtual_size, uuid=UUIDS["L0"]))
    again = SealedLayer(BytesSource(out.getvalue()))
    assert list(again.index) == list(ly.index)
    assert out.getvalue() == blob("commit/L0.commit")


def test_empty_layer_commit_matches_overlaybd():
    ly = layer("cli-create/empty1g.commit")
    assert len(ly.index) == 0 and ly.counts.slots == 0
    out = io.BytesIO()
    write_sealed(out, [], [], layer_info(1 << 30, uuid="44444444-4444-4444-8444-444444444444"))
    assert out.getvalue() == blob("cli-create/empty1g.commit")
    out = io.BytesIO()
    write_sealed(out, [], [], layer_info(1 << 30))
    assert out.getvalue() == blob("cli-create/empty1g.nouuid.commit")


# --- hardening: every check of the sealed reader, on mutated copies of a real blob ---------------------


def mutate_trailer(raw: bytes, **fields) -> bytes:
    t = HeaderTrailer.parse(raw[-HT_SPACE:], what="trailer").with_(**fields)
    return raw[:-HT_SPACE] + t.pack()


def test_rejects_trailer_without_sealed_bit():
    raw = mutate_trailer(blob("commit/L1.commit"), flags=0x02)
    with pytest.raises(FormatError, match="trailer.flags"):
        SealedLayer(BytesSource(raw, "x"))


def test_rejects_index_past_trailer_and_oversized_index():
    raw = blob("commit/L1.commit")
    t = HeaderTrailer.parse(raw[-HT_SPACE:])
    with pytest.raises(FormatError, match="does not fit before the trailer"):
        SealedLayer(BytesSource(mutate_trailer(raw, index_size=t.index_size + 1), "x"))
    with pytest.raises(FormatError, match="1000000"):
        SealedLayer(BytesSource(mutate_trailer(raw, index_size=1_000_001), "x"))
    with pytest.raises(FormatError, match="index_offset"):
        SealedLayer(BytesSource(mutate_trailer(raw, index_offset=len(raw) * 2), "x"))


def test_rejects_overlapping_entries_and_bad_moffsets():
    raw = bytearray(blob("commit/L1.commit"))
    t = HeaderTrailer.parse(bytes(raw[-HT_SPACE:]))
    first = t.index_offset
    bad = bytearray(raw)
    bad[first + 16 : first + 32] = raw[first : first + 16]  # entry 1 = entry 0: overlap
    with pytest.raises(FormatError, match="overlap"):
        SealedLayer(BytesSource(bytes(bad), "x"))
    bad = bytearray(raw)
    bad[first + 8 : first + 15] = (t.index_offset // 512 + 5).to_bytes(7, "little")  # moffset past data
    with pytest.raises(FormatError, match="moffset"):
        SealedLayer(BytesSource(bytes(bad), "x"))


def test_rejects_truncation_and_non_lsmt():
    raw = blob("commit/L1.commit")
    for cut in (0, 100, 4096, 8191, len(raw) - 1):
        with pytest.raises((FormatError, TruncatedError)):
            SealedLayer(BytesSource(raw[:cut], "x"))
    with pytest.raises(FormatError, match="an RW index file"):
        SealedLayer(FileSource(LSMT / "cli-create" / "rw1g.index"))
