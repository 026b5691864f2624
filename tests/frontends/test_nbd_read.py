"""Every fixture stack served by nbdkit with obd's plugin reads exactly as ``obd export`` writes it.

Through four real clients: libnbd (Python), ``nbdcopy`` to a file, ``qemu-img convert`` from the
NBD URI, and ``nbdinfo --map`` for the holes and zeros. Plus the 64 GiB ext4 stack (copied
sparsely, checked with e2fsck, its file tree and the per-extent hashes overlaybd computed) and an
overlaybd image in an OCI layout.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import subprocess
import tarfile

import pytest
from ext4tree import compare_trees, e2fsck_clean, read_file, read_tree
from test_nbd_launch import NbdServer, layer_params

from fixtures import expected, fixture_path, materialize, require_tool, resolved_config, sha256_file
from obd.cli import main
from obd.image.local import open_config, open_layers

SMALL = [s for s in expected()["stacks"] if s["vsize"] <= 1 << 30]
EXT4 = "ext4/L1L2/tar-lz4"
TYPES = {"data": 0, "zero": 2, "hole": 3}  # NBD base:allocation: HOLE=1, ZERO=2


def params(entry) -> list[str]:
    if entry["config"]:
        return [f"config={resolved_config(entry['config'])}"]
    return layer_params(entry)


def open_entry(entry):
    if entry["config"]:
        return open_config(resolved_config(entry["config"]), readonly=True)
    return open_layers([materialize(r) for r in entry["layers"]])


def merged(runs):
    out: list[list[int]] = []
    for off, n, t in runs:
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n, t])
    return [tuple(x) for x in out]


def expected_map(entry):
    st = open_entry(entry)
    try:
        return merged((e.offset, e.length, TYPES[e.kind]) for e in st.extents())
    finally:
        st.close()


def nbdinfo_map(uri: str):
    out = subprocess.run(
        [require_tool("nbdinfo"), "--map", "--json", uri],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return merged((e["offset"], e["length"], e["type"]) for e in json.loads(out))


def hash_over_nbd(h) -> str:
    sha = hashlib.sha256()
    size = h.get_size()
    chunk = 4 << 20
    for off in range(0, size, chunk):
        sha.update(h.pread(min(chunk, size - off), off))
    return sha.hexdigest()


@pytest.mark.parametrize("entry", SMALL, ids=[s["name"] for s in SMALL])
def test_stack_over_nbd_equals_obd_export(tmp_path, entry):
    exported = tmp_path / "export.img"
    cfg = ["--config", str(resolved_config(entry["config"]))] if entry["config"] else []
    layers = [] if entry["config"] else [str(materialize(r)) for r in entry["layers"]]
    assert main(["export", *cfg, *layers, "-o", str(exported), "-q"]) == 0
    want = sha256_file(exported)
    assert want == entry["sha256"]
    with NbdServer(tmp_path, params(entry)) as srv:
        h = srv.connect()
        assert h.get_size() == entry["vsize"]
        assert hash_over_nbd(h) == want
        h.shutdown()
        copy = tmp_path / "nbdcopy.img"
        subprocess.run([require_tool("nbdcopy"), srv.uri, str(copy)], check=True, timeout=300)
        assert sha256_file(copy) == want
        copy.unlink()
        qcopy = tmp_path / "qemu.img"
        subprocess.run(
            [require_tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", srv.uri, str(qcopy)],
            check=True,
            timeout=300,
        )
        assert sha256_file(qcopy) == want
        qcopy.unlink()
        assert nbdinfo_map(srv.uri) == expected_map(entry)


def test_ext4_stack_over_nbd_is_the_filesystem_overlaybd_made(tmp_path):
    """64 GiB device, a few MiB of data: nbdcopy skips the holes and zeros nbdinfo reports."""
    require_tool("debugfs")
    require_tool("e2fsck")
    entry = next(s for s in expected()["stacks"] if s["name"] == EXT4)
    with NbdServer(tmp_path, params(entry)) as srv:
        nbd_map = nbdinfo_map(srv.uri)
        assert nbd_map == expected_map(entry)
        assert {t for _o, _n, t in nbd_map} == {0, 2}  # the base layer maps its free space as zeroed
        copy = tmp_path / "ext4.img"
        subprocess.run([require_tool("nbdcopy"), srv.uri, str(copy)], check=True, timeout=300)
    assert copy.stat().st_size == entry["vsize"]
    assert copy.stat().st_blocks * 512 < 256 << 20  # the copy stayed sparse
    raw = fixture_path(entry["extents"]).read_bytes()
    facts = json.loads(bz2.decompress(raw) if entry["extents"].endswith(".bz2") else raw)
    with open(copy, "rb") as f:
        for e in facts:
            if not e["zeroed"]:
                f.seek(e["offset"] * 512)
                assert hashlib.sha256(f.read(e["length"] * 512)).hexdigest() == e["sha256"], e
    ok, report = e2fsck_clean(copy)
    assert ok, report
    want = json.loads(fixture_path(entry["tree"]).read_text())
    assert compare_trees(read_tree(copy), want) == []


def test_oci_layout_image_over_nbd(tmp_path):
    """image=oci:DIR:TAG: accelerated-container-image's hello-world, its /hello read from the NBD copy."""
    require_tool("debugfs")
    layout = fixture_path("aci-hello-world/oci-layout").parent
    with NbdServer(tmp_path, [f"image=oci:{layout}:amd64-converted"]) as srv:
        copy = tmp_path / "hw.img"
        subprocess.run([require_tool("nbdcopy"), srv.uri, str(copy)], check=True, timeout=300)
    ours = read_file(copy, "/hello")
    index = json.loads((layout / "index.json").read_text())
    plain = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "amd64"
    )
    manifest = json.loads((layout / "blobs" / "sha256" / plain["digest"].split(":")[1]).read_text())
    layer = (layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        theirs = tar.extractfile("hello").read()
    assert ours == theirs
