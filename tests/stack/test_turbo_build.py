"""Building turboOCI-style meta layers from plain layer tars (obd.turbo.build).

The oracle is overlaybd itself: the file trees its ``overlaybd-apply`` made from the same fixture
tars (``facts/ext4_L1*.tree.json``; MANIFEST §4 says turboOCI-apply's trees are identical) and the
bytes of the ``gzip.meta`` its ``turboOCI-apply`` wrote (sha256 in MANIFEST §4.2). The device read
through obd's warp stack (base layer + meta layers, file data read from the tars) must hold exactly
those trees.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard
from ext4tree import compare_trees, e2fsck_clean, read_tree

from fixtures import fixture_path, require_tool
from obd.convert.layer import export_nonzero
from obd.errors import FormatError
from obd.image.local import open_layer
from obd.layer.baselayer import base_layer_path
from obd.lsmt.stack import Stack
from obd.lsmt.warp import REMOTE_DATA
from obd.turbo.build import TurboBuilder, chain_key
from obd.turbo.zstd import Frame, ZstdFrameIndex

pytestmark = pytest.mark.timeout(300)

TAR = "overlaybd/inputs/tar/"
#: sha256 of turbooci/l1gz/gzip.meta as turboOCI-apply wrote it (MANIFEST §4.2)
TURBO_GZIP_META_SHA = "446e6bfb9c0ce8ffc35e4c00f9a3c6fc0c2a190c5ac95765eb7e90338fc6e0af"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    require_tool("debugfs")
    return str(base_layer_path(tmp_path_factory.mktemp("cache")))


def device_tree(tmp_path, layers, name):
    """The file tree of the stack's device, exported to a sparse raw file and walked."""
    raw = str(tmp_path / f"{name}.raw")
    stack = Stack(layers)
    try:
        export_nonzero(stack, raw)
    finally:
        stack.close()
    ok, report = e2fsck_clean(raw)
    assert ok, report
    return read_tree(raw)


def facts(name):
    return json.loads(fixture_path(f"overlaybd/facts/{name}.tree.json").read_text())


def test_gzip_layer_meta_reads_as_overlaybd_applied_it(base, tmp_path):
    blob = str(fixture_path(TAR + "layer1.tar.gz"))
    builder = TurboBuilder(str(tmp_path), base)
    try:
        built = builder.build(blob, str(tmp_path / "l1"))
    finally:
        builder.close()
    assert built.compression == "gzip"
    # the gzip index is byte for byte the one turboOCI-apply wrote for this blob
    assert hashlib.sha256(Path(built.gzip_index).read_bytes()).hexdigest() == TURBO_GZIP_META_SHA
    layer = open_layer(built.meta, target=blob, gzip_index=built.gzip_index)
    # file data is mapped into the tar (tag 1), the metadata is packed in the layer (tag 0)
    assert {int(t) for t in layer.index.tag} == {0, REMOTE_DATA}
    tree = device_tree(tmp_path, [open_layer(base), layer], "l1")
    assert compare_trees(tree, facts("ext4_L1")) == []
    # metadata only: the meta layer is a small fraction of the data it maps
    assert built.stats.meta_file_bytes < built.stats.remote_bytes / 10
    assert built.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(Path(blob).read_bytes())).hexdigest()


def test_second_layer_is_built_on_the_first_whiteouts_links_and_opaque_dirs(base, tmp_path):
    l1 = str(fixture_path(TAR + "layer1.tar"))
    l2 = str(fixture_path(TAR + "layer2.tar"))
    builder = TurboBuilder(str(tmp_path), base)
    try:
        b1 = builder.build(l1, str(tmp_path / "l1"))
        b2 = builder.build(l2, str(tmp_path / "l2"))
    finally:
        builder.close()
    assert b1.gzip_index is None and b2.gzip_index is None
    layers = [open_layer(base), open_layer(b1.meta, target=l1), open_layer(b2.meta, target=l2)]
    tree = device_tree(tmp_path, layers, "l1l2")
    assert compare_trees(tree, facts("ext4_L1L2")) == []
    # a rebuilt chain gives the same bytes: a cached lower plus a fresh upper equals the chain
    again = TurboBuilder(str(tmp_path), base)
    try:
        again.add_existing(b1.meta)
        b2b = again.build(l2, str(tmp_path / "l2b"))
    finally:
        again.close()
    assert Path(b2b.meta).read_bytes() == Path(b2.meta).read_bytes()


def test_tar_and_gzip_of_one_layer_give_the_same_meta(base, tmp_path):
    metas = []
    for name in ("layer1.tar", "layer1.tar.gz"):
        builder = TurboBuilder(str(tmp_path), base)
        try:
            metas.append(
                Path(builder.build(str(fixture_path(TAR + name)), str(tmp_path / name)).meta).read_bytes()
            )
        finally:
            builder.close()
    assert metas[0] == metas[1]


def test_sparse_and_replaced_files(base, tmp_path):
    """Zero blocks stay holes; a file replaced inside the same layer maps only its last version."""
    buf = io.BytesIO()
    payload = os.urandom(5000) + bytes(3 * 4096) + os.urandom(100)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("a", b"first version"), ("a", payload), ("big", os.urandom(300_000))):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            tar.addfile(info, io.BytesIO(data))
    blob = tmp_path / "layer.tar"
    blob.write_bytes(buf.getvalue())
    builder = TurboBuilder(str(tmp_path), base)
    try:
        built = builder.build(str(blob), str(tmp_path / "out"))
    finally:
        builder.close()
    assert built.stats.files == 2
    # "a" maps blocks 0-1 and the 1024 bytes (512-rounded) of block 4 it uses; blocks 2-3 are zeros,
    # so holes; "big" maps its 300000 bytes rounded up to 512
    assert built.stats.remote_bytes == 8192 + 1024 + 300_032
    tree = {
        r["path"]: r
        for r in device_tree(tmp_path, [open_layer(base), open_layer(built.meta, target=str(blob))], "s")
    }
    assert tree["/a"]["sha256"] == hashlib.sha256(payload).hexdigest()


def test_zstd_layers_read_through_frames_or_a_local_copy(base, tmp_path):
    """A zstd layer of many frames gets a frame index (seek points at frame starts), one of a single
    frame a decompressed copy; both read as overlaybd applied the tar, with the same meta layer."""
    tar = fixture_path(TAR + "layer1.tar").read_bytes()
    z = zstandard.ZstdCompressor()
    step = 64 << 10
    framed = tmp_path / "framed.tar.zst"
    framed.write_bytes(b"".join(z.compress(tar[i : i + step]) for i in range(0, len(tar), step)))
    single = tmp_path / "single.tar.zst"
    single.write_bytes(z.compress(tar))
    builder = TurboBuilder(str(tmp_path), base)
    try:
        a = builder.build(str(framed), str(tmp_path / "framed"))
    finally:
        builder.close()
    builder = TurboBuilder(str(tmp_path), base)
    try:
        b = builder.build(str(single), str(tmp_path / "single"))
    finally:
        builder.close()
    assert a.compression == b.compression == "zstd"
    assert a.gzip_index and a.gzip_index.endswith("zstd.meta") and a.local_copy is None
    assert a.stats.zstd_frames == -(-len(tar) // step)
    assert b.gzip_index is None and b.local_copy and Path(b.local_copy).read_bytes() == tar
    assert Path(a.meta).read_bytes() == Path(b.meta).read_bytes()
    assert a.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    for name, layer in (
        ("framed", open_layer(a.meta, target=str(framed), gzip_index=a.gzip_index)),
        ("single", open_layer(b.meta, target=b.local_copy)),
    ):
        assert compare_trees(device_tree(tmp_path, [open_layer(base), layer], name), facts("ext4_L1")) == []


def test_a_broken_zstd_blob_is_a_format_error(base, tmp_path):
    blob = tmp_path / "layer.tar.zst"
    blob.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(60))
    builder = TurboBuilder(str(tmp_path), base)
    try:
        with pytest.raises(FormatError, match="zstd"):
            builder.build(str(blob), str(tmp_path / "out"))
    finally:
        builder.close()


def test_a_zstd_frame_index_is_validated(tmp_path):
    index = ZstdFrameIndex.build([Frame(0, 10, 0), Frame(10, 10, 100)], 200, 20, name="ok")
    assert ZstdFrameIndex(index.to_bytes(), name="again").frames == index.frames
    with pytest.raises(FormatError, match="tar offsets"):
        ZstdFrameIndex.build([Frame(0, 10, 0), Frame(10, 10, 0)], 200, 20, name="bad")
    with pytest.raises(FormatError, match="outside the blob"):
        ZstdFrameIndex.build([Frame(0, 30, 0)], 200, 20, name="bad")
    with pytest.raises(FormatError, match="blob size"):
        ZstdFrameIndex(index.to_bytes(), name="x", blob_size=21)


def test_chain_key_depends_on_every_lower():
    assert chain_key(["sha256:a"]) != chain_key(["sha256:b", "sha256:a"])
    assert chain_key(["sha256:a", "sha256:b"]) == chain_key(["sha256:a", "sha256:b"])
