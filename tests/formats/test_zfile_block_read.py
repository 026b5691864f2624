"""One-block reads decoded holding the GIL, and the decode timer of ``--profile``.

A read of exactly one block (what NBD and FUSE clients send) decodes lz4 with liblz4 straight into
the caller's buffer (:class:`obd.zfile.native.NativeLz4Block`) and falls back to the checked decoder
to name a bad block.
"""

from __future__ import annotations

import lz4.block
import pytest
from test_zfile_reader import assemble
from test_zfile_runs import mixed, read_all, zfile

from obd.errors import FormatError
from obd.io.source import BytesSource
from obd.observability.stats import STATS, TIME_DECODE, format_profile
from obd.zfile import ZFileReader, native

MiB = 1 << 20


def _blocks(n: int) -> list[bytes]:
    return [lz4.block.compress(bytes([i % 251]) * 4096, store_size=False) for i in range(n)]


def test_one_block_reads_decode_into_the_callers_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.LZ4_BLOCK is not None, f"{native.LZ4_SONAME} could not be loaded"
    blocks = _blocks(8)
    blocks[5] = lz4.block.compress(b"s" * 4000, store_size=False)  # decodes, but 96 bytes short
    reader = ZFileReader(BytesSource(assemble(blocks, 8 * 4096)))
    buf = bytearray(4096)
    assert reader.readinto(memoryview(buf), 3 * 4096) == 4096
    assert bytes(buf) == bytes([3]) * 4096
    with pytest.raises(FormatError, match="block 5: decompressed to 4000 bytes, expected 4096"):
        reader.readinto(memoryview(buf), 5 * 4096)
    # Whole-block reads go through liblz4's block call (pread too: it reads into a bytearray).
    calls: list[int] = []
    real = native.LZ4_BLOCK.decompress_block_into
    monkeypatch.setattr(
        native.LZ4_BLOCK, "decompress_block_into", lambda a, n, o: calls.append(n) or real(a, n, o)
    )
    assert reader.pread(2 * 4096, 4096) == bytes([2]) * 4096
    assert calls == [len(blocks[2])]


def test_decode_time_is_counted_for_profile() -> None:
    data = mixed(MiB)
    reader = ZFileReader(BytesSource(zfile(data, "zstd")))
    before = STATS.snapshot()["timers"].get(TIME_DECODE, 0.0)
    assert read_all(reader, 256 << 10) == data
    assert reader.pread(8192, 4096) == data[8192:12288]
    snap = STATS.snapshot()
    assert snap["timers"][TIME_DECODE] > before
    assert "ZFile blocks decompressed" in format_profile(snap)
