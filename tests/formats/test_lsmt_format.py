"""LSMT record and mapping encodings (docs/formats.md §1.2–§1.5)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from obd.errors import FormatError
from obd.lsmt.format import (
    HT_SIZE,
    HT_SPACE,
    INVALID_ENTRY,
    MAGIC0,
    MAGIC1,
    MAX_LENGTH,
    MAX_MOFFSET,
    MAX_OFFSET,
    HeaderTrailer,
    MappingColumns,
    decode_mappings,
    encode_mapping,
    encode_mappings,
    format_uuid,
)


def test_header_round_trip_and_layout():
    h = HeaderTrailer(
        flags=0x07,
        virtual_size=64 << 20,
        uuid=format_uuid("11111111-1111-4111-8111-111111111111"),
        user_tag=b"hello",
    )
    raw = h.pack()
    assert len(raw) == HT_SPACE
    assert raw[:8] == MAGIC0 and raw[8:24] == MAGIC1
    assert struct.unpack_from("<I", raw, 24)[0] == HT_SIZE == 390
    assert raw[132:134] == b"\x01\x01"  # version, sub_version
    assert raw[134:139] == b"hello"
    assert raw[HT_SIZE:] == bytes(HT_SPACE - HT_SIZE)
    assert HeaderTrailer.parse(raw) == h


def test_header_rejects_bad_magic_naming_the_field():
    raw = bytearray(HeaderTrailer(flags=3).pack())
    raw[3] ^= 0xFF
    with pytest.raises(FormatError, match=r"f\.lsmt: header\.magic0="):
        HeaderTrailer.parse(bytes(raw), path="f.lsmt")
    raw = bytearray(HeaderTrailer(flags=3).pack())
    raw[20] ^= 0xFF
    with pytest.raises(FormatError, match="magic1"):
        HeaderTrailer.parse(bytes(raw), path="f.lsmt", what="trailer")


def test_uuid_text_is_upper_case_and_null_by_default():
    assert format_uuid("aaaaaaaa-0001-4000-8000-000000000001") == "AAAAAAAA-0001-4000-8000-000000000001"
    assert format_uuid(None) == "00000000-0000-0000-0000-000000000000"
    with pytest.raises(ValueError):
        format_uuid("not-a-uuid")


def test_mapping_bit_layout_at_the_limits():
    raw = encode_mapping(MAX_OFFSET - 1, MAX_LENGTH, MAX_MOFFSET, True, 255)
    lo, hi = struct.unpack("<QQ", raw)
    assert lo == (MAX_OFFSET - 1) | (MAX_LENGTH << 50)
    assert hi == MAX_MOFFSET | (1 << 55) | (255 << 56)
    cols = decode_mappings(raw)
    assert (cols.offset[0], cols.length[0], cols.moffset[0], bool(cols.zeroed[0]), cols.tag[0]) == (
        MAX_OFFSET - 1,
        MAX_LENGTH,
        MAX_MOFFSET,
        True,
        255,
    )
    assert encode_mappings(cols) == raw


def test_invalid_entry_bytes():
    assert bytes.fromhex("ffffffffffff0300" + "00" * 8) == INVALID_ENTRY
    cols = decode_mappings(INVALID_ENTRY + b"\x01\x02")  # a trailing partial entry is ignored
    assert len(cols) == 1 and cols.offset[0] == MAX_OFFSET and cols.length[0] == 0


def test_bulk_round_trip():
    rng = np.random.default_rng(1)
    n = 1000
    cols = MappingColumns(
        rng.integers(0, MAX_OFFSET, n),
        rng.integers(0, MAX_LENGTH + 1, n),
        rng.integers(0, MAX_MOFFSET, n),
        rng.integers(0, 2, n).astype(bool),
        rng.integers(0, 256, n),
    )
    back = decode_mappings(encode_mappings(cols))
    for name in ("offset", "length", "moffset", "zeroed", "tag"):
        assert (getattr(back, name) == getattr(cols, name)).all()
