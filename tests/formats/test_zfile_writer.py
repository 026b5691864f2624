"""ZFileWriter: the §2.8 layout for every size/option combination, and comparisons with overlaybd's output.

The writer must produce exactly overlaybd's layout (header 0x13 or rewritten 0x1B, blocks with raw
CRC32C seed 100007, uint32 index with its CRC, trailer 0x16) whatever the input slicing and thread
count. Against the CLI and commit fixtures the header/trailer fields and the layout must match; zstd
output is byte-identical, LZ4 differs in some blocks because python-lz4 bundles liblz4 1.9.4 while
overlaybd bundles 1.8.3 (the count of identical blocks is recorded as a test property).
"""

from __future__ import annotations

import bz2
import hashlib
import io
import os
import random
import struct
from pathlib import Path

import lz4
import lz4.block
import pytest

from fixtures import FIXTURES, materialize
from obd.errors import FormatError, LayerStateError, ObdError, UnsupportedError
from obd.formats.crc import ZFILE_BLOCK_SEED, crc32c_raw
from obd.formats.tar_envelope import unwrap
from obd.io.source import BytesSource, FileSource
from obd.zfile import (
    FLAGS_HEADER,
    FLAGS_HEADER_OVERWRITTEN,
    FLAGS_TRAILER,
    LZ4,
    ZSTD,
    ZFileReader,
    ZFileRecord,
    ZFileWriter,
    codec_by_name,
    compress_file,
    decompress_file,
    get_codec,
)
from obd.zfile.format import FLAG_MASK, RECORD_SIZE, Flag

OBD = FIXTURES / "overlaybd"
CLI = OBD / "zfile" / "cli"
INPUTS = OBD / "inputs" / "zfile"
BLOCK_SIZES = [4096, 8192, 16384, 32768, 65536]


def mixed(n: int, seed: int = 1) -> bytes:
    """``n`` bytes alternating incompressible and repetitive runs (both codec paths get exercised)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rng.randbytes(3000)
        out += b"%08d the quick brown fox jumps over the lazy dog\n" % len(out) * 60
    return bytes(out[:n])


def write_zfile(data: bytes, *, slices: list[int] | None = None, **kw: object) -> bytes:
    out = io.BytesIO()
    w = ZFileWriter(out, **kw)  # type: ignore[arg-type]
    if slices is None:
        w.write(data)
    else:
        pos = 0
        for k in slices:
            w.write(data[pos : pos + k])
            pos += k
        w.write(data[pos:])
    w.close()
    return out.getvalue()


def check_layout(blob: bytes, data: bytes, *, algo: str, bs: int, verify: bool, overwrite: bool) -> None:
    """Everything docs/formats.md §2.8 says about a writer's output, checked byte by byte."""
    n = len(data)
    blocks = -(-n // bs)
    header = ZFileRecord.parse(blob[:RECORD_SIZE], "out", "header")
    trailer = ZFileRecord.parse(blob[-RECORD_SIZE:], "out", "trailer")
    assert header.digest_valid and trailer.digest_valid
    assert trailer.flags == FLAGS_TRAILER
    algo_id = codec_by_name(algo).algorithm
    for rec in (header, trailer):
        assert (
            rec.block_size,
            rec.algorithm,
            rec.verify,
            rec.level,
            rec.use_dict,
            rec.dict_size,
            rec.size,
        ) == (
            bs,
            algo_id,
            int(verify),
            0,
            0,
            0,
            96,
        )
        assert rec.raw is not None and rec.raw[96:] == bytes(416)
    assert trailer.index_size == blocks
    assert trailer.original_file_size == n
    index = blob[trailer.index_offset : trailer.index_offset + 4 * blocks]
    lengths = struct.unpack(f"<{blocks}I", index)
    assert trailer.index_offset == RECORD_SIZE + sum(lengths)
    assert len(blob) == trailer.index_offset + 4 * blocks + RECORD_SIZE
    assert trailer.index_crc == crc32c_raw(index)
    if overwrite:
        assert header.flags == FLAGS_HEADER_OVERWRITTEN
        assert (header.index_offset, header.index_size, header.original_file_size, header.index_crc) == (
            trailer.index_offset,
            trailer.index_size,
            trailer.original_file_size,
            trailer.index_crc,
        )
    else:
        assert header.flags == FLAGS_HEADER
        assert (header.index_offset, header.index_size, header.original_file_size, header.index_crc) == (
            0,
            0,
            0,
            0,
        )
    pos = RECORD_SIZE
    codec = codec_by_name(algo)
    for i, length in enumerate(lengths):
        rec = blob[pos : pos + length]
        comp = rec[:-4] if verify else rec
        if verify:
            assert int.from_bytes(rec[-4:], "little") == crc32c_raw(comp, ZFILE_BLOCK_SEED)
        want = data[i * bs : (i + 1) * bs]
        assert codec.decompress(comp, len(want)) == want
        pos += length
    if n == 0:
        assert len(blob) == 1024


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "noverify"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["keep-header", "overwrite-header"])
def test_round_trip_and_layout(algo: str, bs: int, verify: bool, overwrite: bool) -> None:
    for n in (0, 1, bs - 1, bs, bs + 1, 5 * bs, 16 * bs + 3):
        data = mixed(n, seed=n)
        blob = write_zfile(data, algorithm=algo, block_size=bs, verify=verify, overwrite_header=overwrite)
        check_layout(blob, data, algo=algo, bs=bs, verify=verify, overwrite=overwrite)
        reader = ZFileReader(BytesSource(blob))
        assert reader.record_kind == ("header" if overwrite else "trailer")
        assert reader.pread(0, n + 1) == data
        reader.verify()


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_output_independent_of_slicing_and_threads(algo: str) -> None:
    data = mixed(5 * (1 << 20) + 12345, seed=7)
    ref = write_zfile(data, algorithm=algo, threads=1)
    rng = random.Random(3)
    slices = [rng.choice([1, 7, 4095, 4096, 4097, 100_000, 1 << 20, 3 << 20]) for _ in range(40)]
    assert write_zfile(data, algorithm=algo, threads=2, slices=slices) == ref
    assert write_zfile(data, algorithm=algo, threads=3) == ref
    assert write_zfile(data, algorithm=algo, threads=4, slices=[1] * 5000 + [4096] * 300) == ref
    check_layout(ref, data, algo=algo, bs=4096, verify=True, overwrite=False)


def test_zstd_native_multi_frame_call_matches_single_calls() -> None:
    data = mixed(300 * 4096, seed=11)
    blocks = [memoryview(data)[i : i + 4096] for i in range(0, len(data), 4096)]
    multi = ZSTD.compress_region(memoryview(data), 4096, threads=2)
    assert [bytes(m) for m in multi] == [ZSTD.compress(b) for b in blocks]


class _Pipe:
    """A write-only, non-seekable stream."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def seekable(self) -> bool:
        return False


def test_non_seekable_stream() -> None:
    data = mixed(100_000)
    pipe = _Pipe()
    with ZFileWriter(pipe) as w:  # type: ignore[arg-type]
        w.write(data)
    assert b"".join(pipe.chunks) == write_zfile(data)
    with pytest.raises(ValueError, match="seekable"):
        ZFileWriter(_Pipe(), overwrite_header=True)  # type: ignore[arg-type]


def test_header_rewrite_at_a_stream_offset() -> None:
    """Inside an envelope the ZFile starts mid-stream: the rewrite must go to its own start."""
    data = mixed(50_000)
    out = io.BytesIO()
    out.write(b"P" * 1536)
    with ZFileWriter(out, overwrite_header=True) as w:
        w.write(data)
    out.write(b"F" * 100)
    blob = out.getvalue()
    assert blob[:1536] == b"P" * 1536 and blob[-100:] == b"F" * 100
    inner = blob[1536:-100]
    assert inner == write_zfile(data, overwrite_header=True)
    assert ZFileRecord.parse(inner[:RECORD_SIZE], "x", "header").flags == FLAGS_HEADER_OVERWRITTEN


def test_writer_state_errors() -> None:
    out = io.BytesIO()
    w = ZFileWriter(out)
    w.write(b"abc")
    trailer = w.close()
    assert w.close() is trailer
    assert trailer.original_file_size == 3 and w.bytes_in == 3 and w.bytes_out == len(out.getvalue())
    with pytest.raises(LayerStateError):
        w.write(b"more")
    out = io.BytesIO()
    with pytest.raises(RuntimeError), ZFileWriter(out) as w2:
        w2.write(b"x" * 5000)
        raise RuntimeError("boom")
    assert len(out.getvalue()) == RECORD_SIZE  # aborted: the header only, no blocks, no trailer
    with pytest.raises(LayerStateError):
        w2.close()


def test_writer_argument_checks() -> None:
    for bs in (0, 1000, 2048, 3 * 4096, 1 << 17):
        with pytest.raises(ValueError):
            ZFileWriter(io.BytesIO(), block_size=bs)
    with pytest.raises(ValueError):
        ZFileWriter(io.BytesIO(), algorithm="brotli")
    with pytest.raises(UnsupportedError):
        ZFileWriter(io.BytesIO(), algorithm="mini_lzo")


def test_codec_table() -> None:
    assert get_codec(1) is LZ4 and get_codec(2) is ZSTD
    assert codec_by_name("LZ4") is LZ4 and codec_by_name(2) is ZSTD
    with pytest.raises(UnsupportedError):
        get_codec(0)
    with pytest.raises(FormatError):
        get_codec(3)
    comp = LZ4.compress(b"q" * 4096)
    with pytest.raises(FormatError, match="block 7: decompressed to 4096 bytes, expected 4097"):
        LZ4.decompress(comp, 4097, block=7, path="p")
    with pytest.raises(FormatError, match="block 7"):
        LZ4.decompress(comp, 4095, block=7, path="p")
    with pytest.raises(FormatError, match="zstd data is corrupt"):
        ZSTD.decompress(b"\x28\xb5\x2f\xfd garbage", 4096, block=1)


# -- against overlaybd's own output ---------------------------------------------------------------------


def _cli_cases() -> list[Path]:
    return sorted(CLI.glob("*.zfile"))


def _input_of(name: str) -> bytes:
    stem = ".".join(name.split(".")[:2])
    if stem == "zeros_1m.bin":
        return bytes(1 << 20)  # not stored; make_inputs.py: 1 MiB of zeros
    return (INPUTS / stem).read_bytes()


def _identical_blocks(mine: bytes, ref: bytes) -> int:
    a = ZFileReader(BytesSource(mine))
    b = ZFileReader(BytesSource(ref))
    assert a.block_count == b.block_count
    same = 0
    for i in range(a.block_count):
        oa, la = a.block_extent(i)
        ob, lb = b.block_extent(i)
        same += mine[oa : oa + la] == ref[ob : ob + lb]
    return same


def _compare_records(
    mine: ZFileRecord, ref: ZFileRecord, *, same_blocks: bool, old_writer: bool = False
) -> None:
    if old_writer:  # no digest bit, stack garbage above the meaningful flag bits
        assert mine.flags & ~Flag.DIGEST == ref.flags & FLAG_MASK
    else:
        assert mine.flags == ref.flags
    fields = [
        "index_size",
        "original_file_size",
        "block_size",
        "algorithm",
        "level",
        "use_dict",
        "dict_size",
        "verify",
        "size",
    ]
    if same_blocks:
        fields += ["index_offset", "index_crc", "digest"]
    for f in fields:
        assert getattr(mine, f) == getattr(ref, f), f


@pytest.mark.parametrize("path", _cli_cases(), ids=lambda p: p.name)
def test_matches_overlaybd_zfile_cli(path: Path, record_property: pytest.RecordProperty) -> None:
    """``overlaybd-zfile --algorithm A --bs K`` (verify on, header kept) versus our writer."""
    parts = path.name.split(".")
    algo, bs = parts[2], int(parts[3].removeprefix("bs")) * 1024
    data = _input_of(path.name)
    ref = path.read_bytes()
    mine = write_zfile(data, algorithm=algo, block_size=bs)
    check_layout(mine, data, algo=algo, bs=bs, verify=True, overwrite=False)
    assert mine[:RECORD_SIZE] == ref[:RECORD_SIZE]  # the 0x13 header holds no data-dependent field
    same = _identical_blocks(mine, ref)
    blocks = ZFileReader(BytesSource(ref)).block_count
    record_property("identical_blocks", f"{same}/{blocks}")
    _compare_records(
        ZFileRecord.parse(mine[-RECORD_SIZE:], "m", "trailer"),
        ZFileRecord.parse(ref[-RECORD_SIZE:], "r", "trailer"),
        same_blocks=same == blocks,
    )
    if algo == "zstd":
        # python-zstandard's libzstd makes the same frames as overlaybd's libzstd 1.5.4 here.
        assert mine == ref
    elif same == blocks:
        assert mine == ref


@pytest.mark.parametrize("layer", ["L0", "L1", "L2"])
@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_matches_overlaybd_commit_z(layer: str, algo: str, record_property: pytest.RecordProperty) -> None:
    """``overlaybd-commit -z`` rewrites the header (0x1B): same fields and layout from our writer."""
    data = Path(materialize(f"overlaybd/lsmt/commit/{layer}.commit")).read_bytes()
    ref = (OBD / "lsmt" / "commit" / f"{layer}.{algo}.commit").read_bytes()
    mine = write_zfile(data, algorithm=algo, overwrite_header=True)
    check_layout(mine, data, algo=algo, bs=4096, verify=True, overwrite=True)
    same = _identical_blocks(mine, ref)
    blocks = ZFileReader(BytesSource(ref)).block_count
    record_property("identical_blocks", f"{same}/{blocks}")
    for what, a, b in (
        ("header", mine[:RECORD_SIZE], ref[:RECORD_SIZE]),
        ("trailer", mine[-RECORD_SIZE:], ref[-RECORD_SIZE:]),
    ):
        _compare_records(
            ZFileRecord.parse(a, "mine", what), ZFileRecord.parse(b, "ref", what), same_blocks=same == blocks
        )
    if algo == "zstd":
        assert mine == ref


F2 = "aci-hello-world/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"


def _recompress_fixture(rel: str, *, overwrite: bool, old_writer: bool = False) -> tuple[int, int]:
    ref_src = unwrap(FileSource(materialize(rel)))
    ref = ref_src.pread(0, ref_src.size)
    reader = ZFileReader(BytesSource(ref))
    out = io.BytesIO()
    with ZFileWriter(out, overwrite_header=overwrite) as w:
        buf = bytearray(4 << 20)
        pos = 0
        while pos < reader.size:
            n = reader.readinto(memoryview(buf), pos)
            w.write(memoryview(buf)[:n])
            pos += n
    mine = out.getvalue()
    same = _identical_blocks(mine, ref)
    _compare_records(
        ZFileRecord.parse(mine[-RECORD_SIZE:], "m", "trailer"),
        ZFileRecord.parse(ref[-RECORD_SIZE:], "r", "trailer"),
        same_blocks=False,
        old_writer=old_writer,
    )
    return same, reader.block_count


def test_f2_recompressed_with_liblz4(record_property: pytest.RecordProperty) -> None:
    same, blocks = _recompress_fixture(F2, overwrite=True)
    record_property("identical_blocks", f"{same}/{blocks}")
    if lz4.library_version_string() == "1.9.4":
        assert blocks - same == 26  # docs/formats.md §2.7, verified with the same liblz4
    else:
        assert same > 0.99 * blocks


def test_f1_recompressed_with_liblz4(record_property: pytest.RecordProperty) -> None:
    same, blocks = _recompress_fixture("overlaybd/ext4/base/ext4_64", overwrite=False, old_writer=True)
    record_property("identical_blocks", f"{same}/{blocks}")
    if lz4.library_version_string() == "1.9.4":
        assert blocks - same == 157  # docs/formats.md §2.7
    else:
        assert same > 0.99 * blocks


# -- whole-file helpers -----------------------------------------------------------------------------------


def test_compress_and_decompress_file(tmp_path: Path) -> None:
    src = INPUTS / "odd_100003.bin"
    dst = tmp_path / "odd.zfile"
    trailer = compress_file(src, dst, algorithm="zstd", block_size=8192)
    assert dst.read_bytes() == write_zfile(src.read_bytes(), algorithm="zstd", block_size=8192)
    assert trailer == ZFileRecord.parse(dst.read_bytes()[-RECORD_SIZE:], "t", "trailer")
    back = tmp_path / "odd.out"
    assert decompress_file(dst, back) == 100003
    assert back.read_bytes() == src.read_bytes()
    compress_file(src, tmp_path / "odd.ow.zfile", overwrite_header=True)
    assert ZFileReader(FileSource(tmp_path / "odd.ow.zfile")).record_kind == "header"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    compress_file(empty, tmp_path / "empty.zfile")
    assert (tmp_path / "empty.zfile").stat().st_size == 1024
    assert decompress_file(tmp_path / "empty.zfile", tmp_path / "empty.out") == 0
    assert (tmp_path / "empty.out").read_bytes() == b""
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["odd.zfile", "odd.out", "odd.ow.zfile", "empty", "empty.zfile", "empty.out"]
    )  # no temporary files left behind
    with pytest.raises(ObdError):
        compress_file(tmp_path / "missing", tmp_path / "x.zfile")
    assert not (tmp_path / "x.zfile").exists()


def test_decompress_file_streams_a_multi_chunk_file(tmp_path: Path) -> None:
    data = bz2.decompress((OBD / "lsmt" / "commit" / "L0.commit.bz2").read_bytes())
    out = tmp_path / "L0.commit"
    assert decompress_file(OBD / "lsmt" / "commit" / "L0.lz4.commit", out) == len(data)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
