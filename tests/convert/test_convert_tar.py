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


def test_gnu_sparse_files_are_unsupported(tmp_path):
    err = _error(raw_header(b"sparse", typeflag=b"S") + bytes(1024), tmp_path)
    assert isinstance(err, UnsupportedError) and "GNU sparse" in str(err)


def test_hard_link_to_itself_or_the_root(tmp_path):
    assert "itself" in str(_error(make_tar([member("a", "hardlink", link="a")]), tmp_path))
    assert "root directory" in str(_error(make_tar([member("a", "hardlink", link="./")]), tmp_path))


def test_device_numbers_out_of_range(tmp_path):
    err = _error(make_tar([member("dev", "chr", major=5000, minor=1)]), tmp_path)
    assert isinstance(err, FormatError) and "out of Linux's range" in str(err)
