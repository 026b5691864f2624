"""The overlaybd-style tools through the ``obd`` command line: create, commit, seal, merge, zfile."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from fixtures import expected, fixture_path, materialize, sha256_file
from obd.cli import build_parser, main
from obd.image.local import open_layer, open_layers

RW = "overlaybd/lsmt/rw"
UUID = {
    "L0": "11111111-1111-4111-8111-111111111111",
    "L1": "22222222-2222-4222-8222-222222222222",
    "L2": "33333333-3333-4333-8333-333333333333",
}


def obd(*args: str) -> int:
    return main([*args, "-q"] if args[0] in ("export", "commit", "merge") else list(args))


@pytest.fixture()
def rw(tmp_path):
    for name in ("L0", "L1", "L2"):
        shutil.copy(materialize(f"{RW}/{name}.data"), tmp_path / f"{name}.data")
        shutil.copy(fixture_path(f"{RW}/{name}.index"), tmp_path / f"{name}.index")
    return tmp_path


def stack_sha(paths) -> str:
    st = open_layers([str(p) for p in paths])
    try:
        return hashlib.sha256(st.pread(0, st.size)).hexdigest()
    finally:
        st.close()


def device(name):
    return next(s for s in expected()["stacks"] if s["name"] == name)["sha256"]


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: obd " + name in out
    assert {"export", "inspect", "create", "commit", "merge", "zfile", "demo"} <= set(commands)


def test_commit_cli_is_byte_identical_to_overlaybd_commit(rw, tmp_path):
    for name, parent in (("L1", UUID["L0"]), ("L2", UUID["L1"])):
        out = tmp_path / f"{name}.commit"
        assert (
            obd(
                "commit",
                str(rw / f"{name}.data"),
                str(rw / f"{name}.index"),
                str(out),
                "--uuid",
                UUID[name],
                "--parent-uuid",
                parent,
            )
            == 0
        )
        assert out.read_bytes() == fixture_path(f"overlaybd/lsmt/commit/{name}.commit").read_bytes()
    out = tmp_path / "msg.commit"
    assert (
        obd(
            "commit",
            str(rw / "L2.data"),
            str(rw / "L2.index"),
            str(out),
            "--uuid",
            UUID["L2"],
            "--parent-uuid",
            UUID["L1"],
            "-m",
            "hello commit message",
        )
        == 0
    )
    assert out.read_bytes() == fixture_path("overlaybd/lsmt/commit/L2.msg.commit").read_bytes()


def test_commit_zstd_is_byte_identical_and_lz4_reads_back(rw, tmp_path):
    """zstd bytes match overlaybd's (same libzstd); LZ4 may differ (lz4 1.8.3 vs 1.9) but decodes equal."""
    out = tmp_path / "L1.zstd.commit"
    assert (
        obd(
            "commit",
            "-z",
            "--algorithm",
            "zstd",
            str(rw / "L1.data"),
            str(rw / "L1.index"),
            str(out),
            "--uuid",
            UUID["L1"],
            "--parent-uuid",
            UUID["L0"],
        )
        == 0
    )
    assert out.read_bytes() == fixture_path("overlaybd/lsmt/commit/L1.zstd.commit").read_bytes()
    out = tmp_path / "L2.tar.commit"
    assert (
        obd(
            "commit",
            "-z",
            "-t",
            str(rw / "L2.data"),
            str(rw / "L2.index"),
            str(out),
            "--uuid",
            UUID["L2"],
            "--parent-uuid",
            UUID["L1"],
        )
        == 0
    )
    layer = open_layer(out)
    assert layer.blob.kinds == ["tar", "zfile", "lsmt"]
    assert layer.blob.zfile.header.flags & 0xFF == 0x1B  # header rewritten at the end, as -z does
    assert stack_sha(
        [materialize("overlaybd/lsmt/commit/L0.commit"), fixture_path("overlaybd/lsmt/commit/L1.commit"), out]
    ) == device("L0L1L2/plain")


def test_seal_and_commit_sealed(rw, tmp_path):
    assert obd("commit", "--seal", str(rw / "L1.data"), str(rw / "L1.index")) == 0
    assert stack_sha([rw / "L1.data"]) == device("L1/sealed")
    out = tmp_path / "from-sealed.commit"
    assert (
        obd(
            "commit",
            "--commit-sealed",
            str(rw / "L1.data"),
            str(out),
            "--uuid",
            UUID["L1"],
            "--parent-uuid",
            UUID["L0"],
        )
        == 0
    )
    assert out.read_bytes() == fixture_path("overlaybd/lsmt/seal/L1.from-sealed.commit").read_bytes()


def test_create_write_commit_round_trip(tmp_path):
    data, index = tmp_path / "d", tmp_path / "i"
    assert obd("create", str(data), str(index), "1", "-u", UUID["L0"]) == 0
    from obd.lsmt.rw import open_rw

    layer = open_rw(str(data), str(index))
    assert layer.virtual_size == 1 << 30 and layer.parent_uuid == UUID["L0"]
    layer.pwrite(b"x" * 8192, 1 << 20)
    layer.close()
    out = tmp_path / "c"
    assert obd("commit", str(data), str(index), str(out)) == 0
    ly = open_layer(out)
    assert ly.uuid == "00000000-0000-0000-0000-000000000000" and ly.parent_uuid == UUID["L0"]
    assert open_layers([out]).pread(1 << 20, 8192) == b"x" * 8192
    sparse = tmp_path / "s"
    assert obd("create", "-s", str(sparse), str(tmp_path / "si"), "0.5") == 0
    assert sparse.stat().st_size == (1 << 29) + 4096


def test_merge_reads_like_the_stack(tmp_path):
    layers = [
        materialize(f"overlaybd/lsmt/commit/{n}") for n in ("L0.commit", "L1.lz4.commit", "L2.zstd.commit")
    ]
    out = tmp_path / "merged"
    assert obd("merge", *map(str, layers), "-o", str(out)) == 0
    merged = open_layer(out)
    assert merged.blob.kinds == ["zfile", "lsmt"]
    assert stack_sha([out]) == device("L0L1L2/plain")
    assert merged.parent_uuid == "00000000-0000-0000-0000-000000000000"  # the bottom layer's parent
    tags = set(merged.blob.source.pread(merged.trailer.index_offset, merged.counts.slots * 16)[15::16])
    assert {0, 1, 2} <= tags | {0}  # on-disk tags keep the source layer number (0 = top)
    plain = tmp_path / "merged.plain"
    assert obd("merge", *map(str, layers), "-o", str(plain), "--no-compress") == 0
    assert open_layer(plain).blob.kinds == ["lsmt"] and stack_sha([plain]) == device("L0L1L2/plain")


def test_zfile_cli_round_trip_and_verify(tmp_path, capsys):
    src = fixture_path("overlaybd/inputs/zfile/text_200k.txt")
    z = tmp_path / "t.zfile"
    assert main(["zfile", "compress", str(src), str(z), "--algorithm", "zstd", "--bs", "64", "-q"]) == 0
    # byte for byte what overlaybd-zfile wrote for the same input (zstd: same libzstd)
    assert z.read_bytes() == fixture_path("overlaybd/zfile/cli/text_200k.txt.zstd.bs64.zfile").read_bytes()
    back = tmp_path / "t.out"
    assert main(["zfile", "decompress", str(z), str(back), "-q"]) == 0
    assert back.read_bytes() == src.read_bytes()
    assert main(["zfile", "verify", str(z)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = bytearray(z.read_bytes())
    bad[600] ^= 0xFF
    z.write_bytes(bad)
    assert main(["zfile", "verify", str(z)]) == 1
    assert "crc" in capsys.readouterr().err.lower()


def test_zfile_decompress_of_a_tar_wrapped_overlaybd_file(tmp_path):
    out = tmp_path / "o"
    assert (
        main(
            [
                "zfile",
                "decompress",
                str(fixture_path("overlaybd/zfile/cli/odd_100003.bin.lz4.bs4.zfile.tar")),
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert sha256_file(out) == sha256_file(fixture_path("overlaybd/inputs/zfile/odd_100003.bin"))


def test_bad_arguments_are_clear(tmp_path, capsys):
    assert main(["export", "-o", str(tmp_path / "x")]) == 1
    assert "no image given" in capsys.readouterr().err
    assert main(["commit", "a", "b", "c", "d"]) == 1
    assert "expected DATA INDEX OUT" in capsys.readouterr().err
    assert main(["commit", str(tmp_path / "nope"), str(tmp_path / "n2"), str(tmp_path / "o")]) == 1
    assert "cannot open" in capsys.readouterr().err


# sha256 of overlaybd outputs that are not stored in fixtures/ (kept back upstream), from its MANIFEST
SPARSE_COMMIT_SHA = {
    "L0": (
        "f2e4b80411edf4ba459497f522dc02625d64cf36314574aad7194a9021cf03c2",
        "ee58e9ee576f44e58fa405d98bbd19b324dbbcddfa54e5469172ceda217b0095",
    ),
    "L1": (
        "2fdd6dcc350c62cfe7bdbea0d4269a31720231bd3d10536e12b7ef413689d177",
        "56116b2cb10b19917ed9f6b3a9e4288bf864bbd8cc6f19706e0347a74a0c0951",
    ),
    "L2": (
        "2edc39eae7388a30cf9bb42d529471958766e3d61a37627e730fc9678f9f519c",
        "7f2008f132425258747e9502505e207e880c74ffee51140a81f5d3b1bc25fd4a",
    ),
}
MERGED_NOCOMPRESS_SHA = "2ed006ff2c6659e0270868869e4dbf74c87533d754a5a3c1344aa81d35b5665a"


@pytest.mark.parametrize("name", ["L0", "L1", "L2"])
def test_sparse_rw_commits_are_byte_identical_to_overlaybds(tmp_path, name):
    """The MANIFEST's ops through a sparse RW layer, committed plain and -z zstd: overlaybd's exact bytes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mi", fixture_path("overlaybd/make_inputs.py"))
    mi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mi)
    data, index = tmp_path / "data", tmp_path / "index"
    parent = {"L0": None, "L1": UUID["L0"], "L2": UUID["L1"]}[name]
    assert (
        obd(
            "create",
            "-s",
            str(data),
            str(index),
            str(mi.LSMT_VSIZE),
            "--bytes",
            "--uuid",
            UUID[name],
            *(["-u", parent] if parent else []),
        )
        == 0
    )
    from obd.lsmt.rw import open_rw

    layer = open_rw(str(data), str(index))
    for op in mi.LSMT_OPS[name]:
        if op[0] == "write":
            layer.pwrite(mi.LSMT_PAYLOADS[op[2]](), op[1])
        else:
            layer.trim(op[1], op[2])
    layer.close()
    plain, zstd = SPARSE_COMMIT_SHA[name]
    for extra, want in (([], plain), (["-z", "--algorithm", "zstd"], zstd)):
        out = tmp_path / "out"
        assert obd("commit", str(data), str(index), str(out), "--uuid", UUID[name], *extra) == 0
        assert sha256_file(out) == want


def test_merge_matches_overlaybd_merge(tmp_path):
    layers = [materialize(f"overlaybd/lsmt/commit/{n}") for n in ("L0.commit", "L1.commit", "L2.commit")]
    out = tmp_path / "m"
    assert obd("merge", *map(str, layers), "-o", str(out), "--no-compress") == 0
    assert sha256_file(out) == MERGED_NOCOMPRESS_SHA
    assert obd("merge", *map(str, layers), "-o", str(out)) == 0
    z = open_layer(out).blob.zfile
    assert (
        z.header.flags & 0xFF == 0x13 and z.trailer.flags & 0xFF == 0x16
    )  # merge leaves the header as written
    assert z.block_count == 2614 and z.trailer.index_size == 2614
