"""``obd export`` of every fixture stack: the device SHA-256 overlaybd computed, sparse output, ext4 trees."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest
from ext4tree import compare_trees, e2fsck_clean, read_file, read_tree

from fixtures import expected, fixture_path, materialize, require_tool, resolved_config, sha256_file
from obd.cli import main
from obd.image.local import open_layers
from obd.layer.tools import ZERO_BLOCK, nonzero_runs

SMALL = [s for s in expected()["stacks"] if s["vsize"] <= 1 << 30]
EXT4 = [s for s in expected()["stacks"] if s["name"].startswith("ext4/")]


def export(tmp_path, entry, *extra):
    out = tmp_path / "device.img"
    if entry["config"]:
        args = ["--config", str(resolved_config(entry["config"]))]
    else:
        args = [str(materialize(rel)) for rel in entry["layers"]]
    assert main(["export", *args, "-o", str(out), "-q", *extra]) == 0
    return out


@pytest.mark.parametrize("entry", SMALL, ids=[s["name"] for s in SMALL])
def test_export_gives_overlaybds_device_sha(tmp_path, entry):
    out = export(tmp_path, entry)
    assert out.stat().st_size == entry["vsize"]
    assert sha256_file(out) == entry["sha256"]


def test_export_is_sparse_and_atomic(tmp_path):
    entry = next(s for s in SMALL if s["name"] == "L0L1L2/lz4")
    out = export(tmp_path, entry)
    stack = open_layers([materialize(r) for r in entry["layers"]])
    data = sum(e.length for e in stack.extents() if e.kind == "data")
    assert out.stat().st_blocks * 512 <= data + (1 << 20)  # holes stay holes
    fd = os.open(out, os.O_RDONLY)
    try:
        first_hole = os.lseek(fd, 0, os.SEEK_HOLE)
    finally:
        os.close(fd)
    assert first_hole < entry["vsize"]
    assert sorted(os.listdir(tmp_path)) == ["device.img"]  # no temporary left behind


def test_export_config_with_relative_paths_from_anywhere(tmp_path, monkeypatch):
    """cfg/*.json name blobs relative to the fixture root; obd finds them from another directory too."""
    entry = next(s for s in SMALL if s["name"] == "L0L1L2/cfg-mixed")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mixed.img"
    assert main(["export", "--config", str(fixture_path(entry["config"])), "-o", str(out), "-q"]) == 0
    assert sha256_file(out) == entry["sha256"]


def test_export_to_stdout(tmp_path, capfdbinary):
    entry = next(s for s in SMALL if s["name"] == "L1/sealed")
    assert main(["export", str(materialize(entry["layers"][0])), "-o", "-", "-q"]) == 0
    out = capfdbinary.readouterr().out
    assert len(out) == entry["vsize"] and hashlib.sha256(out).hexdigest() == entry["sha256"]


def merged_index_facts(rel):
    raw = fixture_path(rel).read_bytes()
    return json.loads(bz2.decompress(raw) if rel.endswith(".bz2") else raw)


@pytest.mark.parametrize("entry", EXT4, ids=[s["name"] for s in EXT4])
def test_ext4_stacks_export_to_a_clean_filesystem_with_the_right_tree(tmp_path, entry):
    require_tool("debugfs")
    require_tool("e2fsck")
    out = export(tmp_path, entry)
    stack = open_layers([materialize(r) for r in entry["layers"]])
    if entry.get("extents"):
        facts = merged_index_facts(entry["extents"])
        ours = list(stack.lower_index)
        assert [(o, ln, int(z), t) for o, ln, _m, z, t in ours] == [
            (e["offset"], e["length"], e["zeroed"], e["tag"]) for e in facts
        ]
        with open(out, "rb") as f:
            for e in facts:
                if not e["zeroed"]:
                    f.seek(e["offset"] * 512)
                    assert hashlib.sha256(f.read(e["length"] * 512)).hexdigest() == e["sha256"], e
    ok, report = e2fsck_clean(out)
    assert ok, report
    if entry.get("tree"):
        want = json.loads(fixture_path(entry["tree"]).read_text())
        assert compare_trees(read_tree(out), want) == []


@pytest.mark.slow
@pytest.mark.parametrize("entry", EXT4, ids=[s["name"] for s in EXT4])
def test_ext4_stack_full_device_sha(tmp_path, entry):
    """Hashing 64 GiB takes minutes: only with --run-slow."""
    assert sha256_file(export(tmp_path, entry)) == entry["sha256"]


def plain_hello(layout) -> bytes:
    """/hello of the plain amd64 image of the aci-hello-world layout (one gzip tar layer)."""
    index = json.loads((layout / "index.json").read_text())
    plain = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "amd64"
    )
    manifest = json.loads((layout / "blobs" / "sha256" / plain["digest"].split(":")[1]).read_text())
    layer = (layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        return tar.extractfile("hello").read()


def test_aci_hello_world_layout_exports_the_hello_binary(tmp_path):
    require_tool("debugfs")
    layout = fixture_path("aci-hello-world/oci-layout").parent
    out = tmp_path / "hw.img"
    assert main(["export", f"oci:{layout}:amd64-converted", "-o", str(out), "-q"]) == 0
    ours = read_file(out, "/hello")
    assert ours == plain_hello(layout) and len(ours) == 13256


def test_plain_oci_image_in_a_layout_exports_lazily(tmp_path):
    """A plain (gzip tar) image of an oci: layout is read through a turboOCI meta layer built on
    first use: its /hello is the tar's, byte for byte."""
    require_tool("debugfs")
    layout = fixture_path("aci-hello-world/oci-layout").parent
    out = tmp_path / "x"
    cache = str(tmp_path / "c")
    assert main(["export", f"oci:{layout}:amd64", "-o", str(out), "-q", "--cache-dir", cache]) == 0
    assert read_file(out, "/hello") == plain_hello(layout)
    # its meta layer maps 512 MiB of zeroed inode tables: those stay holes too
    assert out.stat().st_blocks * 512 < 16 << 20


@pytest.mark.parametrize(
    ("blocks", "tail", "want"),
    [
        ("", 0, []),
        ("0000", 0, []),
        ("1111", 0, [(0, 4)]),
        ("0110100", 0, [(1, 3), (4, 5)]),
        ("10", 100, [(0, 1), (2, 2)]),  # the partial block at the end is written as it is
        ("01", 100, [(1, 2)]),  # ... merged with a run that touches it
    ],
)
def test_nonzero_runs_leave_zero_blocks_out(blocks, tail, want):
    bs = ZERO_BLOCK
    buf = bytearray(len(blocks) * bs + tail + bs)  # room past n is ignored
    for i, c in enumerate(blocks):
        if c == "1":
            buf[i * bs + 17] = 1
    buf[len(blocks) * bs + tail] = 9
    n = len(blocks) * bs + tail
    got = nonzero_runs(memoryview(buf)[:n])
    ends = [(a * bs, b * bs) for a, b in want]
    if tail:
        ends[-1] = (ends[-1][0], n)
    assert got == ends


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.commit"
    raw = bytearray(fixture_path("overlaybd/lsmt/commit/L1.commit").read_bytes())
    raw[-4096 + 40 : -4096 + 48] = (10**7).to_bytes(8, "little")  # trailer.index_size
    bad.write_bytes(raw)
    assert main(["export", str(bad), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("obd: error: ") and "trailer.index_size=10000000" in err
    assert "\n" not in err
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 1
    assert "no such file" in capsys.readouterr().err
