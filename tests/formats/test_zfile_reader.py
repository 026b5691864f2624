"""ZFileReader over the real overlaybd-made blobs, plus every way a damaged file must fail.

Every ZFile fixture (``zfile_pairs`` of fixtures/expected.json) must decompress to the content the
upstream tools recorded; header and trailer fields must equal ``facts/blob_facts.json``; reads at
random offsets must equal slices of the original; and damage (flipped bytes, truncation, hostile
header fields) must end in an :class:`obd.errors.ObdError` subclass naming what is wrong.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import random
import struct
import threading
from pathlib import Path

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import FIXTURES, expected, materialize
from obd.errors import ChecksumError, FormatError, ObdError, TruncatedError, UnsupportedError
from obd.formats.crc import ZFILE_BLOCK_SEED, crc32c_raw
from obd.formats.tar_envelope import unwrap
from obd.io.source import BytesSource, FileSource, Source
from obd.zfile import (
    FLAGS_HEADER,
    FLAGS_HEADER_OVERWRITTEN,
    FLAGS_TRAILER,
    ZFileReader,
    ZFileRecord,
    ZFileWriter,
    is_zfile,
)
from obd.zfile.format import MAGIC0, MAGIC1, RECORD_SIZE, Flag, record_digest

OBD = FIXTURES / "overlaybd"
PAIRS = expected()["zfile_pairs"]
FACTS = json.loads((OBD / "facts" / "blob_facts.json").read_text())
MiB = 1 << 20


def _pair_id(pair: dict) -> str:
    return pair["zfile"].rsplit("/", 1)[-1][:40]


def open_fixture(rel: str) -> ZFileReader:
    """A reader over fixture ``rel`` (``fixtures/``-relative), unwrapping a tar envelope."""
    return ZFileReader(unwrap(FileSource(materialize(rel))))


@functools.cache
def content(pair_rel: str) -> bytes:
    """The original bytes of a small ZFile fixture (by its ``zfile`` path)."""
    pair = next(p for p in PAIRS if p["zfile"] == pair_rel)
    if pair["output"] is None:
        assert "zeros_1m" in pair["zfile"]
        return bytes(pair["output_bytes"])
    path = FIXTURES / pair["output"]
    data = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    assert len(data) == pair["output_bytes"]
    return data


def sha256_of(reader: Source, chunk: int = 4 * MiB) -> str:
    """SHA-256 of everything ``reader`` holds, streamed in ``chunk``-byte reads (bounded memory)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    pos = 0
    while pos < reader.size:
        n = reader.readinto(view, pos)
        assert n > 0
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def assemble(
    records: list[bytes],
    original_size: int,
    *,
    block_size: int = 4096,
    algorithm: int = 1,
    verify: bool = True,
    overwrite_header: bool = False,
    **trailer_changes: int,
) -> bytes:
    """Build a ZFile by hand from raw compressed blocks (CRCs, index, trailer computed here)."""
    parts = []
    lengths = []
    for comp in records:
        rec = comp + (crc32c_raw(comp, ZFILE_BLOCK_SEED).to_bytes(4, "little") if verify else b"")
        parts.append(rec)
        lengths.append(len(rec))
    index = struct.pack(f"<{len(lengths)}I", *lengths)
    base = ZFileRecord(flags=FLAGS_HEADER, block_size=block_size, algorithm=algorithm, verify=int(verify))
    fields = dict(
        index_offset=RECORD_SIZE + sum(lengths),
        index_size=len(lengths),
        original_file_size=original_size,
        index_crc=crc32c_raw(index),
    )
    fields.update(trailer_changes)
    trailer = base.sealed_copy(flags=FLAGS_TRAILER, **fields)
    header = (
        base.sealed_copy(flags=FLAGS_HEADER_OVERWRITTEN, **fields) if overwrite_header else base.sealed_copy()
    )
    return header.pack() + b"".join(parts) + index + trailer.pack()


def zfile_bytes(data: bytes, **kw: object) -> bytes:
    import io

    out = io.BytesIO()
    with ZFileWriter(out, **kw) as w:  # type: ignore[arg-type]
        w.write(data)
    return out.getvalue()


def replace_trailer(blob: bytes, **changes: int) -> bytes:
    """``blob`` with its trailer re-packed with ``changes`` (digest recomputed)."""
    trailer = ZFileRecord.parse(blob[-RECORD_SIZE:], "t", "trailer")
    return blob[:-RECORD_SIZE] + trailer.sealed_copy(**changes).pack()


# -- every fixture decompresses to what the upstream tools recorded ------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_fixture_decompresses_to_recorded_content(pair: dict) -> None:
    reader = open_fixture(pair["zfile"])
    assert reader.algorithm_name == pair["algo"]
    assert reader.block_size == pair["block_size"]
    assert reader.verify_flag == pair["verify"]
    assert reader.block_count == pair["blocks"]
    assert reader.size == pair["output_bytes"]
    assert sha256_of(reader) == pair["output_sha256"]
    assert reader.pread(reader.size, 10) == b""


@pytest.mark.parametrize(
    "rel",
    [p["zfile"] for p in PAIRS if p["output_bytes"] <= 16 * MiB],
    ids=lambda r: r.rsplit("/", 1)[-1][:40],
)
def test_verify_passes_on_every_small_fixture(rel: str) -> None:
    reader = open_fixture(rel)
    report = reader.verify()
    assert report.blocks == reader.block_count
    assert report.block_crcs_checked
    assert report.index_crc_checked  # every current writer sets the digest bit
    assert report.trailer_digest_checked


def _facts_items() -> list[tuple[str, dict]]:
    items = []
    for rel, facts in FACTS.items():
        if "zfile" in facts.get("kind", "") and (OBD / rel).exists():
            items.append((rel, facts))
    return items


@pytest.mark.parametrize("rel,facts", _facts_items(), ids=[r for r, _ in _facts_items()])
def test_records_match_blob_facts(rel: str, facts: dict) -> None:
    reader = open_fixture(f"overlaybd/{rel}")
    assert reader.compressed_size == facts["file_size"]
    for which in ("header", "trailer"):
        rec: ZFileRecord = getattr(reader, which)
        want = facts[which]
        assert rec is not None
        assert rec.size == want["size"]
        assert f"{rec.digest:08x}" == want["digest"]
        assert rec.digest_valid == want["digest_ok"]
        assert rec.flags == want["flags"]
        assert (rec.is_header, rec.is_data, rec.sealed) == (
            bool(want["is_header"]),
            bool(want["is_data"]),
            bool(want["sealed"]),
        )
        assert rec.header_overwritten == bool(want["header_overwrite"])
        assert rec.digest_enabled == bool(want["digest_enabled"])
        assert rec.index_compressed == bool(want["idx_comp"])
        assert rec.index_offset == want["index_offset"]
        assert rec.index_size == want["index_size"]
        assert rec.original_file_size == want["original_file_size"]
        assert f"{rec.index_crc:08x}" == want["index_crc"]
        assert rec.block_size == want["block_size"]
        assert rec.algorithm == want["algo"]
        assert (rec.level, rec.use_dict, rec.dict_size, rec.verify) == (
            want["level"],
            want["use_dict"],
            want["dict_size"],
            want["verify"],
        )
    assert reader.record_kind == ("header" if facts["header"]["header_overwrite"] else "trailer")
    assert reader.record_lengths[:8].tolist() == facts["block_lengths_first"]
    # Layout: blocks follow the header back to back up to the index; the trailer ends the file.
    assert int(reader.offsets[-1]) == reader.record.index_offset
    assert reader.record.index_offset + 4 * reader.block_count + RECORD_SIZE == facts["file_size"]


def test_f1_old_writer_blob() -> None:
    """ext4_64: digest bit clear, stack garbage in the high flag bits, header not overwritten."""
    reader = open_fixture("overlaybd/ext4/base/ext4_64")
    h, t = reader.header, reader.trailer
    assert t is not None
    assert not h.digest_enabled and not t.digest_enabled
    assert h.garbage_flag_bits and t.garbage_flag_bits
    assert h.flags & 0x3F == 0x03 and t.flags & 0x3F == 0x06
    assert not h.header_overwritten
    assert reader.record_kind == "trailer"
    assert (reader.algorithm_name, reader.block_size, reader.verify_flag) == ("lz4", 4096, True)
    assert reader.block_count == 132309 and reader.size == 541937664
    assert is_zfile(reader.source)
    assert reader.pread(0, 8) == b"LSMT\x00\x01\x02\x00"
    # The content's own LSMT trailer sits in the last 4096 bytes.
    assert reader.pread(reader.size - 4096, 8) == b"LSMT\x00\x01\x02\x00"
    report = reader.verify()  # every block CRC; nothing else is covered by a checksum here
    assert report.block_crcs_checked and report.blocks == 132309
    assert not (report.index_crc_checked or report.header_digest_checked or report.trailer_digest_checked)


def test_f2_converted_layer_digests() -> None:
    reader = open_fixture(
        "aci-hello-world/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
    )
    assert reader.header.flags == 0x1B and reader.trailer is not None and reader.trailer.flags == 0x16
    assert reader.header.digest == 0x0F1F3445 and reader.header.digest_valid
    assert reader.trailer.digest == 0xFFDFE161 and reader.trailer.digest_valid
    assert reader.record_kind == "header"
    assert reader.block_count == 17463 and reader.size == 71528448


def test_bs64_blobs_the_cpp_reader_rejects_read_correctly() -> None:
    """rand_256k.bin.*.bs64: blocks of 65,790+ bytes overflow overlaybd's 64 KiB read buffer."""
    for algo in ("lz4", "zstd"):
        rel = f"overlaybd/zfile/cli/rand_256k.bin.{algo}.bs64.zfile"
        reader = open_fixture(rel)
        assert int(reader.compressed_lengths.max()) > 65536
        assert reader.pread(0, reader.size) == content(rel)
        assert reader.pread(65536 - 3, 7) == content(rel)[65536 - 3 : 65536 + 4]


def test_inspector_attributes() -> None:
    rel = "overlaybd/zfile/cli/odd_100003.bin.zstd.bs4.zfile"
    reader = open_fixture(rel)
    assert reader.compressed_lengths.dtype == np.uint32
    assert (reader.record_lengths - reader.compressed_lengths == 4).all()
    assert reader.compressed_size == (OBD / rel.removeprefix("overlaybd/")).stat().st_size
    assert reader.original_size == reader.size == 100003
    assert reader.block_length(24) == 100003 - 24 * 4096
    off, length = reader.block_extent(3)
    assert off == int(reader.offsets[3]) and length == int(reader.record_lengths[3])
    info = reader.info()
    assert info["algorithm"] == "zstd" and info["blocks"] == 25 and info["record"] == "trailer"
    assert info["header"]["flag_names"] == ["header", "type", "digest"]  # type: ignore[index]
    assert info["trailer"]["flag_names"] == ["type", "sealed", "digest"]  # type: ignore[index]


# -- random access ---------------------------------------------------------------------------------------

RANDOM_READ_FIXTURES = [
    "overlaybd/zfile/cli/odd_100003.bin.lz4.bs4.zfile",
    "overlaybd/zfile/cli/odd_100003.bin.zstd.bs64.zfile",
    "overlaybd/zfile/cli/text_200k.txt.lz4.bs4.zfile",
    "overlaybd/zfile/cli/odd_100003.bin.lz4.bs4.zfile.tar",
    "overlaybd/lsmt/commit/L0.lz4.commit",
    "overlaybd/lsmt/commit/L0.zstd.commit",
]


def _interesting_reads(size: int, bs: int, seed: int) -> list[tuple[int, int]]:
    group = 16 * bs  # the C++ jump table groups 16 blocks at 4 KiB
    reads = []
    for edge in (bs, 2 * bs, group, 2 * group, size - size % bs, size):
        for delta in (-bs - 1, -1, 0, 1):
            for length in (1, 2, bs - 1, bs, bs + 1, group + 1):
                reads.append((max(0, edge + delta), length))
    rng = random.Random(seed)
    for _ in range(300):
        reads.append(
            (rng.randrange(0, size + 100), rng.choice([1, 511, 512, 4096, rng.randrange(1, 3 * bs)]))
        )
    for _ in range(10):
        reads.append((rng.randrange(0, size), rng.randrange(1, 3 * MiB)))  # multi-chunk reads
    reads += [(0, size), (0, size + 1), (size - 1, 10), (size, 1), (size + 4096, 4096), (0, 0)]
    return reads


@pytest.mark.parametrize("rel", RANDOM_READ_FIXTURES, ids=lambda r: r.rsplit("/", 1)[-1])
def test_random_reads_equal_slices(rel: str) -> None:
    data = content(rel.removesuffix(".tar"))
    reader = open_fixture(rel)
    for offset, length in _interesting_reads(len(data), reader.block_size, seed=len(data)):
        assert reader.pread(offset, length) == data[offset : offset + length], (offset, length)


def test_readinto_fills_caller_buffer_and_clamps() -> None:
    rel = "overlaybd/zfile/cli/text_200k.txt.zstd.bs4.zfile"
    data = content(rel)
    reader = open_fixture(rel)
    buf = bytearray(b"\xee" * 10000)
    assert reader.readinto(memoryview(buf), len(data) - 100) == 100
    assert buf[:100] == data[-100:] and buf[100:] == b"\xee" * 9900
    arr = np.zeros(3000, dtype=np.uint32)  # any writable buffer, multi-byte items included
    assert reader.readinto(memoryview(arr), 5) == 12000
    assert arr.tobytes() == data[5:12005]
    assert reader.readinto(memoryview(buf), len(data)) == 0
    with pytest.raises(ValueError):
        reader.readinto(memoryview(buf), -1)


def test_repeated_small_reads_decompress_a_block_once() -> None:
    rel = "overlaybd/zfile/cli/text_200k.txt.lz4.bs4.zfile"
    data = content(rel)
    reader = open_fixture(rel)
    calls: list[int] = []
    decode = reader._decode

    def counting(i: int, rec: memoryview) -> bytes:
        calls.append(i)
        return decode(i, rec)

    reader._decode = counting  # type: ignore[method-assign]
    for k in range(20):
        assert (
            reader.pread(3 * 4096 + 100 + k * 7, 512) == data[3 * 4096 + 100 + k * 7 : 3 * 4096 + 612 + k * 7]
        )
    assert calls == [3]
    # A read straddling blocks 3 and 4 reuses block 3 and decodes only block 4.
    assert reader.pread(4 * 4096 - 10, 20) == data[4 * 4096 - 10 : 4 * 4096 + 10]
    assert calls == [3, 4]
    reader.clear_cache()
    reader.pread(3 * 4096 + 1, 1)
    assert calls == [3, 4, 3]


def test_large_reads_cross_chunks() -> None:
    rel = "overlaybd/lsmt/commit/L0.zstd.commit"
    data = content(rel)
    reader = open_fixture(rel)
    for offset in (0, 12345, 4096 * 255, 4096 * 256 - 1):
        assert reader.pread(offset, 5 * MiB) == data[offset : offset + 5 * MiB]


def test_concurrent_readers_share_one_instance() -> None:
    rel = "overlaybd/lsmt/commit/L0.lz4.commit"
    data = content(rel)
    reader = open_fixture(rel)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                off = rng.randrange(0, len(data))
                length = rng.choice([1, 4096, 5000, 70000, 2 * MiB + 17])
                got = reader.pread(off, length)
                if got != data[off : off + length]:
                    raise AssertionError(f"mismatch at {off}+{length}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# -- detection ------------------------------------------------------------------------------------------


def test_is_zfile_detection() -> None:
    cli = OBD / "zfile" / "cli" / "odd_100003.bin.lz4.bs4.zfile"
    blob = cli.read_bytes()
    assert is_zfile(BytesSource(blob))
    assert is_zfile(FileSource(materialize("overlaybd/ext4/base/ext4_64")))  # digest bit clear: no check
    assert not is_zfile(FileSource(OBD / "lsmt" / "commit" / "L1.commit"))  # a raw LSMT blob passes through
    assert not is_zfile(BytesSource(bytes(512)))
    assert not is_zfile(BytesSource(blob[-RECORD_SIZE:] + bytes(100)))  # magic fine, header bit clear
    with pytest.raises(TruncatedError):
        is_zfile(BytesSource(blob[:511]))
    bad = bytearray(blob)
    bad[200] ^= 1  # padding of the header: covered by the digest
    with pytest.raises(ChecksumError) as exc:
        is_zfile(BytesSource(bytes(bad)))
    assert exc.value.field == "header.digest"
    with pytest.raises(ChecksumError):
        ZFileReader(BytesSource(bytes(bad)))


def test_record_pack_parse_round_trip() -> None:
    rec = ZFileRecord(
        flags=FLAGS_TRAILER,
        index_offset=12345,
        index_size=7,
        original_file_size=28000,
        index_crc=0xDEADBEEF,
        block_size=8192,
        algorithm=2,
        verify=0,
    )
    raw = rec.pack()
    assert len(raw) == RECORD_SIZE and raw[:8] == MAGIC0 and raw[8:24] == MAGIC1 and raw[96:] == bytes(416)
    back = ZFileRecord.parse(raw, "x", "trailer")
    assert back == rec.sealed_copy() and back.digest_valid
    assert back.digest == record_digest(raw)
    with pytest.raises(FormatError) as exc:
        ZFileRecord.parse(raw, "x", "header")
    assert exc.value.field == "header.flags"
    with pytest.raises(FormatError):
        ZFileRecord.parse(b"X" + raw[1:], "x", "trailer")
    with pytest.raises(TruncatedError):
        ZFileRecord.parse(raw[:100], "x", "trailer")


# -- damage ------------------------------------------------------------------------------------------------


def _cli_blob(name: str = "odd_100003.bin.lz4.bs4.zfile") -> bytes:
    return (OBD / "zfile" / "cli" / name).read_bytes()


@pytest.mark.parametrize("name", ["odd_100003.bin.lz4.bs4.zfile", "text_200k.txt.zstd.bs4.zfile"])
def test_flipped_block_byte_names_the_block(name: str) -> None:
    blob = bytearray(_cli_blob(name))
    reader = ZFileReader(BytesSource(bytes(blob)))
    off, length = reader.block_extent(5)
    blob[off + length // 2] ^= 0x40
    damaged = ZFileReader(BytesSource(bytes(blob)), name="damaged.zfile")
    bs = damaged.block_size
    for offset, count in ((0, damaged.size), (5 * bs + 10, 10), (5 * bs, bs), (4 * bs, 3 * bs)):
        with pytest.raises(ChecksumError) as exc:
            damaged.pread(offset, count)
        assert exc.value.field == "block[5].crc"
        assert "block 5" in str(exc.value) and "damaged.zfile" in str(exc.value)
    with pytest.raises(ChecksumError, match="block 5"):
        damaged.verify()
    # Blocks around it still read.
    assert damaged.pread(0, 5 * bs) == reader.pread(0, 5 * bs)
    assert damaged.pread(6 * bs, bs) == reader.pread(6 * bs, bs)


def test_flipped_stored_crc_is_caught() -> None:
    blob = bytearray(_cli_blob())
    reader = ZFileReader(BytesSource(bytes(blob)))
    off, length = reader.block_extent(24)  # the short last block
    blob[off + length - 1] ^= 1
    with pytest.raises(ChecksumError, match="block 24"):
        ZFileReader(BytesSource(bytes(blob))).pread(0, reader.size)


def test_flipped_index_byte_checksum_error_when_digest_bit_set() -> None:
    blob = bytearray(_cli_blob())
    trailer = ZFileRecord.parse(blob[-RECORD_SIZE:], "t", "trailer")
    blob[trailer.index_offset + 9] ^= 0x01
    with pytest.raises(ChecksumError) as exc:
        ZFileReader(BytesSource(bytes(blob)))
    assert exc.value.field == "trailer.index_crc"


def test_flipped_index_in_overwritten_header_file() -> None:
    blob = bytearray((OBD / "lsmt" / "commit" / "L1.lz4.commit").read_bytes())
    header = ZFileRecord.parse(blob[:RECORD_SIZE], "h", "header")
    assert header.header_overwritten
    blob[header.index_offset + 2] ^= 0x80
    with pytest.raises(ChecksumError) as exc:
        ZFileReader(BytesSource(bytes(blob)))
    assert exc.value.field == "header.index_crc"


def test_index_damage_without_digest_bit_surfaces_as_block_crc_error() -> None:
    """Old writers set no digest bit: the index is then not checked, but block CRCs still are."""
    data = bytes(range(256)) * 200
    blob = bytearray(zfile_bytes(data))
    t = ZFileRecord.parse(blob[-RECORD_SIZE:], "t", "trailer")
    # Move one byte from entry 2 to entry 3: the sum (and so the layout checks) still hold.
    lens = list(struct.unpack_from(f"<{t.index_size}I", blob, t.index_offset))
    lens[2] -= 1
    lens[3] += 1
    struct.pack_into(f"<{t.index_size}I", blob, t.index_offset, *lens)
    with pytest.raises(ChecksumError):
        ZFileReader(BytesSource(bytes(blob)))
    old_style = replace_trailer(bytes(blob), flags=t.flags & ~Flag.DIGEST)
    reader = ZFileReader(BytesSource(old_style))
    assert reader.pread(0, 2 * 4096) == data[: 2 * 4096]
    with pytest.raises(ChecksumError, match="block 2"):
        reader.pread(0, len(data))


@pytest.mark.parametrize(
    "changes,error,field",
    [
        ({"index_size": 1 << 40}, FormatError, "trailer.index_size"),
        ({"index_size": 10**9 + 1}, FormatError, "trailer.index_size"),
        ({"index_offset": 1 << 50}, FormatError, "trailer.index_offset"),
        ({"index_offset": 100}, FormatError, "trailer.index_offset"),
        ({"original_file_size": 100003 + 4096}, FormatError, "trailer.index_size"),
        ({"algorithm": 0}, UnsupportedError, "trailer.algo"),
        ({"algorithm": 9}, FormatError, "trailer.algo"),
        ({"dict_size": 4096}, UnsupportedError, "trailer.dict_size"),
        ({"use_dict": 1}, UnsupportedError, "trailer.use_dict"),
        ({"block_size": 3000}, FormatError, "trailer.block_size"),
        ({"block_size": 0}, FormatError, "trailer.block_size"),
        ({"block_size": 1 << 17}, UnsupportedError, "trailer.block_size"),
        ({"block_size": 2048}, UnsupportedError, "trailer.block_size"),
        ({"flags": FLAGS_TRAILER & ~Flag.SEALED}, FormatError, "trailer.flags"),
        ({"flags": FLAGS_TRAILER & ~Flag.TYPE}, FormatError, "trailer.flags"),
    ],
)
def test_hostile_trailer_fields(changes: dict, error: type, field: str) -> None:
    with pytest.raises(error) as exc:
        ZFileReader(BytesSource(replace_trailer(_cli_blob(), **changes), name="hostile.zfile"))
    assert exc.value.field == field
    assert exc.value.path == "hostile.zfile"


def test_truncated_files() -> None:
    blob = _cli_blob()
    with pytest.raises(TruncatedError):
        ZFileReader(BytesSource(blob[:300]))
    with pytest.raises(FormatError):  # the trailer is gone: its magic is not where it must be
        ZFileReader(BytesSource(blob[:-100]))
    with pytest.raises(FormatError):
        ZFileReader(BytesSource(blob[:700]))
    ow = (OBD / "lsmt" / "commit" / "L1.lz4.commit").read_bytes()
    header = ZFileRecord.parse(ow[:RECORD_SIZE], "h", "header")
    with pytest.raises(FormatError) as exc:  # header-overwrite file cut inside its index
        ZFileReader(BytesSource(ow[: header.index_offset + 10]))
    assert exc.value.field == "header.index_size"
    # Cut after the index: the overwritten header has everything, the trailer is not needed.
    whole = ZFileReader(BytesSource(ow)).pread(0, 1 << 20)
    assert (
        ZFileReader(BytesSource(ow[: header.index_offset + 4 * header.index_size])).pread(0, 1 << 20) == whole
    )


class _ShortSource(Source):
    """A source that claims more bytes than it can deliver (a file truncated after opening)."""

    def __init__(self, data: bytes, claimed: int):
        self._data = data
        self.size = claimed
        self.name = "short"

    def readinto(self, buf: memoryview, offset: int) -> int:
        chunk = self._data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)


def test_source_shrinking_under_the_reader() -> None:
    blob = _cli_blob()
    reader = ZFileReader(BytesSource(blob))
    src = _ShortSource(blob, len(blob))
    shrunk = ZFileReader(src)
    src._data = blob[:5000]
    with pytest.raises(TruncatedError):
        shrunk.pread(0, reader.size)


def test_zero_and_too_long_index_entries() -> None:
    comp = lz4.block.compress(b"a" * 4096, store_size=False)
    good = assemble([comp, comp], 8192)
    assert ZFileReader(BytesSource(good)).pread(0, 8192) == b"a" * 8192
    for bad_len, verify in ((0, False), (4, True), (3, True)):
        blob = bytearray(assemble([comp, comp], 8192, verify=verify))
        t = ZFileRecord.parse(blob[-RECORD_SIZE:], "t", "trailer")
        struct.pack_into("<I", blob, t.index_offset + 4, bad_len)
        fixed = replace_trailer(bytes(blob), index_crc=crc32c_raw(blob[t.index_offset : t.index_offset + 8]))
        with pytest.raises(FormatError) as exc:
            ZFileReader(BytesSource(fixed))
        assert exc.value.field == "index[1]"
    huge = assemble([comp, b"\0" * 20000], 8192)
    with pytest.raises(FormatError) as exc:
        ZFileReader(BytesSource(huge))
    assert exc.value.field == "index[1]"


def test_blocks_past_index_offset() -> None:
    comp = lz4.block.compress(b"b" * 4096, store_size=False)
    blob = bytearray(assemble([comp, comp], 8192))
    t = ZFileRecord.parse(blob[-RECORD_SIZE:], "t", "trailer")
    first = struct.unpack_from("<I", blob, t.index_offset)[0]
    struct.pack_into("<I", blob, t.index_offset, first + 8)  # the blocks now run into the index
    fixed = replace_trailer(bytes(blob), index_crc=crc32c_raw(blob[t.index_offset : t.index_offset + 8]))
    with pytest.raises(FormatError) as exc:
        ZFileReader(BytesSource(fixed))
    assert exc.value.field == "trailer.index_offset"


def test_undecodable_blocks_without_crc_name_the_block() -> None:
    data = bytes(range(256)) * 100
    for algo in ("lz4", "zstd"):
        blob = bytearray(zfile_bytes(data, algorithm=algo, verify=False))
        reader = ZFileReader(BytesSource(bytes(blob)))
        off, length = reader.block_extent(2)
        blob[off : off + length] = bytes(length)
        damaged = ZFileReader(BytesSource(bytes(blob)), name=f"z.{algo}")
        for offset, count in ((0, len(data)), (2 * 4096 + 1, 1), (2 * 4096, 4096)):
            with pytest.raises(FormatError) as exc:
                damaged.pread(offset, count)
            assert exc.value.field == "block[2]" and "block 2" in str(exc.value), algo
        assert damaged.pread(3 * 4096, 4096) == data[3 * 4096 : 4 * 4096]


def test_wrong_decompressed_length() -> None:
    short = lz4.block.compress(b"c" * 100, store_size=False)
    full = lz4.block.compress(b"c" * 4096, store_size=False)
    reader = ZFileReader(BytesSource(assemble([short, full], 8192)))
    with pytest.raises(FormatError, match="decompressed to 100 bytes, expected 4096"):
        reader.pread(0, 1)
    with pytest.raises(FormatError, match="block 0"):
        reader.pread(0, 8192)
    # The last block must be exactly the remainder too, neither shorter nor longer.
    with pytest.raises(FormatError, match="block 1"):
        ZFileReader(BytesSource(assemble([full, full], 4096 + 4000))).pread(0, 8096)


def test_zstd_frame_announcing_a_huge_size_is_refused_before_allocating() -> None:
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(b"d" * 4096))
    params = zstandard.get_frame_parameters(bytes(frame))
    assert params.content_size == 4096
    forged = bytes(zstandard.ZstdCompressor(level=3).compress(b"d" * 8192))
    reader = ZFileReader(BytesSource(assemble([forged], 4096, algorithm=2)))
    with pytest.raises(FormatError, match="announces 8192 bytes"):
        reader.pread(0, 4096)
    with pytest.raises(FormatError):
        ZFileReader(BytesSource(assemble([forged, forged], 8192, algorithm=2))).pread(0, 8192)


def test_zstd_without_native_batch_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-frame path python-zstandard's cffi backend would take gives the same bytes."""
    from obd.zfile.codecs import ZSTD

    rel = "overlaybd/lsmt/commit/L0.zstd.commit"
    data = content(rel)
    monkeypatch.setattr(ZSTD, "native_batches", False)
    reader = open_fixture(rel)
    for offset, length in ((0, 3 * MiB), (4096 * 100 - 5, 70000), (len(data) - 9000, 9000)):
        assert reader.pread(offset, length) == data[offset : offset + length]
    blob = zfile_bytes(data[: 2 * MiB], algorithm="zstd", threads=2)
    monkeypatch.setattr(ZSTD, "native_batches", True)
    assert blob == zfile_bytes(data[: 2 * MiB], algorithm="zstd", threads=2)


def test_zstd_bytes_after_the_frame_are_ignored_consistently() -> None:
    frame = zstandard.ZstdCompressor(level=3).compress(b"e" * 4096)
    blob = assemble([frame + b"junk"] * 20, 20 * 4096, algorithm=2)
    reader = ZFileReader(BytesSource(blob))
    assert reader.pread(0, 20 * 4096) == b"e" * 20 * 4096  # batch path
    reader.clear_cache()
    assert reader.pread(5 * 4096 + 1, 10) == b"e" * 10  # single-block path


# -- random damage never escapes as anything but ObdError ----------------------------------------------

PROPERTY_FIXTURES = [
    "overlaybd/zfile/cli/odd_100003.bin.lz4.bs4.zfile",
    "overlaybd/zfile/cli/text_200k.txt.zstd.bs4.zfile",
    "overlaybd/zfile/cli/tiny_1.bin.lz4.bs64.zfile",
    "overlaybd/lsmt/commit/L1.lz4.commit",
    "overlaybd/lsmt/commit/L2.zstd.commit",
]


@functools.cache
def _stored(rel: str) -> bytes:
    return Path(materialize(rel)).read_bytes()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rel=st.sampled_from(PROPERTY_FIXTURES),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=0, max_size=3),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True), st.integers(1, 600)),
    probe=st.integers(0, 1 << 20),
)
def test_random_damage_only_raises_obd_errors(
    rel: str, flips: list[tuple[float, int]], cut: float | int | None, probe: int
) -> None:
    blob = bytearray(_stored(rel))
    original = content(rel)
    for where, mask in flips:
        blob[int(where * len(blob))] ^= mask
    if isinstance(cut, float):
        del blob[int(cut * len(blob)) :]
    elif isinstance(cut, int):
        del blob[-cut:]
    try:
        reader = ZFileReader(BytesSource(bytes(blob)))
        offset = probe % (len(original) + 1)
        assert reader.pread(offset, 5000) == original[offset : offset + 5000]
        assert reader.pread(0, reader.size + 1) == original
    except ObdError:
        pass


class _OpaqueSource(Source):
    """A source that never knows whether a read would wait (the base class's answer: None)."""

    def __init__(self, inner: Source):
        self.inner, self.name, self.size = inner, inner.name, inner.size

    def readinto(self, buf, offset):
        return self.inner.readinto(buf, offset)


def test_readinto_nowait_serves_cached_blocks_and_declines_otherwise():
    """An event loop (the FUSE frontend) decodes page-cached blocks in place, same bytes as readinto."""
    rel = "overlaybd/zfile/cli/text_200k.txt.lz4.bs4.zfile"
    reader = open_fixture(rel)
    whole = reader.pread(0, reader.size)  # the file is now in the page cache
    rng = random.Random(3)
    for _ in range(50):
        off = rng.randrange(0, reader.size)
        n = rng.randrange(1, 20000)
        buf = bytearray(n)
        got = reader.readinto_nowait(memoryview(buf), off)
        assert got == min(n, reader.size - off) and bytes(buf[:got]) == whole[off : off + got]
    raw = FileSource(materialize(rel))
    window = raw.size // 2
    from obd.io.source import WindowSource

    win = WindowSource(raw, 100, window)
    buf = bytearray(window + 50)
    assert win.readinto_nowait(memoryview(buf), 0) == window  # clamped to the window
    assert BytesSource(b"abc").readinto_nowait(memoryview(bytearray(2)), 1) == 2
    opaque = ZFileReader(_OpaqueSource(BytesSource(raw.pread(0, raw.size))))
    assert opaque.readinto_nowait(memoryview(bytearray(4096)), 0) is None  # would have to ask
    assert opaque.pread(0, 4096) == whole[:4096]  # and readinto still works afterwards
