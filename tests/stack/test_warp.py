"""turboOCI (warp) layers: the RW layer, the ``--fastoci`` commit, and reads alone and in stacks.

The turboOCI blobs overlaybd made are kept back for acceptance checks, so these tests build warp
layers with obd itself, from the real fixture tar ``inputs/tar/layer1.tar`` (and its ``.tar.gz``),
the way ``turboOCI-apply`` does: some "metadata" blocks written with ``pwrite`` and, for every
regular file of the tar, ``RemoteData`` registrations pointing its device extents at the file's
bytes inside the uncompressed tar stream. Every result is compared with an independent model (a
byte array plus a per-sector record of what the layer maps). Two checks use overlaybd's own
output through ``facts/blob_facts.json``: the committed index of the ``l1gz`` conversion is
rebuilt exactly from its RW index records, and a fresh ``--turboOCI`` index file matches
``overlaybd-create``'s byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from fixtures import FIXTURES
from obd.errors import AlignmentError, FormatError, ObdError
from obd.formats.gzindex import build_gzip_index
from obd.image.config import ImageConfig, LowerConfig, UpperConfig
from obd.image.local import open_config, open_layer, open_target
from obd.io.source import BytesSource, FileSource
from obd.layer.blob import open_blob
from obd.layer.tools import OutputOptions, commit_layer, commit_warp_layer
from obd.lsmt.format import (
    FLAGS_RW_INDEX,
    FLAGS_SEALED_HEADER,
    FLAGS_SEALED_TRAILER,
    HT_SPACE,
    MAX_LENGTH,
    NULL_UUID,
    SECTOR,
    HeaderTrailer,
    decode_mappings,
    encode_mapping,
)
from obd.lsmt.rw import create_rw
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack
from obd.lsmt.warp import WarpRWLayer, commit_warp

FIX = FIXTURES / "overlaybd"
TAR = FIX / "inputs" / "tar" / "layer1.tar"
TGZ = FIX / "inputs" / "tar" / "layer1.tar.gz"
FACTS = FIX / "facts" / "blob_facts.json"

MiB = 1 << 20
VSIZE = 64 * MiB
BLOCK = 4096
NSEC = VSIZE // SECTOR


# --- the model -----------------------------------------------------------------------------------

NONE, META, REMOTE, ZERO = 0, 1, 2, 3


class Model:
    """What a warp layer should read as: device bytes, and per sector who maps it (and from where)."""

    def __init__(self, target: bytes):
        self.target = target
        self.dev = np.zeros(VSIZE, np.uint8)
        self.kind = np.zeros(NSEC, np.int8)
        self.rsec = np.full(NSEC, -1, np.int64)  # target sector of each remote sector

    def meta(self, off: int, data: bytes) -> None:
        self.dev[off : off + len(data)] = np.frombuffer(data, np.uint8)
        s = slice(off // SECTOR, (off + len(data)) // SECTOR)
        self.kind[s] = META
        self.rsec[s] = -1

    def remote(self, off: int, count: int, roffset: int) -> None:
        piece = self.target[roffset : roffset + count]
        piece += bytes(count - len(piece))  # past the end of the target: zeros
        self.dev[off : off + count] = np.frombuffer(piece, np.uint8)
        s = off // SECTOR
        n = count // SECTOR
        self.kind[s : s + n] = REMOTE
        self.rsec[s : s + n] = np.arange(roffset // SECTOR, roffset // SECTOR + n)

    def trim(self, off: int, length: int) -> None:
        self.dev[off : off + length] = 0
        s = slice(off // SECTOR, (off + length) // SECTOR)
        self.kind[s] = ZERO
        self.rsec[s] = -1

    @property
    def mapped(self) -> np.ndarray:
        return self.kind != NONE

    def runs(self) -> list[tuple[int, int]]:
        """Byte ranges ``(offset, length)`` of consecutive mapped sectors."""
        m = np.concatenate(([False], self.mapped, [False])).astype(np.int8)
        edges = np.nonzero(np.diff(m))[0]
        return [(int(a) * SECTOR, int(b - a) * SECTOR) for a, b in zip(edges[::2], edges[1::2], strict=True)]

    def over(self, lower: np.ndarray) -> np.ndarray:
        """This layer stacked on a lower device: mapped sectors (data or zeroed) hide the lower."""
        out = lower.copy()
        mask = np.repeat(self.mapped, SECTOR)
        out[mask] = self.dev[mask]
        return out


def tar_regular_files(path: Path) -> list[tuple[str, int, int]]:
    """``(name, data offset in the uncompressed tar, size)`` of every regular file."""
    with tarfile.open(path) as tf:
        return [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isreg()]


def turbo_ops(seed: int = 1234) -> list[tuple]:
    """Operations as turboOCI-apply would issue them for layer1.tar, plus overwrites across kinds.

    Per regular file: ``fallocate`` + ``fiemap`` gives 4 KiB-block extents, and each extent becomes
    ``RemoteData(offset=physical, count=min(extent, rest of the size rounded up to 512),
    roffset=data offset in the tar advancing by count)``.
    """
    rng = random.Random(seed)
    ops: list[tuple] = []

    def meta(off: int, n: int) -> None:
        ops.append(("meta", off, rng.randbytes(n)))

    meta(0, BLOCK)  # superblock
    meta(BLOCK, 2 * BLOCK)  # group descriptors
    meta(1 * MiB, 64 * 1024)  # an inode table
    meta(2 * MiB + 3 * SECTOR, SECTOR)  # a lone sector
    alloc = 16 * MiB
    extents_of: dict[str, list[int]] = {}
    for i, (name, data_off, size) in enumerate(tar_regular_files(TAR)):
        if size == 0:
            continue
        blocks = -(-size // BLOCK)
        split = [40, blocks - 40] if name == "data/big.bin" else [blocks]
        rest = -(-size // SECTOR) * SECTOR
        roff = data_off
        extents_of[name] = []
        for nblk in split:
            count = min(nblk * BLOCK, rest)
            ops.append(("remote", alloc, count, roff))
            extents_of[name].append(alloc)
            roff += count
            rest -= count
            alloc += nblk * BLOCK + (MiB if name == "data/big.bin" else 0)
        meta(3 * MiB + i * BLOCK, BLOCK)  # the file's directory entry / inode block
    tool = extents_of["bin/tool"][0]
    meta(tool + 5 * SECTOR, SECTOR)  # metadata written over the middle of a remote mapping
    ops.append(("remote", 1 * MiB + 8 * SECTOR, 3 * SECTOR, 1024))  # remote over part of the inode table
    ops.append(("trim", 1 * MiB + 60 * 1024, 8 * 1024))  # a discard across meta and unmapped sectors
    ops.append(("trim", extents_of["data/zeros.bin"][0] + BLOCK, BLOCK))  # a discard inside a remote run
    meta(30 * MiB, 9 * MiB)  # a big metadata run (more than 16383 sectors when committed)
    return ops


def apply_ops(layer: WarpRWLayer, model: Model, ops: list[tuple], stack: Stack | None = None) -> None:
    """Run ``ops`` on the layer (through ``stack`` if given) and on the model."""
    for op in ops:
        if op[0] == "meta":
            _, off, data = op
            (stack or layer).pwrite(data, off)
            model.meta(off, data)
        elif op[0] == "remote":
            _, off, count, roff = op
            assert layer.register_remote(off, count, roff) == count
            model.remote(off, count, roff)
        else:
            _, off, length = op
            (stack or layer).trim(off, length)
            model.trim(off, length)


def read_all(src) -> bytes:
    buf = bytearray(src.size)
    assert src.readinto(memoryview(buf), 0) == src.size
    return bytes(buf)


def assert_device(dev, model_bytes: np.ndarray, runs: list[tuple[int, int]]) -> None:
    """Every mapped range byte-exact (for a readable failure), then the SHA-256 of the whole device."""
    assert dev.size == VSIZE
    for off, n in runs:
        got = dev.pread(off, n)
        want = model_bytes[off : off + n].tobytes()
        if got != want:
            bad = next(i for i in range(n) if got[i] != want[i])
            pytest.fail(f"device differs at byte {off + bad} (run [{off}, +{n}))")
    assert hashlib.sha256(read_all(dev)).hexdigest() == hashlib.sha256(model_bytes.tobytes()).hexdigest()


def rw_records(index_path) -> list[tuple[int, int, int, bool, int]]:
    raw = Path(index_path).read_bytes()[HT_SPACE:]
    c = decode_mappings(raw)
    return list(
        zip(
            c.offset.tolist(),
            c.length.tolist(),
            c.moffset.tolist(),
            c.zeroed.tolist(),
            c.tag.tolist(),
            strict=True,
        )
    )


def blob_parts(lsmt: bytes) -> tuple[HeaderTrailer, HeaderTrailer, list[tuple[int, int, int, bool, int]]]:
    """Header, trailer and raw index entries (on-disk tags) of a plain sealed blob."""
    head = HeaderTrailer.parse(lsmt[:HT_SPACE])
    trailer = HeaderTrailer.parse(lsmt[-HT_SPACE:])
    raw = lsmt[trailer.index_offset : trailer.index_offset + 16 * trailer.index_size]
    c = decode_mappings(raw)
    entries = list(
        zip(
            c.offset.tolist(),
            c.length.tolist(),
            c.moffset.tolist(),
            c.zeroed.tolist(),
            c.tag.tolist(),
            strict=True,
        )
    )
    return head, trailer, entries


# --- shared inputs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_bytes() -> bytes:
    data = TAR.read_bytes()
    assert gzip.decompress(TGZ.read_bytes()) == data  # the .tar.gz is the same stream
    return data


@pytest.fixture(scope="module")
def gz_index(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gz") / "gzip.meta"
    build_gzip_index(str(TGZ), str(path))
    return str(path)


@pytest.fixture(scope="module")
def lower(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A normal committed layer under the warp layers, and its device bytes."""
    d = tmp_path_factory.mktemp("lower")
    rng = random.Random(99)
    dev = np.zeros(VSIZE, np.uint8)
    rw = create_rw(str(d / "data"), str(d / "index"), VSIZE)
    # overlaps superblock, inode table, a lone sector's neighbours, file data, and free space
    for off, n in [
        (0, 64 * 1024),
        (MiB, 128 * 1024),
        (2 * MiB, 8 * BLOCK),
        (16 * MiB, 2 * MiB),
        (50 * MiB, MiB),
    ]:
        data = rng.randbytes(n)
        rw.pwrite(data, off)
        dev[off : off + n] = np.frombuffer(data, np.uint8)
    commit_layer(rw, str(d / "lower.commit"))
    rw.close()
    return str(d / "lower.commit"), dev


@pytest.fixture(scope="module")
def built(tmp_path_factory, target_bytes) -> dict:
    """One warp RW layer over layer1.tar, committed plain and with ``-z`` (lz4)."""
    d = tmp_path_factory.mktemp("warp")
    model = Model(target_bytes)
    layer = WarpRWLayer.create(str(d / "index"), str(d / "fsmeta"), VSIZE, target=FileSource(TAR))
    apply_ops(layer, model, turbo_ops())
    rw_dev = Stack([], layer)
    assert_device(rw_dev, model.dev, model.runs())
    plain = commit_warp_layer(layer, str(d / "ext4.fs.meta.plain"))
    lz4 = commit_warp_layer(layer, str(d / "ext4.fs.meta"), options=OutputOptions(compress="lz4"))
    records = rw_records(d / "index")
    dump = layer.dump()
    layer.close()
    return {"dir": d, "model": model, "plain": plain.path, "lz4": lz4.path, "records": records, "dump": dump}


# --- the RW layer --------------------------------------------------------------------------------


def test_create_matches_overlaybd_create(tmp_path):
    """``overlaybd-create --turboOCI`` of 1 GiB: index header only, fs-meta sparse with no header."""
    facts = json.loads(FACTS.read_text())["lsmt/cli-create/rw1g-turbo.index"]
    ref = (FIX / "lsmt" / "cli-create" / "rw1g-turbo.index").read_bytes()
    layer = WarpRWLayer.create(
        str(tmp_path / "index"), str(tmp_path / "data"), 1 << 30, uuid=facts["header"]["uuid"].lower()
    )
    layer.close()
    assert (tmp_path / "index").read_bytes() == ref
    st = os.stat(tmp_path / "data")
    assert st.st_size == 1 << 30
    assert st.st_blocks == 0  # nothing written, not even a header
    fresh = WarpRWLayer.create(str(tmp_path / "i2"), str(tmp_path / "d2"), VSIZE)
    fresh.close()
    h = HeaderTrailer.parse((tmp_path / "i2").read_bytes())
    assert h.flags == FLAGS_RW_INDEX and h.index_offset == HT_SPACE and h.index_size == 0
    assert h.uuid != NULL_UUID and h.uuid == h.uuid.upper() and h.parent_uuid == NULL_UUID


def expected_records(ops: list[tuple], rw_tag: int) -> list[tuple[int, int, int, bool, int]]:
    """The index-file records overlaybd appends for ``ops`` (none of them longer than 16383 sectors).

    fs-meta writes: ``{off, n, moffset = off, rw_tag}``, split at 4 MiB like every RW write;
    RemoteData: ``{off, n, roffset, rw_tag + 1}``; discards: ``{off, n, fs-meta file end, zeroed,
    rw_tag}``.
    """
    want = []
    for op in ops:
        if op[0] == "meta":
            s = op[1] // SECTOR
            n = len(op[2]) // SECTOR
            while n:
                k = min(n, 8192)
                want.append((s, k, s, False, rw_tag))
                s += k
                n -= k
        elif op[0] == "remote":
            want.append((op[1] // SECTOR, op[2] // SECTOR, op[3] // SECTOR, False, rw_tag + 1))
        else:
            want.append((op[1] // SECTOR, op[2] // SECTOR, VSIZE // SECTOR, True, rw_tag))
    return want


def test_rw_records_standalone(built):
    """Stand-alone, records carry tag 0 (fs-meta) and 1 (target), one per operation, in order."""
    assert built["records"] == expected_records(turbo_ops(), 0)


def test_rw_dump_matches_model(built):
    """The replayed index, sector by sector, is what the model says each sector maps to."""
    model = built["model"]
    kind = np.zeros(NSEC, np.int8)
    rsec = np.full(NSEC, -1, np.int64)
    for o, ln, m, z, t in built["dump"]:
        kind[o : o + ln] = ZERO if z else (REMOTE if t == 1 else META)
        if not z:
            if t == 1:
                rsec[o : o + ln] = np.arange(m, m + ln)
            else:
                assert m == o  # fs-meta lives at its own device offset
    assert np.array_equal(kind, model.kind)
    assert np.array_equal(rsec, model.rsec)


def test_reopen_replays_and_reads(built, target_bytes, tmp_path):
    d = built["dir"]
    layer = WarpRWLayer.open(str(d / "index"), str(d / "fsmeta"), target=FileSource(TAR), readonly=True)
    try:
        assert layer.dump() == built["dump"]
        model = built["model"]
        assert_device(Stack([], layer), model.dev, model.runs())
    finally:
        layer.close()


def test_register_remote_splits_long_runs(tmp_path):
    """RemoteData longer than 16383 sectors becomes several records; the commit keeps them apart."""
    big = random.Random(5).randbytes(10 * MiB + 12345)
    tar_path = tmp_path / "big.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("big")
        info.size = len(big)
        tf.addfile(info, io.BytesIO(big))
    (_name, data_off, size) = tar_regular_files(tar_path)[0]
    target = tar_path.read_bytes()
    count = -(-size // SECTOR) * SECTOR
    layer = WarpRWLayer.create(
        str(tmp_path / "index"), str(tmp_path / "fsmeta"), VSIZE, target=FileSource(tar_path)
    )
    model = Model(target)
    apply_ops(layer, model, [("remote", 4 * MiB, count, data_off), ("meta", 0, bytes(range(256)) * 16)])
    recs = rw_records(tmp_path / "index")
    n = count // SECTOR
    assert recs[:-1] == [
        (8192, MAX_LENGTH, data_off // SECTOR, False, 1),
        (8192 + MAX_LENGTH, n - MAX_LENGTH, data_off // SECTOR + MAX_LENGTH, False, 1),
    ]
    assert_device(Stack([], layer), model.dev, model.runs())
    out = tmp_path / "blob"
    commit_warp_layer(layer, str(out))
    layer.close()
    _, _, entries = blob_parts(out.read_bytes())
    assert [e for e in entries if e[4] == 1] == [r for r in recs if r[4] == 1]
    with closing(open_layer(out, target=str(tar_path))) as blob_layer:
        assert_device(Stack([blob_layer]), model.dev, model.runs())


def test_register_remote_needs_sector_alignment(tmp_path):
    layer = WarpRWLayer.create(str(tmp_path / "i"), str(tmp_path / "d"), VSIZE)
    with layer:
        for args in [(100, 512, 0), (0, 100, 0), (0, 512, 100)]:
            with pytest.raises(AlignmentError):
                layer.register_remote(*args)
        assert rw_records(tmp_path / "i") == []


# --- the --fastoci commit ------------------------------------------------------------------------


def test_commit_layout(built):
    """Flags 0x07/0x06, null uuids, no user tag, unpadded index, trailer right after it, tags 0/1."""
    lsmt = Path(built["plain"]).read_bytes()
    head, trailer, entries = blob_parts(lsmt)
    assert head.flags == FLAGS_SEALED_HEADER and head.index_offset == 0 and head.index_size == 0
    assert trailer.flags == FLAGS_SEALED_TRAILER
    for ht in (head, trailer):
        assert ht.virtual_size == VSIZE
        assert ht.uuid == NULL_UUID and ht.parent_uuid == NULL_UUID
        assert ht.user_tag == b""
    assert trailer.index_size == len(entries)  # no INVALID padding
    assert trailer.index_offset + 16 * trailer.index_size + HT_SPACE == len(lsmt)
    assert trailer.index_size % 256 != 0  # (so a padded index would have been visible)
    assert {e[4] for e in entries} == {0, 1}
    # fs-meta data is packed right after the header in index order; remote entries keep target sectors
    model = built["model"]
    pos = HT_SPACE // SECTOR
    for o, ln, m, z, t in entries:
        assert 0 < ln <= MAX_LENGTH
        if t == 1:
            assert not z
            assert np.array_equal(model.rsec[o : o + ln], np.arange(m, m + ln))
            continue
        assert m == pos
        if not z:
            assert np.all(model.kind[o : o + ln] == META)
            assert lsmt[m * SECTOR : (m + ln) * SECTOR] == model.dev[o * SECTOR : (o + ln) * SECTOR].tobytes()
            pos += ln
        else:
            assert np.all(model.kind[o : o + ln] == ZERO)
    assert pos * SECTOR == trailer.index_offset
    covered = np.zeros(NSEC, bool)
    for o, ln, *_ in entries:
        covered[o : o + ln] = True
    assert np.array_equal(covered, model.mapped)
    assert max(e[1] for e in entries if e[4] == 0) == 16320  # a long run, cut and compressed as usual


def test_commit_uuid_parent_and_lz4(built, tmp_path, target_bytes):
    d = built["dir"]
    layer = WarpRWLayer.open(str(d / "index"), str(d / "fsmeta"), readonly=True)
    with layer:
        res = commit_warp_layer(
            layer,
            str(tmp_path / "ids"),
            uuid="aaaaaaaa-0001-4000-8000-000000000001",
            parent_uuid="bbbbbbbb-0002-4000-8000-000000000002",
        )
    head, trailer, _ = blob_parts(Path(res.path).read_bytes())
    assert trailer.uuid == head.uuid == "AAAAAAAA-0001-4000-8000-000000000001"
    assert trailer.parent_uuid == head.parent_uuid == "BBBBBBBB-0002-4000-8000-000000000002"
    # -z: a ZFile holding exactly the plain commit
    blob = open_blob(built["lz4"])
    try:
        assert blob.kinds == ["zfile", "lsmt"]
        assert read_all(blob.source) == Path(built["plain"]).read_bytes()
    finally:
        blob.close()


def test_commit_reproduces_overlaybd_index(tmp_path):
    """The RW index records of overlaybd's ``l1gz`` conversion, committed by obd, give overlaybd's index.

    ``facts/blob_facts.json`` holds every record of ``turbooci/l1gz/writable_index`` (written while
    stacked on the base layer: tags 1 and 2) and the index of ``overlaybd-commit --turboOCI``'s
    output ``ext4.fs.meta.plain``. The fs-meta bytes are not kept, so a sparse file stands in:
    only the data differs, never the layout.
    """
    facts = json.loads(FACTS.read_text())
    rw = facts["turbooci/l1gz/writable_index"]
    ref = facts["turbooci/l1gz/ext4.fs.meta.plain"]
    assert {e["tag_on_disk"] for e in rw["rw_index_entries"]} == {1, 2}
    h = rw["header"]
    raw = HeaderTrailer(
        flags=h["flags"],
        index_offset=h["index_offset"],
        virtual_size=h["virtual_size"],
        uuid=h["uuid"],
        parent_uuid=h["parent_uuid"],
    ).pack() + b"".join(
        encode_mapping(e["offset"], e["length"], e["moffset"], bool(e["zeroed"]), e["tag_on_disk"])
        for e in rw["rw_index_entries"]
    )
    assert len(raw) == rw["file_size"]
    (tmp_path / "index").write_bytes(raw)
    with open(tmp_path / "fsmeta", "wb") as f:
        f.truncate(h["virtual_size"])
    with WarpRWLayer.open(str(tmp_path / "index"), str(tmp_path / "fsmeta"), readonly=True) as layer:
        assert {t for *_, t in layer.dump()} == {0, 1}  # normalised
        out = io.BytesIO()
        info = commit_warp(layer, out)
    lsmt = out.getvalue()
    head, trailer, entries = blob_parts(lsmt)
    assert len(lsmt) == ref["file_size"]
    for ht, want in ((head, ref["header"]), (trailer, ref["trailer"])):
        for key in ("flags", "index_offset", "index_size", "virtual_size", "uuid", "parent_uuid"):
            assert getattr(ht, key) == want[key], key
    assert info.entries == ref["index_entries_valid"] and ref["index_entries_padding"] == 0
    assert [
        {"offset": o, "length": ln, "moffset": m, "zeroed": int(z), "tag_on_disk": t}
        for o, ln, m, z, t in entries
    ] == ref["index"]


def test_overlaybd_l2_records_normalise(tmp_path):
    """``l2`` was converted on base + l1gz: records carry tags 2/3, which open as 0/1."""
    rw = json.loads(FACTS.read_text())["turbooci/l2/writable_index"]
    recs = rw["rw_index_entries"]
    assert {e["tag_on_disk"] for e in recs} == {2, 3}
    raw = HeaderTrailer(flags=FLAGS_RW_INDEX, index_offset=HT_SPACE, virtual_size=VSIZE).pack() + b"".join(
        encode_mapping(e["offset"], e["length"], e["moffset"], bool(e["zeroed"]), e["tag_on_disk"])
        for e in recs
    )
    (tmp_path / "index").write_bytes(raw)
    (tmp_path / "fsmeta").write_bytes(b"")
    with WarpRWLayer.open(str(tmp_path / "index"), str(tmp_path / "fsmeta"), readonly=True) as layer:
        remote = {(o, ln, m) for o, ln, m, _z, t in layer.dump() if t == 1}
    assert remote == {(e["offset"], e["length"], e["moffset"]) for e in recs if e["tag_on_disk"] == 3}


# --- reading committed warp blobs ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "lz4"])
def test_blob_reads_alone(built, which):
    model = built["model"]
    with closing(open_layer(built[which], target=str(TAR))) as layer:
        assert layer.warp and len(layer.files) == 2
        assert_device(Stack([layer]), model.dev, model.runs())


@pytest.mark.parametrize("which", ["plain", "lz4"])
def test_blob_reads_alone_gzip_target(built, gz_index, which):
    model = built["model"]
    with closing(open_layer(built[which], target=str(TGZ), gzip_index=gz_index)) as layer:
        assert_device(Stack([layer]), model.dev, model.runs())


def _config(tmp_path: Path, lowers: list[LowerConfig], upper: UpperConfig | None = None) -> str:
    cfg = ImageConfig(lowers=lowers, upper=upper or UpperConfig())
    path = tmp_path / "config.v1.json"
    cfg.save(path)
    return str(path)


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "targz"])
def test_blob_stacked_in_config(built, lower, gz_index, tmp_path, gz):
    """config.v1.json: a normal bottom layer, the warp blob (``targetFile`` [+ ``gzipIndex``]) on top."""
    lower_path, lower_dev = lower
    warp = LowerConfig(
        file=built["lz4"], targetFile=str(TGZ if gz else TAR), gzipIndex=gz_index if gz else ""
    )
    model = built["model"]
    with open_config(_config(tmp_path, [LowerConfig(file=lower_path), warp])) as stack:
        assert len(stack.files) == 3  # lower blob, warp blob, target
        assert_device(stack, model.over(lower_dev), model.runs())


def test_blob_as_lower_under_rw_upper(built, lower, tmp_path):
    """The warp blob as a lower of a writable device: writes land in the normal RW upper."""
    lower_path, lower_dev = lower
    model = built["model"]
    expect = model.over(lower_dev)
    up = create_rw(str(tmp_path / "data"), str(tmp_path / "index"), 0)
    up.close()
    cfg = _config(
        tmp_path,
        [LowerConfig(file=lower_path), LowerConfig(file=built["plain"], targetFile=str(TAR))],
        UpperConfig(index=str(tmp_path / "index"), data=str(tmp_path / "data")),
    )
    rng = random.Random(7)
    with open_config(cfg) as stack:
        assert stack.size == VSIZE  # inherited from the warp layer
        tool = next(off for off, n in model.runs() if off >= 16 * MiB)
        for off, n in [(tool + 100, 3000), (1 * MiB + 4096, 512), (40 * MiB, 70000)]:
            data = rng.randbytes(n)
            stack.pwrite(data, off)
            expect[off : off + n] = np.frombuffer(data, np.uint8)
        stack.zero(BLOCK, BLOCK)
        expect[BLOCK : 2 * BLOCK] = 0
        assert hashlib.sha256(read_all(stack)).digest() == hashlib.sha256(expect.tobytes()).digest()
        assert {t for *_, t in stack.upper.dump()} == {3}  # slot of the RW data file
    assert {r[4] for r in rw_records(tmp_path / "index")} == {2}  # rw_tag = number of lowers


# --- a warp RW upper (upper.target), as turboOCI-apply runs it ----------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "targz"])
def test_rw_upper_in_config(lower, gz_index, target_bytes, tmp_path, gz):
    """Convert on top of a lower: records carry tags 1/2, reopen alone gives 0/1, the commit reads back."""
    lower_path, lower_dev = lower
    WarpRWLayer.create(str(tmp_path / "writable_index"), str(tmp_path / "writable_data"), VSIZE).close()
    upper = UpperConfig(
        index=str(tmp_path / "writable_index"),
        data=str(tmp_path / "writable_data"),
        target=str(TGZ if gz else TAR),
        gzipIndex=gz_index if gz else "",
    )
    cfg = _config(tmp_path, [LowerConfig(file=lower_path)], upper)
    model = Model(target_bytes)
    ops = turbo_ops(seed=42)
    with open_config(cfg) as stack:
        assert isinstance(stack.upper, WarpRWLayer)
        assert len(stack.files) == 3  # lower blob, fs-meta, target
        apply_ops(stack.upper, model, ops, stack=stack)
        assert_device(stack, model.over(lower_dev), model.runs())
    # stacked on one lower: 1 = fs-meta, 2 = target (as in overlaybd's turbooci/l1gz/writable_index)
    assert rw_records(tmp_path / "writable_index") == expected_records(ops, 1)
    # the conversion is then committed alone, as overlaybd-commit --fastoci does
    target = open_target(str(TGZ if gz else TAR), gz_index if gz else None)
    layer = WarpRWLayer.open(str(tmp_path / "writable_index"), str(tmp_path / "writable_data"), target=target)
    with layer:
        assert {t for *_, t in layer.dump()} == {0, 1}
        assert_device(Stack([], layer), model.dev, model.runs())
        commit_warp_layer(layer, str(tmp_path / "ext4.fs.meta"), options=OutputOptions(compress="lz4"))
    blob = open_blob(tmp_path / "ext4.fs.meta")
    with blob.source:
        _, _, entries = blob_parts(read_all(blob.source))
    assert {e[4] for e in entries} == {0, 1}
    warp = LowerConfig(
        file=str(tmp_path / "ext4.fs.meta"),
        targetFile=str(TGZ if gz else TAR),
        gzipIndex=gz_index if gz else "",
    )
    with open_config(_config(tmp_path, [LowerConfig(file=lower_path), warp])) as stack:
        assert_device(stack, model.over(lower_dev), model.runs())


def test_rw_upper_tags_follow_stack_depth(lower, target_bytes, tmp_path):
    """Stacked on two lowers, new records carry tags 2 (fs-meta) and 3 (target)."""
    lower_path, _ = lower
    layer = WarpRWLayer.create(str(tmp_path / "i"), str(tmp_path / "d"), VSIZE, target=FileSource(TAR))
    with closing(open_layer(lower_path)) as a, closing(open_layer(lower_path)) as b:
        stack = Stack([a, b], layer)
        stack.pwrite(b"m" * 4096, 0)
        layer.register_remote(8192, 1024, 1024)
        stack.trim(BLOCK * 4, BLOCK)
        assert stack.pread(8192, 1024) == target_bytes[1024:2048]
        assert stack.pread(0, 4096) == b"m" * 4096
        assert [t for *_, t in layer.index.lookup(0, 48)] == [2, 3, 2]  # file slots: 2 fs-meta, 3 target
        layer.close()
    assert [r[4] for r in rw_records(tmp_path / "i")] == [2, 3, 2]


# --- normalisation quirks and errors -------------------------------------------------------------


def test_only_remote_records_read_from_fsmeta(tmp_path, target_bytes):
    """Reproduces an upstream bug on purpose: an index with only remote records loses its target.

    overlaybd's ``do_load_index`` subtracts the smallest tag found, so when every record is a
    RemoteData one (tag 1) they all become tag 0 = fs-meta: after a reopen the layer reads those
    sectors from the fs-meta file at the *tar* offset, and a commit copies them from there. obd does
    exactly what overlaybd does, so that both show the same device. Before the reopen (in memory)
    the tags are still 1 and the data comes from the target; a commit made then holds only tag-1
    entries, which the reader normalises to 0 as well: they read from the blob itself.
    """
    files = [f for f in tar_regular_files(TAR) if f[2] > 0][:3]
    ops = [
        ("remote", 16 * MiB + i * MiB, -(-size // SECTOR) * SECTOR, off)
        for i, (_n, off, size) in enumerate(files)
    ]
    layer = WarpRWLayer.create(str(tmp_path / "i"), str(tmp_path / "d"), VSIZE, target=FileSource(TAR))
    model = Model(target_bytes)
    apply_ops(layer, model, ops)
    # something in the fs-meta file where the tar offsets point, to tell the two files apart
    marker = np.frombuffer(random.Random(3).randbytes(len(target_bytes)), np.uint8)
    fd = os.open(tmp_path / "d", os.O_WRONLY)
    os.pwrite(fd, marker.tobytes(), 0)
    os.close(fd)
    assert_device(Stack([], layer), model.dev, model.runs())  # in memory: still from the target
    commit_warp_layer(layer, str(tmp_path / "early"))
    layer.close()

    quirk = np.zeros(VSIZE, np.uint8)  # what overlaybd shows after the reopen
    for _, off, count, roff in ops:
        quirk[off : off + count] = marker[roff : roff + count]
    layer = WarpRWLayer.open(str(tmp_path / "i"), str(tmp_path / "d"), target=FileSource(TAR))
    with layer:
        assert {t for *_, t in layer.dump()} == {0}
        assert_device(Stack([], layer), quirk, model.runs())
        commit_warp_layer(layer, str(tmp_path / "late"))
    _, _, entries = blob_parts((tmp_path / "late").read_bytes())
    assert {e[4] for e in entries} == {0}
    with closing(open_layer(tmp_path / "late", target=str(TAR))) as blob:
        assert_device(Stack([blob]), quirk, model.runs())

    early = (tmp_path / "early").read_bytes()
    _, _, entries = blob_parts(early)
    assert {e[4] for e in entries} == {1}
    from_blob = np.zeros(VSIZE, np.uint8)
    padded = np.frombuffer(early + bytes(len(target_bytes)), np.uint8)
    for _, off, count, roff in ops:
        from_blob[off : off + count] = padded[roff : roff + count]
    with closing(open_layer(tmp_path / "early", target=str(TAR))) as blob:
        assert {int(t) for t in blob.index.tag} == {0}
        assert_device(Stack([blob]), from_blob, model.runs())


def test_mixed_depth_records_are_refused(tmp_path, target_bytes):
    """Records written standalone (0/1) and then stacked (1/2) normalise to 0..2: not a warp index."""
    layer = WarpRWLayer.create(str(tmp_path / "i"), str(tmp_path / "d"), VSIZE)
    layer.pwrite(b"x" * 512, 0)
    layer.record_tag = 1  # what stacking on one lower does
    layer.register_remote(4096, 512, 1024)
    layer.close()
    assert [r[4] for r in rw_records(tmp_path / "i")] == [0, 2]
    with pytest.raises(FormatError) as e:
        WarpRWLayer.open(str(tmp_path / "i"), str(tmp_path / "d"))
    assert e.value.field == "index[1].tag"


def test_blob_tag_above_one_is_refused(built, tmp_path):
    lsmt = bytearray(Path(built["plain"]).read_bytes())
    _, trailer, entries = blob_parts(bytes(lsmt))
    i = next(k for k, e in enumerate(entries) if e[4] == 1)
    lsmt[trailer.index_offset + 16 * i + 15] = 2
    bad = tmp_path / "bad.meta"
    bad.write_bytes(lsmt)
    with pytest.raises(FormatError) as e:
        open_layer(bad, target=str(TAR))
    assert e.value.field == "index.tag"


@pytest.mark.parametrize("which", ["plain", "lz4"])
def test_blob_without_target_names_targetfile(built, lower, tmp_path, which):
    with pytest.raises(FormatError) as e:
        open_layer(built[which])
    assert e.value.field == "targetFile"
    with pytest.raises(FormatError) as e:
        open_config(_config(tmp_path, [LowerConfig(file=lower[0]), LowerConfig(file=built[which])]))
    assert e.value.field == "targetFile"
    # a normal layer is not mistaken for one
    with closing(open_layer(lower[0])) as layer:
        assert not layer.warp


def test_gzip_target_without_index(built, tmp_path):
    with pytest.raises(FormatError) as e:
        open_layer(built["lz4"], target=str(TGZ))
    assert e.value.field == "gzipIndex"
    with pytest.raises(FormatError) as e:
        open_config(_config(tmp_path, [LowerConfig(file=built["lz4"], targetFile=str(TGZ))]))
    assert e.value.field == "gzipIndex"


def test_rw_without_target_fails_only_on_remote_reads(built):
    d = built["dir"]
    model = built["model"]
    with WarpRWLayer.open(str(d / "index"), str(d / "fsmeta"), readonly=True) as layer:
        dev = Stack([], layer)
        assert dev.pread(0, BLOCK) == model.dev[:BLOCK].tobytes()  # fs-meta reads fine
        with pytest.raises(FormatError) as e:
            dev.pread(16 * MiB, BLOCK)
        assert e.value.field == "targetFile"


def test_commit_layer_refuses_warp(tmp_path):
    layer = WarpRWLayer.create(str(tmp_path / "i"), str(tmp_path / "d"), VSIZE)
    with layer, pytest.raises(ObdError, match="fastoci"):
        commit_layer(layer, str(tmp_path / "out"))


def test_blob_only_fsmeta_is_a_normal_layer(tmp_path):
    """A warp commit without remote data opens with or without a target."""
    with WarpRWLayer.create(str(tmp_path / "i"), str(tmp_path / "d"), VSIZE) as layer:
        layer.pwrite(b"q" * 8192, MiB)
        commit_warp_layer(layer, str(tmp_path / "blob"))
    for kwargs in ({}, {"target": str(TAR)}):
        with closing(open_layer(tmp_path / "blob", **kwargs)) as blob:
            assert Stack([blob]).pread(MiB, 8192) == b"q" * 8192


def test_sealed_layer_from_bytes(built):
    """SealedLayer(warp=True) straight from bytes: files = [blob, target]."""
    lsmt = Path(built["plain"]).read_bytes()
    layer = SealedLayer(BytesSource(lsmt, "meta"), warp=True, target=BytesSource(TAR.read_bytes(), "tar"))
    model = built["model"]
    assert_device(Stack([layer]), model.dev, model.runs())


def test_commit_cli_turbo_oci_equals_the_api(tmp_path):
    from obd.cli import main
    from obd.layer.tools import commit_warp_layer
    from obd.lsmt.warp import WarpRWLayer

    idx, meta = tmp_path / "index", tmp_path / "fsmeta"
    layer = WarpRWLayer.create(str(idx), str(meta), 64 << 20, uuid="44444444-4444-4444-8444-444444444444")
    layer.pwrite(b"m" * 8192, 0)
    layer.register_remote(1 << 20, 4096, 1024)
    layer.close()
    assert main(["commit", "--turbo-oci", str(meta), str(idx), str(tmp_path / "cli.meta"), "-z", "-q"]) == 0
    from obd.layer.tools import OutputOptions
    from obd.lsmt.warp import open_warp_rw

    warp = open_warp_rw(str(idx), str(meta), readonly=True)
    commit_warp_layer(warp, str(tmp_path / "api.meta"), options=OutputOptions(compress="lz4"))
    warp.close()
    assert (tmp_path / "cli.meta").read_bytes() == (tmp_path / "api.meta").read_bytes()
