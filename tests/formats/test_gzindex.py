"""gzip index ("ddgzidx"): byte-exact building and random-access reads of the decompressed stream."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import struct
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import FIXTURES
from obd.errors import ChecksumError, FormatError, ObdError, TruncatedError, UnsupportedError
from obd.formats.crc import crc32c_raw
from obd.formats.gzindex import (
    ALGO_NONE,
    ALGO_ZLIB,
    ENTRY_STRUCT,
    HEADER_SIZE,
    HEADER_STRUCT,
    WINSIZE,
    GzipIndex,
    GzipIndexedSource,
    GzipIndexHeader,
    build_gzip_index,
    is_gzip,
    open_gzip_indexed,
)
from obd.io.source import BytesSource, FileSource

LAYER1_GZ = FIXTURES / "overlaybd" / "inputs" / "tar" / "layer1.tar.gz"
LAYER1_TAR = FIXTURES / "overlaybd" / "inputs" / "tar" / "layer1.tar"
#: sha256 of the gzip.meta overlaybd's turboOCI-apply built for layer1.tar.gz (MANIFEST §4.2).
LAYER1_META_SHA256 = "446e6bfb9c0ce8ffc35e4c00f9a3c6fc0c2a190c5ac95765eb7e90338fc6e0af"


def _index_bytes(gz: bytes, **kw) -> bytes:
    out = io.BytesIO()
    build_gzip_index(BytesSource(gz, name="in.gz"), out, **kw)
    return out.getvalue()


def _gzip_wrap(deflate: bytes, raw: bytes) -> bytes:
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + deflate + struct.pack("<II", zlib.crc32(raw), len(raw) & 0xFFFFFFFF)


def _mixed_gzip(seed: int = 7) -> tuple[bytes, bytes]:
    """~3.5 MiB of text and random data in one gzip member, deflate fragments at levels 0/1/6/9.

    Each fragment ends with a sync flush, so the stream holds stored blocks (level 0, and the
    empty flush blocks), Huffman blocks ending mid-byte, and block boundaries of every kind.
    """
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnop \n") for _ in range(rnd.randint(2, 9))) for _ in range(400)]
    raw_parts, deflate_parts = [], []
    levels = [6, 0, 9, 1, 6, 0, 6, 9]
    for i, level in enumerate(levels):
        if i % 3 == 2:
            data = rnd.randbytes(rnd.randint(150_000, 300_000))
        else:
            data = b" ".join(rnd.choice(words) for _ in range(rnd.randint(40_000, 90_000)))
        comp = zlib.compressobj(level, zlib.DEFLATED, -15)
        last = i == len(levels) - 1
        deflate_parts.append(comp.compress(data) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH))
        raw_parts.append(data)
    raw = b"".join(raw_parts)
    gz = _gzip_wrap(b"".join(deflate_parts), raw)
    assert gzip.decompress(gz) == raw
    return raw, gz


@pytest.fixture(scope="module")
def mixed() -> tuple[bytes, bytes]:
    return _mixed_gzip()


def _next_block_type(gz: bytes, en_pos: int, bits: int) -> int:
    """BTYPE of the deflate block that starts at an index entry."""
    v = (gz[en_pos - 1] >> (8 - bits)) | (gz[en_pos] << bits) if bits else gz[en_pos]
    return (v >> 1) & 3


def _check_reads(src, raw: bytes, rnd: random.Random, count: int = 150) -> None:
    size = len(raw)
    assert src.size == size
    offsets = [0, 1, size - 1, size, size + 10, max(size - 5000, 0)]
    offsets += [rnd.randrange(size) for _ in range(count)]
    for off in offsets:
        n = rnd.choice([1, 100, 4096, 65536, 200_000, rnd.randrange(1, 300_000)])
        assert src.pread(off, n) == raw[off : off + n], (off, n)


# -- the overlaybd-made index ---------------------------------------------------------------------


def test_layer1_index_is_byte_identical_to_overlaybd(tmp_path: Path) -> None:
    out = tmp_path / "gzip.meta"
    header = build_gzip_index(LAYER1_GZ, out)
    data = out.read_bytes()
    assert len(data) == 405
    assert hashlib.sha256(data).hexdigest() == LAYER1_META_SHA256
    assert header.pack() == data[:HEADER_SIZE]
    assert header.index_num == 1
    assert header.span == 1 << 20 and header.dict_compress_level == 6
    assert header.dict_compress_algo == ALGO_ZLIB
    assert header.gzip_file_size == LAYER1_GZ.stat().st_size
    assert header.uncompress_file_size == LAYER1_TAR.stat().st_size


def test_layer1_reads(tmp_path: Path) -> None:
    meta = tmp_path / "gzip.meta"
    build_gzip_index(LAYER1_GZ, meta)
    raw = LAYER1_TAR.read_bytes()
    assert gzip.decompress(LAYER1_GZ.read_bytes()) == raw
    with open_gzip_indexed(LAYER1_GZ, meta) as src:
        assert src.pread(0, src.size) == raw
        _check_reads(src, raw, random.Random(1))
        assert src.pread(len(raw), 10) == b""
        assert src.pread(len(raw) - 3, 10) == raw[-3:]
        buf = bytearray(1000)
        assert src.readinto(memoryview(buf), len(raw) + 1) == 0


def test_header_struct_sizes() -> None:
    assert HEADER_STRUCT.size == 333 and ENTRY_STRUCT.size == 29
    h = GzipIndexHeader(index_num=3, gzip_file_size=9).sealed()
    assert GzipIndexHeader.unpack(h.pack()) == h
    assert h.crc == crc32c_raw(h.pack()[:329])


def test_is_gzip() -> None:
    assert is_gzip(FileSource(LAYER1_GZ))
    assert not is_gzip(FileSource(LAYER1_TAR))
    assert not is_gzip(BytesSource(b"\x1f"))


# -- many entries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", [ALGO_ZLIB, ALGO_NONE])
def test_multi_entry_index(mixed: tuple[bytes, bytes], algo: int) -> None:
    raw, gz = mixed
    data = _index_bytes(gz, span=65536, algo=algo)
    index = GzipIndex.parse(data, gzip_size=len(gz))
    h = index.header
    assert h.dict_compress_algo == algo and h.index_file_size == len(data)
    entries = [index.entry(i) for i in range(len(index))]
    de = [e[0] for e in entries]
    assert de[0] == 0 and de == sorted(de)
    # at most one entry per span mark; text blocks here are ~100 KiB, so about one per block
    assert 20 <= len(entries) <= len(raw) // 65536 + 1
    assert any(e[3] != 0 for e in entries), "no entry with leftover bits"
    assert any(e[3] == 0 for e in entries[1:])
    assert any(_next_block_type(gz, e[1], e[3]) == 0 for e in entries), "no entry before a stored block"
    assert any(_next_block_type(gz, e[1], e[3]) == 2 for e in entries), "no entry before a dynamic block"
    for i, (de_pos, _, _, _, win_len) in enumerate(entries):
        history = (bytes(WINSIZE) + raw[:de_pos])[-WINSIZE:]
        assert index.window(i) == history
        if algo == ALGO_NONE:
            assert win_len == WINSIZE
    src = GzipIndexedSource(BytesSource(gz, name="mixed.gz"), index)
    _check_reads(src, raw, random.Random(algo))
    # a read starting exactly at each entry, and one crossing it
    for de_pos, *_ in entries:
        assert src.pread(de_pos, 3000) == raw[de_pos : de_pos + 3000]
        lo = max(de_pos - 1000, 0)
        assert src.pread(lo, 2000) == raw[lo : lo + 2000]


def test_sequential_reads_and_whole_stream(mixed: tuple[bytes, bytes]) -> None:
    raw, gz = mixed
    src = GzipIndexedSource(BytesSource(gz), BytesSource(_index_bytes(gz)))
    buf = bytearray(65536)
    got = bytearray()
    pos = 0
    while True:
        n = src.readinto(memoryview(buf), pos)
        if n == 0:
            break
        got += buf[:n]
        pos += n
    assert got == raw
    # backwards, and the same range twice
    for off in range(len(raw) - 70_000, 0, -400_000):
        assert src.pread(off, 70_000) == raw[off : off + 70_000]
        assert src.pread(off, 70_000) == raw[off : off + 70_000]
    src.close()


def test_concurrent_reads(mixed: tuple[bytes, bytes]) -> None:
    raw, gz = mixed
    src = GzipIndexedSource(BytesSource(gz), BytesSource(_index_bytes(gz, span=65536)))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            pos = rnd.randrange(len(raw))
            for _ in range(60):
                if rnd.random() < 0.5:
                    pos = rnd.randrange(len(raw))
                n = rnd.randrange(1, 100_000)
                if src.pread(pos, n) != raw[pos : pos + n]:
                    raise AssertionError(f"mismatch at {pos}+{n}")
                pos += n
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_single_compressor_stream_and_levels() -> None:
    rnd = random.Random(3)
    raw = b"".join(rnd.choice([rnd.randbytes(5000), b"hello world " * 900]) for _ in range(300))
    for level in (0, 9):
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        data = _index_bytes(gz, span=100_000, level=level)
        src = GzipIndexedSource(BytesSource(gz), BytesSource(data))
        assert src.index.header.dict_compress_level == level
        _check_reads(src, raw, rnd, count=60)


def test_empty_and_tiny_gzip() -> None:
    for raw in (b"", b"x"):
        gz = gzip.compress(raw, mtime=0)
        src = GzipIndexedSource(BytesSource(gz), BytesSource(_index_bytes(gz)))
        assert len(src.index) == 1 and src.index.entry(0)[:2] == (0, 10)
        assert src.size == len(raw)
        assert src.pread(0, 10) == raw


def test_only_first_member_is_indexed() -> None:
    raw1, raw2 = b"first member " * 5000, b"second " * 5000
    gz = gzip.compress(raw1, mtime=0) + gzip.compress(raw2, mtime=0)
    src = GzipIndexedSource(BytesSource(gz), BytesSource(_index_bytes(gz)))
    assert src.size == len(raw1)
    assert src.index.header.gzip_file_size == len(gz)
    assert src.pread(0, 1 << 20) == raw1


# -- builder errors -------------------------------------------------------------------------------


def test_builder_rejects_bad_input(mixed: tuple[bytes, bytes]) -> None:
    _, gz = mixed
    with pytest.raises(TruncatedError):
        _index_bytes(gz[: len(gz) // 2])
    with pytest.raises(FormatError):
        _index_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 5000)
    with pytest.raises(FormatError):
        _index_bytes(LAYER1_TAR.read_bytes()[:100_000])
    for kw in ({"span": 1000}, {"algo": 2}, {"level": 10}):
        with pytest.raises(ValueError):
            _index_bytes(gz, **kw)


# -- corrupt indexes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> tuple[bytes, bytes, bytes, bytes]:
    """(raw, gzip, zlib-algo index, raw-algo index) of ~600 KiB with span 65536."""
    raw, gz = _mixed_gzip(seed=11)
    raw, gz = raw[:600_000], gzip.compress(raw[:600_000], compresslevel=6, mtime=0)
    return raw, gz, _index_bytes(gz, span=65536), _index_bytes(gz, span=65536, algo=ALGO_NONE)


def _patch_header(data: bytes, *, fix_crc: bool = True, **fields) -> bytes:
    h = GzipIndexHeader.unpack(data)
    h = GzipIndexHeader(**{**h.__dict__, **fields})
    if fix_crc:
        h = h.sealed()
    return h.pack() + data[HEADER_SIZE:]


def _open(data: bytes, gz: bytes) -> GzipIndexedSource:
    return GzipIndexedSource(BytesSource(gz, name="t.gz"), BytesSource(data, name="t.meta"))


def test_corrupt_header_crc(small) -> None:
    _, gz, data, _ = small
    bad = bytearray(data)
    bad[60] ^= 1  # a reserved byte: only the CRC notices
    with pytest.raises(ChecksumError) as err:
        _open(bytes(bad), gz)
    assert err.value.field == "header.crc" and err.value.path == "t.meta"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"magic": b"ddgzidy\x00"}, "header.magic"),
        ({"index_size": 30}, "header.index_size"),
        ({"window": 65536}, "header.window"),
        ({"span": 4096}, "header.span"),
        ({"index_file_size": 1}, "header.index_file_size"),
        ({"index_area_len": 1}, "header.index_area_len"),
        ({"gzip_file_size": 5}, "header.gzip_file_size"),
        ({"index_num": 0}, "header.index_num"),
        ({"index_num": 1 << 40}, "header.index_num"),
    ],
)
def test_bad_header_fields(small, fields: dict, field: str) -> None:
    _, gz, data, _ = small
    with pytest.raises(FormatError) as err:
        _open(_patch_header(data, **fields), gz)
    assert err.value.field == field


def test_unsupported_version_and_algo(small) -> None:
    _, gz, data, _ = small
    with pytest.raises(UnsupportedError):
        _open(_patch_header(data, major_version=2), gz)
    with pytest.raises(UnsupportedError):
        _open(_patch_header(data, dict_compress_algo=7), gz)


def test_file_size_mismatches(small) -> None:
    _, gz, data, _ = small
    with pytest.raises(FormatError) as err:
        _open(data + b"\x00", gz)
    assert err.value.field == "header.index_file_size"
    with pytest.raises(FormatError) as err:
        _open(data, gz + b"\x00")
    assert err.value.field == "header.gzip_file_size"
    with pytest.raises(TruncatedError):
        _open(data[:200], gz)


def test_truncated_index_area(small) -> None:
    _, gz, data, raw_algo = small
    h = GzipIndexHeader.unpack(data)
    cut = _patch_header(data[:-5], index_file_size=len(data) - 5, index_area_len=h.index_area_len - 5)
    with pytest.raises(FormatError) as err:
        _open(cut, gz)
    assert err.value.field == "index_area"
    h = GzipIndexHeader.unpack(raw_algo)
    cut = _patch_header(raw_algo[:-5], index_file_size=len(raw_algo) - 5, index_area_len=h.index_area_len - 5)
    with pytest.raises(FormatError) as err:
        _open(cut, gz)
    assert err.value.field == "header.index_num"


def _patch_entry(data: bytes, i: int, **fields) -> bytes:
    """Rewrite entry ``i`` of a raw-algo index."""
    h = GzipIndexHeader.unpack(data)
    pos = h.index_start + i * ENTRY_STRUCT.size
    de, en, wp, bits, wl = ENTRY_STRUCT.unpack_from(data, pos)
    vals = {"de_pos": de, "en_pos": en, "win_pos": wp, "bits": bits, "win_len": wl, **fields}
    entry = ENTRY_STRUCT.pack(vals["de_pos"], vals["en_pos"], vals["win_pos"], vals["bits"], vals["win_len"])
    return data[:pos] + entry + data[pos + ENTRY_STRUCT.size :]


@pytest.mark.parametrize(
    ("i", "fields", "field"),
    [
        (0, {"de_pos": 5}, "entry[0].de_pos"),
        (2, {"de_pos": 1}, "entry[2].de_pos"),
        (2, {"de_pos": 1 << 40}, "entry[2].de_pos"),
        (1, {"en_pos": 1 << 40}, "entry[1].en_pos"),
        (1, {"en_pos": 0}, "entry[1].en_pos"),
        (1, {"bits": 8}, "entry[1].bits"),
        (1, {"win_pos": 10}, "entry[1].win_pos"),
        (1, {"win_len": 100}, "entry[1].win_len"),
        (3, {"win_pos": 1 << 40}, "entry[3].win_pos"),
    ],
)
def test_bad_entries(small, i: int, fields: dict, field: str) -> None:
    _, gz, _, data = small
    with pytest.raises(FormatError) as err:
        _open(_patch_entry(data, i, **fields), gz)
    assert err.value.field == field


def test_bad_window_data(small) -> None:
    _, gz, data, _ = small
    index = GzipIndex.parse(data, gzip_size=len(gz))
    _, _, win_pos, _, win_len = index.entry(1)
    bad = bytearray(data)
    bad[win_pos : win_pos + win_len] = bytes(win_len)
    src = _open(bytes(bad), gz)
    assert src.pread(0, 10) == small[0][:10]
    with pytest.raises(FormatError) as err:
        src.pread(index.entry(1)[0] + 5, 10)
    assert err.value.field == "entry[1].window"


def test_size_larger_than_stream(small) -> None:
    raw, gz, data, _ = small
    src = _open(_patch_header(data, uncompress_file_size=len(raw) + 100), gz)
    assert src.pread(0, 100) == raw[:100]
    with pytest.raises(TruncatedError):
        src.pread(len(raw) - 10, 50)


def _smash(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


def _exercise(src: GzipIndexedSource, raw: bytes) -> None:
    for off in (0, 70_000, 200_000, len(raw) - 10, src.size - 1):
        src.pread(max(off, 0), 20_000)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sampled_from([2, 3]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6),
    fix_crc=st.booleans(),
    in_header=st.booleans(),
)
def test_random_index_corruption_only_raises_obd_errors(small, which, edits, fix_crc, in_header) -> None:
    raw, gz = small[0], small[1]
    data = small[which]
    if in_header:
        edits = [(pos % HEADER_SIZE, v) for pos, v in edits]
    else:
        edits = [(HEADER_SIZE + pos % (len(data) - HEADER_SIZE), v) for pos, v in edits]
    bad = _smash(data, edits)
    if fix_crc:
        bad = _patch_header(bad)
    try:
        src = _open(bad, gz)
        _exercise(src, raw)
    except ObdError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4))
def test_random_gzip_corruption_only_raises_obd_errors(small, edits) -> None:
    raw, gz, data, _ = small
    bad = _smash(gz, [(10 + pos % (len(gz) - 10), v) for pos, v in edits])
    try:
        _exercise(_open(data, bad), raw)
    except ObdError:
        pass
    try:
        _index_bytes(bad, span=65536)
    except ObdError:
        pass
