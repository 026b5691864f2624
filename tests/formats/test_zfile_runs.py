"""Runs of ZFile blocks decoded with one call (obd.zfile.codecs ``decompress_run``, obd.zfile.native).

The run decoders rewrite the reader's scratch copy (CRC trailers become LZ4 frame sizes or zstd
checksums) and must give exactly the bytes the block-by-block path gives, on every path: the
system libraries through ctypes, python-lz4's frame call when liblz4 is not there, and
python-zstandard when libzstd is not. The real overlaybd-made fixtures go through the same runs
in test_zfile_reader.py; here the run edges (chunk borders, partial head and tail blocks, the
short last block), damage inside a long run, and frames a run decoder does not take.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading

import lz4.block
import lz4.frame
import pytest
import zstandard
from test_zfile_reader import assemble

from obd.errors import ChecksumError, FormatError
from obd.formats.crc import ZFILE_BLOCK_SEED, crc32c_raw
from obd.io.source import BytesSource
from obd.zfile import ZFileReader, ZFileWriter, native
from obd.zfile import reader as reader_module
from obd.zfile.codecs import RUN_TRAILER

MiB = 1 << 20


def mixed(size: int, seed: int = 7) -> bytes:
    """Random and repetitive 16 KiB pieces (so blocks both compress well and do not)."""
    rnd = hashlib.shake_256(b"runs %d" % seed).digest(size)
    text = (b"the quick brown fox jumps over the lazy dog %d\n" % seed) * (size // 40 + 1)
    return b"".join(
        rnd[p : p + (16 << 10)] if (p >> 14) % 2 else text[p : p + (16 << 10)]
        for p in range(0, size, 16 << 10)
    )[:size]


def zfile(data: bytes, algorithm: str, block_size: int = 4096, verify: bool = True) -> bytes:
    out = io.BytesIO()
    w = ZFileWriter(out, algorithm=algorithm, block_size=block_size, verify=verify)
    w.write(data)
    w.close()
    return out.getvalue()


def read_all(reader: ZFileReader, step: int) -> bytes:
    buf = bytearray(step)
    mv = memoryview(buf)
    parts = []
    pos = 0
    while pos < reader.size:
        n = reader.readinto(mv, pos)
        parts.append(bytes(mv[:n]))
        pos += n
    return b"".join(parts)


def test_the_system_decoders_are_loaded() -> None:
    # Real components: Debian's liblz4 and libzstd are part of the base system (setup.sh).
    assert native.LZ4 is not None, f"{native.LZ4_SONAME} could not be loaded"
    assert native.ZSTD is not None, f"{native.ZSTD_SONAME} could not be loaded (or is older than 1.4.7)"


def test_trailer_key_turns_an_intact_record_into_the_seed() -> None:
    key = reader_module._TRAILER_KEY.to_bytes(4, "little")
    assert crc32c_raw(key) == ZFILE_BLOCK_SEED
    comp = lz4.block.compress(b"x" * 4096, store_size=False)
    rec = bytearray(comp + crc32c_raw(comp, ZFILE_BLOCK_SEED).to_bytes(4, "little"))
    assert crc32c_raw(rec, ZFILE_BLOCK_SEED) == 0
    rec[-4:] = bytes(a ^ b for a, b in zip(rec[-4:], key, strict=True))
    assert crc32c_raw(rec, ZFILE_BLOCK_SEED) == ZFILE_BLOCK_SEED


@pytest.mark.parametrize("decoder", ["native", "python"])
@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", [4096, 16384, 65536])
def test_runs_equal_the_original_on_every_path(
    monkeypatch: pytest.MonkeyPatch, decoder: str, algorithm: str, block_size: int
) -> None:
    if decoder == "python":
        monkeypatch.setattr(native, "LZ4", None)
        monkeypatch.setattr(native, "LZ4_BLOCK", None)
        monkeypatch.setattr(native, "ZSTD", None)
    data = mixed(3 * MiB + 12345)
    blob = zfile(data, algorithm, block_size)
    reader = ZFileReader(BytesSource(blob))
    for step in (4 * MiB, MiB, 256 << 10, 12288, 5000):
        assert read_all(reader, step) == data, step
    last = (len(data) - 1) // block_size
    for j in [*range(40), last]:  # single whole blocks: the one-block path (native: GIL held)
        off = j * block_size
        assert reader.pread(off, block_size) == data[off : off + block_size], j
    rng = random.Random(block_size)
    for _ in range(200):
        off = rng.randrange(len(data))
        n = rng.choice([1, 4096, 8192, 65536, 300000, 5 * MiB])
        assert reader.pread(off, n) == data[off : off + n], (off, n)
    reader.verify()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_runs_without_block_crcs(algorithm: str) -> None:
    data = mixed(2 * MiB + 1)
    reader = ZFileReader(BytesSource(zfile(data, algorithm, verify=False)))
    assert read_all(reader, 4 * MiB) == data


@pytest.mark.parametrize("decoder", ["native", "python"])
def test_a_bad_block_inside_a_long_run_is_named(monkeypatch: pytest.MonkeyPatch, decoder: str) -> None:
    if decoder == "python":
        monkeypatch.setattr(native, "LZ4", None)
    blocks = [lz4.block.compress(bytes([i % 256]) * 4096, store_size=False) for i in range(300)]
    blocks[200] = b"\xff" * 16  # undecodable, with a CRC that matches (assemble computes it)
    reader = ZFileReader(BytesSource(assemble(blocks, 300 * 4096)))
    with pytest.raises(FormatError, match="block 200"):
        reader.pread(0, 300 * 4096)
    # The blocks around it are fine, in runs that end before it or start after it.
    assert reader.pread(0, 200 * 4096) == b"".join(bytes([i % 256]) * 4096 for i in range(200))
    assert reader.pread(201 * 4096, 99 * 4096) == b"".join(bytes([i % 256]) * 4096 for i in range(201, 300))


def test_a_flipped_byte_inside_a_long_run_fails_its_crc() -> None:
    data = mixed(MiB)
    blob = bytearray(zfile(data, "lz4"))
    reader = ZFileReader(BytesSource(bytes(blob)))
    victim = 123
    blob[int(reader.offsets[victim]) + 2] ^= 0x10
    damaged = ZFileReader(BytesSource(bytes(blob)))
    with pytest.raises(ChecksumError, match=f"block {victim}"):
        damaged.pread(0, MiB)
    # The same read, done again, still names it: the span check restored the trailers it keyed.
    with pytest.raises(ChecksumError, match=f"block {victim}"):
        damaged.pread(0, MiB)


def test_zstd_frames_with_their_own_checksum_are_read_block_by_block() -> None:
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    pieces = [bytes([65 + i % 26]) * 4096 for i in range(64)]
    reader = ZFileReader(BytesSource(assemble([cctx.compress(p) for p in pieces], 64 * 4096, algorithm=2)))
    assert reader.pread(0, 64 * 4096) == b"".join(pieces)


def test_runs_from_many_threads() -> None:
    data = mixed(4 * MiB)
    reader = ZFileReader(BytesSource(zfile(data, "lz4")))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                off = rng.randrange(len(data))
                n = rng.choice([4096, 65536, 256 << 10, MiB])
                if reader.pread(off, n) != data[off : off + n]:
                    raise AssertionError(f"thread {seed}: read {n} at {off} differs")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_native_decoders_refuse_bad_input_without_writing_past_the_buffer() -> None:
    assert native.LZ4 is not None and native.ZSTD is not None
    out = bytearray(8192 + 16)
    view = memoryview(out)[:8192]
    frame = bytearray(b"\x04\x22\x4d\x18" + b"\x00" * 11)
    with pytest.raises(native.NativeDecodeError):
        native.LZ4.decompress_into(memoryview(frame), view)
    big = bytearray(zstandard.ZstdCompressor().compress(b"z" * 10000))
    with pytest.raises(native.NativeDecodeError):
        native.ZSTD.decompress_into(memoryview(big), view)
    assert out[8192:] == b"\x00" * 16
    # A failed frame leaves this thread's context usable for the next one.
    good = bytearray(lz4.frame.compress(b"g" * 8192, block_linked=False, store_size=True))
    native.LZ4.decompress_into(memoryview(good), view)
    assert out[:8192] == b"g" * 8192
    assert RUN_TRAILER == 4


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_a_large_read_is_one_native_call(monkeypatch: pytest.MonkeyPatch, algorithm: str) -> None:
    name = algorithm.upper()
    real = getattr(native, name)
    assert real is not None
    calls: list[int] = []

    class Spy:
        def decompress_into(self, frames: memoryview, out: memoryview) -> None:
            calls.append(len(out))
            real.decompress_into(frames, out)

    monkeypatch.setattr(native, name, Spy())
    data = mixed(MiB)
    reader = ZFileReader(BytesSource(zfile(data, algorithm)))
    assert reader.pread(0, MiB) == data
    assert calls == [MiB]
