"""The layer-tar reader of ``obd convert``: fixture tars, compression, extension headers, name
cleaning, and every kind of hostile or malformed archive it must refuse before anything is written.

Also home of :func:`make_tar`, the small tar builder the other ``test_convert_*`` modules use.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from sparsetar import FORMATS, gnu_sparse_tar, make_sparse_files

from fixtures import fixture_path
from obd.convert.layertar import (
    DIR,
    FILE,
    HARDLINK,
    SYMLINK,
    HostileTarError,
    Spool,
    TarLimits,
    clean_name,
    open_stream,
    read_layer,
)
from obd.errors import FormatError, ObdError, TruncatedError, UnsupportedError

MTIME = 1700000000


def member(name: str, kind: str = "file", data: bytes = b"", **kw: Any) -> dict[str, Any]:
    """One entry for :func:`make_tar`: kind is file/dir/symlink/hardlink/chr/blk/fifo."""
    return {"name": name, "kind": kind, "data": data, **kw}


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(members: list[dict[str, Any]], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed layer tar of ``members`` (see :func:`member`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m["name"])
            info.type = _TYPES[m["kind"]]
            default_mode = {"dir": 0o755, "symlink": 0o777}.get(m["kind"], 0o644)
            info.mode = m.get("mode", default_mode)
            info.uid = m.get("uid", 0)
            info.gid = m.get("gid", 0)
            info.uname = info.gname = ""
            info.mtime = m.get("mtime", MTIME)
            info.linkname = m.get("link", "")
            info.devmajor = m.get("major", 0)
            info.devminor = m.get("minor", 0)
            if m.get("xattrs"):
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in m["xattrs"].items()}
            data = m["data"] if m["kind"] == "file" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def parse(data: bytes, tmp_path, **kw: Any):
    spool = tmp_path / f"spool-{len(list(tmp_path.iterdir()))}"
    spool.mkdir()
    return read_layer(io.BytesIO(data), spool, name="test.tar", **kw)


def raw_header(
    name: bytes, *, size: int = 0, typeflag: bytes = b"0", size_field: bytes | None = None
) -> bytes:
    """A ustar header with a correct checksum, for archives tarfile refuses to write."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\x00"
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % MTIME
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


# -- well-formed input ------------------------------------------------------------------------------


def test_fixture_layer_parses_like_tarfile(tmp_path):
    path = fixture_path("overlaybd/inputs/tar/layer1.tar")
    stream, raw, kind = open_stream(path)
    with stream, raw:
        layer = parse_stream(stream, tmp_path)
    assert kind == "none"
    assert layer.diff_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert layer.tar_bytes == path.stat().st_size
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [e.name.decode() for e in layer.entries] == [m.name.rstrip("/") for m in members]
    by_name = {e.name: e for e in layer.entries}
    tool = by_name[b"bin/tool"]
    assert tool.kind == FILE and tool.mode == 0o755 and tool.size == 70000
    with tarfile.open(path) as tar:
        assert Path(tool.data).read_bytes() == tar.extractfile("bin/tool").read()
    assert by_name[b"bin/tool-hard"].kind == HARDLINK and by_name[b"bin/tool-hard"].link == b"bin/tool"
    assert by_name[b"etc/abs-link"].kind == SYMLINK and by_name[b"etc/abs-link"].link == b"/etc/hostname"
    assert by_name[b"data/setuid"].mode == 0o4755
    assert by_name[b"dev/null2"].kind == "chr" and (
        by_name[b"dev/null2"].devmajor,
        by_name[b"dev/null2"].devminor,
    ) == (1, 3)
    assert by_name[b"xattr.txt"].xattrs == {b"user.comment": b"hello", b"user.empty": b""}
    assert "data/ünïcödé.txt".encode() in by_name  # PAX path
    longest = max(layer.entries, key=lambda e: len(e.name))
    assert len(longest.name) > 200 and longest.kind == FILE  # PAX path beyond 100 bytes


def parse_stream(stream, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return read_layer(stream, spool, name="fixture")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers_give_the_same_entries_and_diff_id(tmp_path, compression):
    plain = fixture_path("overlaybd/inputs/tar/layer2.tar").read_bytes()
    packed = gzip.compress(plain) if compression == "gzip" else zstandard.ZstdCompressor().compress(plain)
    blob = tmp_path / "blob"
    blob.write_bytes(packed)
    stream, raw, kind = open_stream(blob)
    with stream, raw:
        layer = parse_stream(stream, tmp_path)
    assert kind == compression
    assert layer.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert len(layer.entries) == 17


def test_gnu_long_names_and_links_and_ustar_prefix(tmp_path):
    long_dir = "d" * 120
    members = [
        member(long_dir, "dir"),
        member(f"{long_dir}/file", data=b"x"),
        member("short-link", "hardlink", link=f"{long_dir}/file"),
        member("sym", "symlink", link="t" * 150),
    ]
    gnu = parse(make_tar(members, fmt=tarfile.GNU_FORMAT), tmp_path)
    assert [e.name for e in gnu.entries] == [
        long_dir.encode(),
        f"{long_dir}/file".encode(),
        b"short-link",
        b"sym",
    ]
    assert gnu.entries[2].link == f"{long_dir}/file".encode()
    assert gnu.entries[3].link == b"t" * 150
    # ustar splits a long path into prefix + name
    ustar = parse(
        make_tar([member("p" * 90 + "/" + "n" * 90, data=b"y")], fmt=tarfile.USTAR_FORMAT), tmp_path
    )
    assert ustar.entries[0].name == ("p" * 90 + "/" + "n" * 90).encode()


def test_pax_owner_time_and_global_headers(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}) as tar:
        info = tarfile.TarInfo("big-ids")
        info.uid, info.gid = 3000000000, 4000000000  # beyond the octal fields: PAX records
        info.mtime = 1700000000.75
        tar.addfile(info)
    layer = parse(buf.getvalue(), tmp_path)
    (e,) = layer.entries
    assert (e.uid, e.gid, e.mtime) == (3000000000, 4000000000, 1700000000)


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        (b"a//b/./c/", b"a/b/c"),
        (b"./etc/passwd", b"etc/passwd"),
        (b"a/b/../c", b"a/c"),
        (b"a/../../b", b"../b"),
        (b"/../x", b"/x"),
        (b"./", b"."),
        (b"", b"."),
        (b"..", b".."),
    ],
)
def test_clean_name_is_plan9_cleanname(raw, cleaned):
    assert clean_name(raw) == cleaned


def test_root_and_dot_entries(tmp_path):
    layer = parse(make_tar([member("./", "dir", mode=0o700), member("./a/./b/../c", data=b"1")]), tmp_path)
    assert [(e.name, e.kind) for e in layer.entries] == [(b"", DIR), (b"a/c", FILE)]


def test_old_style_directory_entry(tmp_path):
    data = raw_header(b"olddir/", typeflag=b"\x00") + bytes(1024)
    (e,) = parse(data, tmp_path).entries
    assert e.kind == DIR and e.name == b"olddir"


def test_end_of_stream_without_zero_blocks_and_trailing_bytes_are_hashed(tmp_path):
    data = make_tar([member("f", data=b"abc")])
    body = data[: 512 + 512]  # header + one data block, no end marker
    assert [e.name for e in parse(body, tmp_path).entries] == [b"f"]
    padded = data + bytes(10240)
    layer = parse(padded, tmp_path)
    assert layer.diff_id == "sha256:" + hashlib.sha256(padded).hexdigest()


# -- hostile and malformed input -------------------------------------------------------------------------


def _error(data: bytes, tmp_path, **kw: Any) -> ObdError:
    with pytest.raises(ObdError) as info:
        parse(data, tmp_path, **kw)
    return info.value


def test_absolute_path_is_refused(tmp_path):
    err = _error(make_tar([member("/etc/passwd", data=b"x")]), tmp_path)
    assert isinstance(err, HostileTarError)
    assert "absolute path" in str(err) and "/etc/passwd" in str(err) and err.field == "entry[0]@0.name"


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../x"])
def test_dotdot_escape_is_refused(tmp_path, name):
    err = _error(make_tar([member(name, data=b"x")]), tmp_path)
    assert isinstance(err, HostileTarError) and "climbs out of the image root" in str(err)


@pytest.mark.parametrize(
    ("link", "what"), [("../../etc/shadow", "climbs out"), ("/etc/shadow", "absolute path")]
)
def test_hard_link_escaping_the_root_is_refused(tmp_path, link, what):
    err = _error(make_tar([member("x", "hardlink", link=link)]), tmp_path)
    assert isinstance(err, HostileTarError) and what in str(err) and "hard link target" in str(err)


def test_symlink_targets_are_stored_verbatim_never_followed(tmp_path):
    layer = parse(make_tar([member("up", "symlink", link="../../../../etc/shadow")]), tmp_path)
    assert layer.entries[0].link == b"../../../../etc/shadow"


def test_absurd_size_is_refused_before_reading_data(tmp_path):
    huge = raw_header(b"huge", size_field=b"\x80" + (1 << 62).to_bytes(11, "big"))
    err = _error(huge + bytes(512), tmp_path)
    assert isinstance(err, HostileTarError) and "does not fit" in str(err) and "/huge" in str(err)
    assert not any(any(p.iterdir()) for p in tmp_path.iterdir())  # nothing spooled


def test_total_size_beyond_the_device_is_refused(tmp_path):
    data = make_tar([member(f"f{i}", data=b"z" * 3000) for i in range(4)])
    err = _error(data, tmp_path, limits=TarLimits(max_bytes=10000))
    assert isinstance(err, HostileTarError) and "adds up to more than" in str(err)


def test_spool_space_runs_out_with_a_clear_error(tmp_path):
    data = make_tar([member(f"f{i}", data=b"z" * 3000) for i in range(4)])
    err = _error(data, tmp_path, limits=TarLimits(max_spool=5000))
    assert not isinstance(err, FormatError) and "not enough free space" in str(err)


def test_small_files_spool_to_ram_within_a_budget(tmp_path):
    disk, ram = tmp_path / "disk", tmp_path / "ram"
    disk.mkdir()
    ram.mkdir()
    spool = Spool(disk, ram_dir=str(ram), ram_budget=5000, small=4096)
    data = make_tar(
        [member("a", data=b"1" * 3000), member("b", data=b"2" * 3000), member("c", data=b"3" * 9000)]
    )
    layer = read_layer(io.BytesIO(data), spool, name="t")
    assert [Path(e.data).parent for e in layer.entries] == [ram, disk, disk]
    assert [Path(e.data).read_bytes()[:1] for e in layer.entries] == [b"1", b"2", b"3"]
    spool.cleanup()
    assert not ram.exists()


def test_negative_base256_size_is_refused(tmp_path):
    err = _error(raw_header(b"neg", size_field=b"\xff" * 12) + bytes(1024), tmp_path)
    assert isinstance(err, FormatError) and "negative" in str(err)


def test_oversized_extension_header_is_refused(tmp_path):
    err = _error(raw_header(b"././@PaxHeader", size=(1 << 20) + 1, typeflag=b"x"), tmp_path)
    assert isinstance(err, HostileTarError) and "extension header" in str(err)


def test_too_many_entries_is_refused(tmp_path):
    data = make_tar([member(f"e{i}", "dir") for i in range(5)])
    err = _error(data, tmp_path, limits=TarLimits(max_entries=4))
    assert isinstance(err, HostileTarError) and "more than 4 entries" in str(err)


def test_truncated_file_data(tmp_path):
    data = make_tar([member("f", data=b"q" * 5000)])
    err = _error(data[:2048], tmp_path)
    assert isinstance(err, TruncatedError) and "/f data" in str(err)


def test_bad_checksum(tmp_path):
    data = bytearray(make_tar([member("f", data=b"1")]))
    data[0] ^= 1
    err = _error(bytes(data), tmp_path)
    assert isinstance(err, FormatError) and "checksum" in str(err)


def test_not_a_tar_at_all(tmp_path):
    err = _error(os.urandom(4096), tmp_path)
    assert isinstance(err, FormatError)


def test_corrupt_gzip_is_a_format_error(tmp_path):
    blob = tmp_path / "bad.gz"
    good = gzip.compress(make_tar([member("f", data=os.urandom(100000))]))
    blob.write_bytes(good[: len(good) // 2] + bytes(100) + good[len(good) // 2 + 100 :])
    stream, raw, _ = open_stream(blob)
    with stream, raw, pytest.raises(FormatError):
        parse_stream(stream, tmp_path)


@pytest.mark.parametrize(
    ("name", "error", "text"),
    [
        ("line\nbreak", UnsupportedError, "line break"),
        ("x" * 256, UnsupportedError, "256-byte component"),
    ],
)
def test_names_ext4_or_debugfs_cannot_take(tmp_path, name, error, text):
    err = _error(make_tar([member(name, data=b"1")]), tmp_path)
    assert isinstance(err, error) and text in str(err)


def test_nul_in_a_pax_path_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x")
        info.pax_headers = {"path": "a\x00b"}
        tar.addfile(info)
    err = _error(buf.getvalue(), tmp_path)
    assert isinstance(err, HostileTarError) and "NUL" in str(err)


# -- sparse members ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gnu_tar_sparse_members_spool_with_their_holes(tmp_path, fmt):
    """Every format GNU tar writes sparse members in: the spooled file has the source's bytes,
    its real size and holes where the source has them; the map says where the data lies."""
    files = make_sparse_files(tmp_path / "src")
    data = gnu_sparse_tar(tmp_path / "src", tmp_path / "s.tar", fmt)
    layer = parse(data, tmp_path)
    by_name = {e.name.decode(): e for e in layer.entries}
    assert set(by_name) == set(files)
    for name, want in files.items():
        e = by_name[name]
        assert e.kind == FILE and e.size == len(want) and e.mode == 0o644, name
        assert e.data is not None and Path(e.data).read_bytes() == want, name
    for name in ("big", "many", "holes"):
        segments = by_name[name].sparse
        assert segments is not None, name
        assert all(files[name][o : o + n].strip(b"\0") for o, n in segments if n >= 4096), name
    assert by_name["holes"].sparse == ()
    assert len(by_name["many"].sparse or ()) == 40  # extension blocks in the old GNU format
    assert os.stat(by_name["big"].data).st_blocks * 512 < 1 << 20  # holes, not 10 MiB of zeros
    # the tar data of a segment is where data_offset and the map say
    big = by_name["big"]
    assert big.sparse is not None
    at = big.data_offset + sum(n for _o, n in big.sparse[:-1])
    assert data[at : at + 3] == b"end"


def sparse_pax(name: str, records: dict[str, str], stored: bytes, *, fake: str | None = None) -> bytes:
    """A PAX tar whose one member carries GNU sparse ``records`` and stores ``stored``: how GNU
    tar's 0.x/1.0 members look, with maps a test can break."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(fake or name)
        info.mtime, info.mode, info.size = MTIME, 0o644, len(stored)
        info.pax_headers = dict(records)
        tar.addfile(info, io.BytesIO(stored))
    return buf.getvalue()


def v01(size: int, pairs: list[tuple[int, int]], **extra: str) -> dict[str, str]:
    numbers = ",".join(f"{o},{n}" for o, n in pairs)
    return {"GNU.sparse.size": str(size), "GNU.sparse.map": numbers, **extra}


def test_unaligned_sparse_segments_read_back(tmp_path):
    """Segments at odd offsets with odd lengths (tar itself writes 512-byte ones) are still placed."""
    data = sparse_pax("odd", v01(5000, [(3, 10), (1000, 7), (4999, 1)]), b"A" * 10 + b"B" * 7 + b"C")
    (e,) = parse(data, tmp_path).entries
    want = bytearray(5000)
    want[3:13], want[1000:1007], want[4999:] = b"A" * 10, b"B" * 7, b"C"
    assert e.data is not None and Path(e.data).read_bytes() == want and e.size == 5000


def _v10(map_text: bytes, stored: bytes, size: int = 8192) -> bytes:
    block = map_text + bytes(-len(map_text) % 512)
    records = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "f"}
    return sparse_pax(
        "f", {**records, "GNU.sparse.realsize": str(size)}, block + stored, fake="x/GNUSparseFile.1/f"
    )


@pytest.mark.parametrize(
    "data, error, field, text",
    [
        (sparse_pax("f", v01(8192, [(4096, 4), (0, 4)]), b"12345678"), FormatError, "map[1]", "out of order"),
        (sparse_pax("f", v01(8192, [(0, 6), (4, 2)]), b"12345678"), FormatError, "map[1]", "overlapping"),
        (
            sparse_pax("f", v01(100, [(96, 8)]), b"12345678"),
            FormatError,
            "map[0]",
            "past the file's real size",
        ),
        (sparse_pax("f", v01(8192, [(0, 4)]), b"12345678"), FormatError, "map", "member stores 8"),
        (
            sparse_pax("f", v01(8192, [(0, 4), (9, 4)], **{"GNU.sparse.numblocks": "3"}), b"12345678"),
            FormatError,
            "numblocks",
            "says 3",
        ),
        (
            sparse_pax("f", {"GNU.sparse.size": "8192", "GNU.sparse.map": "0,4,x,4"}, b"12345678"),
            FormatError,
            "GNU.sparse.map",
            "not a decimal",
        ),
        (
            sparse_pax("f", {"GNU.sparse.size": "8192", "GNU.sparse.map": "0,4,9"}, b"1234"),
            FormatError,
            "GNU.sparse.map",
            "odd count",
        ),
        (sparse_pax("f", {"GNU.sparse.map": "0,4"}, b"1234"), FormatError, "GNU.sparse.size", "without"),
        (
            sparse_pax("f", {"GNU.sparse.major": "2", "GNU.sparse.minor": "0"}, b""),
            UnsupportedError,
            "GNU.sparse.major",
            "2.0 is not supported",
        ),
        (_v10(b"2\n0\n4\n100\n4\n", b"12345678"), None, None, None),
        (_v10(b"1\n0\n4\n", b"12345678"), FormatError, "sparse.map", "member stores 8"),
        (_v10(b"1\n0\nfour\n", b"1234"), FormatError, "numbytes[0]", "not decimal"),
        (_v10(b"1\n0\n4\nx", b"1234"), FormatError, "sparse.map", "garbage after"),
        (_v10(b"%d\n" % (1 << 30), b""), HostileTarError, "count", "sparse map entries"),
        (_v10(b"300\n" + b"0\n" * 254, b""), FormatError, "offset[127]", "runs past"),
    ],
    ids=[
        "order",
        "overlap",
        "past-size",
        "stored-size",
        "numblocks",
        "not-a-number",
        "odd-map",
        "no-size",
        "version",
        "v1.0-good",
        "v1.0-stored-size",
        "v1.0-not-a-number",
        "v1.0-garbage",
        "v1.0-count",
        "v1.0-map-cut",
    ],
)
def test_corrupt_sparse_maps_are_refused(tmp_path, data, error, field, text):
    if error is None:
        (e,) = parse(data, tmp_path).entries
        assert e.name == b"f" and e.sparse == ((0, 4), (100, 4)) and e.size == 8192
        assert e.data is not None and Path(e.data).read_bytes() == b"1234" + bytes(96) + b"5678" + bytes(8088)
        return
    err = _error(data, tmp_path)
    assert isinstance(err, error), err
    assert err.path == "test.tar" and field in (err.field or "") and text in str(err), err


def test_gnu_old_sparse_header_damage_is_refused(tmp_path):
    """The old GNU ``S`` header: a map entry that is not octal, a real size below the map, and a
    map whose lengths do not add up to the stored size, each named by field."""
    make_sparse_files(tmp_path / "src")
    good = gnu_sparse_tar(tmp_path / "src", tmp_path / "s.tar", "gnu", ["big"])
    assert good[156:157] == b"S"

    def patched(at: int, value: bytes) -> bytes:
        block = bytearray(good[:512])
        block[at : at + len(value)] = value
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\x00 " % sum(block)
        return bytes(block) + good[512:]

    err = _error(patched(386 + 24, b"0000000x000\x00"), tmp_path)  # second entry's offset
    assert isinstance(err, FormatError) and err.field == "entry[0]@0.sparse[1].offset", err
    err = _error(patched(483, b"00000001000\x00"), tmp_path)  # realsize 512
    assert isinstance(err, FormatError) and "past the file's real size" in str(err), err
    assert err.field is not None and err.field.startswith("entry[0]@0.sparse["), err
    err = _error(patched(386 + 12, b"00000000001\x00"), tmp_path)  # first length 1 instead of 4096
    assert isinstance(err, FormatError) and "member stores" in str(err), err
    # an empty third entry ends the map: the fourth after it is refused
    err = _error(patched(386 + 2 * 24, bytes(24)), tmp_path)
    assert isinstance(err, FormatError) and err.field == "entry[0]@0.sparse[3]", err


def test_hard_link_to_itself_or_the_root(tmp_path):
    assert "itself" in str(_error(make_tar([member("a", "hardlink", link="a")]), tmp_path))
    assert "root directory" in str(_error(make_tar([member("a", "hardlink", link="./")]), tmp_path))


def test_device_numbers_out_of_range(tmp_path):
    err = _error(make_tar([member("dev", "chr", major=5000, minor=1)]), tmp_path)
    assert isinstance(err, FormatError) and "out of Linux's range" in str(err)
