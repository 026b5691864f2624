"""Tar envelope: reading overlaybd/Go-made envelopes and writing overlaybd's byte for byte."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import FIXTURES
from obd.errors import ChecksumError, FormatError, ObdError, TruncatedError
from obd.formats import tar_envelope as te
from obd.formats.tar_envelope import (
    TarEnvelopeWriter,
    envelope_footer,
    envelope_prefix,
    format_pax_record,
    is_tar_envelope,
    open_envelope,
    placeholder_prefix,
    unwrap,
    unwrap_file,
    wrap_file,
)
from obd.io.source import BytesSource, FileSource

FIX = FIXTURES / "overlaybd"
F2_DIGEST = "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
F2 = FIXTURES / "aci-hello-world" / "blobs" / "sha256" / F2_DIGEST
ZFILE_MAGIC = b"ZFile\x00\x01\x00"

PAIRS = [
    ("lsmt/commit/L2.lz4-tar.commit", "lsmt/commit/L2.lz4.commit"),
    ("zfile/cli/odd_100003.bin.lz4.bs4.zfile.tar", "zfile/cli/odd_100003.bin.lz4.bs4.zfile"),
]
HOST_IS_ROOT = te._host_names() == (b"root", b"root")


def _src(data: bytes, name: str = "env.tar") -> BytesSource:
    return BytesSource(data, name=name)


def _ustar(
    payload: bytes, *, name: str = "overlaybd.commit", mode: int = 0o444, fmt=tarfile.USTAR_FORMAT, **pax
):
    """A Go archive/tar-like wrapper made with Python's tarfile."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, pax_headers=pax.pop("global_pax", None)) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = mode
        info.mtime = 0
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _reseal(block: bytearray, *, signed: bool = False) -> None:
    unsigned, signed_sum = te.header_checksums(bytes(block))
    value = signed_sum if signed else unsigned
    block[148:156] = f"{value & 0o777777:06o}\x00 ".encode()


# -- overlaybd-made fixtures ----------------------------------------------------------------------


@pytest.mark.parametrize(("wrapped", "plain"), PAIRS)
def test_fixture_payload_is_the_plain_file(wrapped: str, plain: str) -> None:
    expect = (FIX / plain).read_bytes()
    with FileSource(FIX / wrapped) as src:
        assert is_tar_envelope(src)
        env = open_envelope(src)
        assert env.payload_offset == 1536 == env.overlaybd_offset
        assert env.payload_size == len(expect)
        assert env.pax_records == {"size": str(len(expect))}
        assert env.name == "overlaybd.commit"
        assert env.mode == 0o100644
        assert env.has_pax
        assert [h.typeflag for h in env.headers] == [b"x", b"0"]
        assert env.header.uname == b"root"
        assert env.payload.pread(0, env.payload.size) == expect
        assert env.payload.pread(len(expect) - 3, 100) == expect[-3:]
        assert env.trailing_size == -(1536 + len(expect)) % 512 + 1024


@pytest.mark.parametrize(("wrapped", "plain"), PAIRS)
def test_writer_reproduces_fixture(wrapped: str, plain: str) -> None:
    payload = (FIX / plain).read_bytes()
    out = io.BytesIO()
    with TarEnvelopeWriter(out, uname="root", gname="root") as w:
        # uneven pieces, as a streaming producer would write them
        for start in range(0, len(payload), 7001):
            w.write(payload[start : start + 7001])
        assert w.tell() == w.size == len(payload)
    assert out.getvalue() == (FIX / wrapped).read_bytes()


@pytest.mark.parametrize("rel", ["ext4/l1/overlaybd.commit", "ext4/l2/overlaybd.commit"])
def test_ext4_commits_are_enveloped_zfiles(rel: str) -> None:
    with FileSource(FIX / rel) as src:
        env = open_envelope(src)
        assert env.payload.read_exact(0, 8, "magic") == ZFILE_MAGIC
        assert env.payload.pread(env.payload_size - 512, 8) == ZFILE_MAGIC  # the ZFile trailer
        assert unwrap(src).size == env.payload_size


def test_f2_prefix_and_footer_from_payload_length() -> None:
    blob = F2.read_bytes()
    with FileSource(F2) as src:
        env = open_envelope(src)
    size = env.payload_size
    assert size == 639491
    assert blob[1536:1544] == ZFILE_MAGIC
    assert envelope_prefix(size, uname="root", gname="root") == blob[:1536]
    assert envelope_footer(size) == blob[1536 + size :]
    assert blob[512:528] == format_pax_record("size", str(size)) + b"\x00"


def test_format_pax_record_self_counting() -> None:
    assert format_pax_record("size", "639491") == b"15 size=639491\n"
    assert format_pax_record("size", "0") == b"9 size=0\n"
    assert format_pax_record("size", "1") == b"9 size=1\n"
    # 8 + len(value) crosses 99 -> 100 here; the carry is fixed up as the C++ does
    for n in range(1, 200):
        rec = format_pax_record("k", "v" * n)
        assert int(rec.split(b" ", 1)[0]) == len(rec)


# -- other producers ------------------------------------------------------------------------------


def test_go_style_ustar_without_pax() -> None:
    payload = bytes(range(256)) * 13
    data = _ustar(payload)
    src = _src(data)
    assert is_tar_envelope(src)
    env = open_envelope(src)
    assert env.payload_offset == 512 == env.overlaybd_offset
    assert not env.has_pax
    assert env.mode == 0o444
    assert env.name == "overlaybd.commit"
    assert env.payload.pread(0, 10_000) == payload


def test_obdconv_extra_zeros_are_harmless() -> None:
    data = (FIX / PAIRS[0][0]).read_bytes() + bytes(1024)
    env = open_envelope(_src(data))
    assert env.payload.pread(0, 1 << 20) == (FIX / PAIRS[0][1]).read_bytes()


def test_signed_checksum_accepted() -> None:
    data = bytearray(_ustar(b"payload!", mode=0o644))
    data[265:269] = "rööt".encode()[:4]  # uname with high bytes: signed and unsigned sums differ
    block = bytearray(data[:512])
    _reseal(block, signed=True)
    unsigned, signed_sum = te.header_checksums(bytes(block))
    assert unsigned != signed_sum
    data[:512] = block
    src = _src(bytes(data))
    assert is_tar_envelope(src)
    env = open_envelope(src)
    assert env.header.signed_checksum
    assert env.payload.pread(0, 8) == b"payload!"


def test_gnu_magic_rejected() -> None:
    data = bytearray(_ustar(b"x" * 600))
    data[257:265] = b"ustar  \x00"
    block = bytearray(data[:512])
    _reseal(block)
    data[:512] = block
    src = _src(bytes(data))
    assert not is_tar_envelope(src)
    with pytest.raises(FormatError):
        open_envelope(src)


def test_pax_path_record() -> None:
    long_name = "d/" * 60 + "overlaybd.commit"
    data = _ustar(b"abc" * 300, name=long_name, fmt=tarfile.PAX_FORMAT)
    env = open_envelope(_src(data))
    assert env.pax_records["path"] == long_name == env.name
    assert [h.typeflag for h in env.headers] == [b"x", b"0"]
    assert env.payload_offset == 1536
    assert env.payload_size == 900 and env.payload.pread(0, 5) == b"abcab"


def test_pax_global_header() -> None:
    data = _ustar(b"abc" * 300, fmt=tarfile.PAX_FORMAT, global_pax={"comment": "hi"})
    env = open_envelope(_src(data))
    assert env.global_records == {"comment": "hi"}
    assert env.pax_records == {}
    assert [h.typeflag for h in env.headers] == [b"g", b"0"]
    assert env.payload_offset == 1536 == env.overlaybd_offset  # any PAX header means 1536 to overlaybd
    # global + per-file PAX header: the payload is at 2560 where overlaybd would read 1536
    data = _ustar(b"abc" * 300, name="x" * 120, fmt=tarfile.PAX_FORMAT, global_pax={"comment": "hi"})
    with pytest.raises(FormatError):
        open_envelope(_src(data))
    env = open_envelope(_src(data), strict=False)
    assert [h.typeflag for h in env.headers] == [b"g", b"x", b"0"]
    assert env.payload_offset == 2560 and env.name == "x" * 120
    assert env.payload.pread(0, 1000) == b"abc" * 300


def test_payload_offset_disagreeing_with_overlaybd() -> None:
    long_name = "n" * 700  # PAX data longer than one block: payload no longer at 1536
    data = _ustar(b"q" * 1000, name=long_name, fmt=tarfile.PAX_FORMAT)
    with pytest.raises(FormatError) as err:
        open_envelope(_src(data))
    assert err.value.field == "payload_offset"
    env = open_envelope(_src(data), strict=False)
    assert env.payload_offset == 2048 and env.overlaybd_offset == 1536
    assert env.name == long_name
    assert env.payload.pread(0, 2000) == b"q" * 1000


def test_payload_size_from_header_when_pax_size_zero() -> None:
    payload = b"z" * 777
    prefix = bytearray(envelope_prefix(0))
    # PAX says size=0: the header's octal size field must be used instead
    head = bytearray(prefix[1024:1536])
    head[124:136] = te._int_to_oct_nonull(len(payload), 12)
    _reseal(head)
    prefix[1024:1536] = head
    data = bytes(prefix) + payload + envelope_footer(len(payload))
    env = open_envelope(_src(data))
    assert env.pax_records == {"size": "0"}
    assert env.payload_size == 777


# -- writer ---------------------------------------------------------------------------------------


def test_placeholder_while_writing_and_after_abort(tmp_path: Path) -> None:
    p = tmp_path / "out.tar"
    with pytest.raises(RuntimeError), TarEnvelopeWriter(p) as w:
        w.write(b"partial data")
        raise RuntimeError("producer failed")
    data = p.read_bytes()
    assert data[:1536] == placeholder_prefix()
    assert data[1024:1037] == b"overlaybd.new"
    assert data[1024 + 257 : 1024 + 265] == b"xxtar\x00xx"
    assert data[512:521] == b"9 size=0\n"
    with FileSource(p) as src:
        assert not is_tar_envelope(src)
        assert unwrap(src) is src


def test_writer_seek_and_pwrite_rewrite_payload_header() -> None:
    payload = bytes(range(256)) * 40
    out = io.BytesIO(b"JUNK")
    out.seek(4)  # the envelope starts at the stream's position
    with TarEnvelopeWriter(out, uname="root", gname="root", mode=0o100600) as w:
        w.write(b"\x00" * 16)  # placeholder header, as a ZFile writer does
        w.write(payload[16:])
        w.pwrite(payload[:16], 0)
        assert w.tell() == len(payload)
        w.seek(-10, 1)
        w.write(payload[-10:])
        assert w.seek(0, 2) == len(payload)
    data = out.getvalue()
    assert data[:4] == b"JUNK"
    body = data[4:]
    assert body == envelope_prefix(len(payload), mode=0o100600, uname="root", gname="root") + payload + (
        envelope_footer(len(payload))
    )
    env = open_envelope(_src(body))
    assert env.mode == 0o100600
    assert body[1024 + 100 : 1024 + 108] == b"100600 \x00"


def test_empty_payload_roundtrip() -> None:
    out = io.BytesIO()
    with TarEnvelopeWriter(out):
        pass
    data = out.getvalue()
    assert len(data) == 1536 + 1024
    env = open_envelope(_src(data))
    assert env.payload_size == 0


@pytest.mark.skipif(not HOST_IS_ROOT, reason="uid 0 / gid 0 are not named root on this host")
def test_wrap_and_unwrap_files(tmp_path: Path) -> None:
    wrapped, plain = PAIRS[0]
    out = tmp_path / "w.tar"
    wrap_file(FIX / plain, out)
    assert out.read_bytes() == (FIX / wrapped).read_bytes()
    back = tmp_path / "back"
    unwrap_file(out, back)
    assert back.read_bytes() == (FIX / plain).read_bytes()


def test_unwrap_file_rejects_non_envelope(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        unwrap_file(FIX / PAIRS[0][1], tmp_path / "x")


def test_writer_rejects_bad_mode() -> None:
    with pytest.raises(ValueError):
        TarEnvelopeWriter(io.BytesIO(), mode=0o7777777)


# -- corrupt input --------------------------------------------------------------------------------

GOOD = (FIX / PAIRS[1][0]).read_bytes()


def test_corrupt_first_checksum_is_not_tar() -> None:
    data = bytearray(GOOD)
    data[3] ^= 0x20
    src = _src(bytes(data))
    assert not is_tar_envelope(src)
    with pytest.raises(FormatError) as err:
        open_envelope(src)
    assert err.value.path == "env.tar" and err.value.field == "header[0]"


def test_corrupt_file_header_checksum() -> None:
    data = bytearray(GOOD)
    data[1024 + 5] ^= 0x01
    with pytest.raises(ChecksumError) as err:
        open_envelope(_src(bytes(data)))
    assert err.value.field == "header[1].chksum"


def test_absurd_pax_size_record() -> None:
    prefix = envelope_prefix(99_999_999_999)
    data = prefix + b"x" * 5000 + envelope_footer(5000)
    with pytest.raises(TruncatedError) as err:
        open_envelope(_src(data))
    assert err.value.field == "payload_size" and err.value.value == 99_999_999_999


def test_absurd_pax_header_size() -> None:
    data = bytearray(GOOD)
    block = bytearray(data[:512])
    block[124:136] = te._int_to_oct_nonull(1 << 30, 12)
    _reseal(block)
    data[:512] = block
    with pytest.raises(FormatError) as err:
        open_envelope(_src(bytes(data)))
    assert err.value.field == "header[0].size"


@pytest.mark.parametrize(
    "record",
    [b"15 size=12345\nX", b"x5 size=1234\n", b"99 size=1234\n", b"14 size=12345\x00", b"14 size12345\n\n"],
)
def test_bad_pax_records(record: bytes) -> None:
    data = bytearray(GOOD)
    block = bytearray(data[:512])
    block[124:136] = te._int_to_oct_nonull(len(record), 12)
    _reseal(block)
    data[:512] = block
    data[512:1024] = record.ljust(512, b"\x00")
    with pytest.raises(FormatError):
        open_envelope(_src(bytes(data)))


def test_non_decimal_pax_size() -> None:
    data = bytearray(GOOD)
    data[512:1024] = b"14 size=0x123\n".ljust(512, b"\x00")
    with pytest.raises(FormatError) as err:
        open_envelope(_src(bytes(data)))
    assert err.value.field == "pax.size"


def test_payload_past_eof_and_truncated_files() -> None:
    with pytest.raises(TruncatedError) as err:
        open_envelope(_src(GOOD[: 1536 + 100]))
    assert err.value.field == "payload_size"
    with pytest.raises(TruncatedError):
        open_envelope(_src(GOOD[:1100]))  # file header cut
    with pytest.raises(TruncatedError):
        open_envelope(_src(GOOD[:300]))
    assert not is_tar_envelope(_src(GOOD[:511]))


def test_chain_too_long() -> None:
    pax = bytearray(GOOD[:1024])
    data = bytes(pax) * 12 + GOOD[1024:]
    with pytest.raises(FormatError) as err:
        open_envelope(_src(data))
    assert err.value.field == "header"


def test_non_regular_entry_rejected() -> None:
    data = bytearray(GOOD)
    head = bytearray(data[1024:1536])
    head[156:157] = b"5"
    _reseal(head)
    data[1024:1536] = head
    with pytest.raises(FormatError) as err:
        open_envelope(_src(bytes(data)))
    assert err.value.field == "header[1].typeflag"


def test_bad_octal_field() -> None:
    data = bytearray(GOOD)
    head = bytearray(data[1024:1536])
    head[100:108] = b"10x644 \x00"
    _reseal(head)
    data[1024:1536] = head
    with pytest.raises(FormatError) as err:
        open_envelope(_src(bytes(data)))
    assert err.value.field == "header[1].mode"


SMALL = _ustar(b"s" * 700, fmt=tarfile.PAX_FORMAT, size="700")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([GOOD[:4096], SMALL, envelope_prefix(100) + b"p" * 100 + envelope_footer(100)]),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
    reseal=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, 4096)),
)
def test_random_corruption_only_raises_obd_errors(base: bytes, edits, reseal: bool, cut: int | None) -> None:
    data = bytearray(base)
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    if reseal:  # keep the checksums right so deeper checks are reached
        for start in range(0, min(len(data), 2048) - 511, 512):
            block = bytearray(data[start : start + 512])
            if block[257:262] == b"ustar":
                _reseal(block)
                data[start : start + 512] = block
    if cut is not None:
        del data[cut:]
    src = _src(bytes(data))
    is_tar_envelope(src)
    for strict in (True, False):
        try:
            env = open_envelope(src, strict=strict)
        except ObdError:
            continue
        assert env.payload_offset + env.payload_size <= len(data)
        assert len(env.payload.pread(0, 1 << 16)) == env.payload_size
        _ = env.name, env.mode


def test_header_numbers_octal_and_gnu_base256():
    """One parser for the envelope and the layer-tar reader: octal, or GNU base-256 whose first
    byte's low seven bits count too; a negative base-256 number is refused, naming the field."""
    assert te.parse_number(b"0000644\x00", path="t", field_name="mode") == 0o644
    assert te.parse_number(b"  17 \x00\x00", path="t", field_name="size") == 0o17
    assert te.parse_number(b"\x00" * 12, path="t", field_name="size") == 0
    assert te.parse_number(b"\x80" + bytes(10) + b"\x05", path="t", field_name="size") == 5
    assert te.parse_number(b"\x81" + bytes(11), path="t", field_name="size") == 1 << 88
    with pytest.raises(FormatError, match="negative") as e:
        te.parse_number(b"\xff" * 12, path="t", field_name="size")
    assert e.value.field == "size"
    with pytest.raises(FormatError, match="not an octal number"):
        te.parse_number(b"12389\x00", path="t", field_name="size")
