"""Applying layer tars to ext4 (``obd.convert.ext4`` through debugfs) and committing what changed
(``obd.convert.layer``): overlaybd's own trees for the fixture layers, tar semantics against an
independent model, only changed blocks in a layer, refusals that leave the image untouched, and
``--mkfs``.

Also home of :class:`Model` (expected file trees of layer stacks) and :func:`build_layers`, used by
``test_convert_image.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ext4tree import compare_trees, e2fsck_clean, read_tree
from test_convert_tar import MTIME, make_tar, member

from fixtures import FIXTURES, fixture_path, materialize, require_tool
from obd.convert.debugfs import Debugfs
from obd.convert.ext4 import LayerApplier
from obd.convert.layer import DeviceBuilder
from obd.convert.layertar import clean_name, read_layer
from obd.errors import FormatError
from obd.image.local import open_layer, open_layers
from obd.io.source import data_extents
from obd.layer.blob import open_blob
from obd.layer.export import export_stack
from obd.layer.tools import OutputOptions
from obd.lsmt.stack import Stack

BASE = "overlaybd/ext4/base/ext4_64"
U1 = "aaaaaaaa-0001-4000-8000-000000000001"
U2 = "aaaaaaaa-0002-4000-8000-000000000002"
OPTS = OutputOptions(compress="lz4", tar=True)


@pytest.fixture(autouse=True)
def _tools():
    require_tool("debugfs")
    require_tool("e2fsck")


# -- an independent model of what a stack of layer tars should give ------------------------------------


class Model:
    """Expected file tree of a layer stack, in the shape :func:`ext4tree.read_tree` returns.

    Written from the OCI layer rules plus overlaybd-apply's documented behaviour (docs/formats.md §9,
    MANIFEST §3): whiteouts hide lower paths only, a non-directory over a directory removes it, a
    hard-link entry re-applies its own mode and owner to the shared inode.
    """

    def __init__(self) -> None:
        self.root: dict[str, Any] = {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "children": {}}

    def _lookup(self, parts: list[str]) -> dict[str, Any] | None:
        node = self.root
        for p in parts:
            if node["type"] != "dir" or p not in node["children"]:
                return None
            node = node["children"][p]
        return node

    @staticmethod
    def _hide_lower(node: dict[str, Any], fresh: set[int]) -> bool:
        """Remove what ``node`` holds from lower layers; True if the node itself may go too."""
        if node["type"] == "dir":
            for name, child in list(node["children"].items()):
                if Model._hide_lower(child, fresh):
                    del node["children"][name]
            return id(node) not in fresh and not node["children"]
        return id(node) not in fresh

    def apply(self, members: list[dict[str, Any]]) -> None:
        fresh: set[int] = set()  # nodes (by identity) this layer unpacked
        for m in members:
            parts = [p.decode() for p in clean_name(m["name"].encode()).split(b"/") if p not in (b"", b".")]
            if not parts:
                self.root.update(mode=m.get("mode", 0o755), uid=m.get("uid", 0), gid=m.get("gid", 0))
                continue
            base = parts[-1]
            if base.startswith(".wh."):
                parent = self._lookup(parts[:-1])
                if parent is None or parent["type"] != "dir":
                    continue
                if base == ".wh..wh..opq":
                    for name, child in list(parent["children"].items()):
                        if self._hide_lower(child, fresh):
                            del parent["children"][name]
                else:
                    name = base[4:]
                    child = parent["children"].get(name)
                    if child is not None and self._hide_lower(child, fresh):
                        del parent["children"][name]
                continue
            parent = self.root
            for p in parts[:-1]:
                nxt = parent["children"].get(p)
                if nxt is None:
                    nxt = parent["children"][p] = {
                        "type": "dir",
                        "mode": 0o755,
                        "uid": 0,
                        "gid": 0,
                        "children": {},
                    }
                    fresh.add(id(nxt))
                parent = nxt
            existing = parent["children"].get(base)
            kind = m["kind"]
            owner = {
                "mode": m.get("mode", 0o755 if kind == "dir" else 0o644),
                "uid": m.get("uid", 0),
                "gid": m.get("gid", 0),
            }
            if existing is not None and existing["type"] == "dir" and kind == "dir":
                existing.update(owner)
                fresh.add(id(existing))
                continue
            if kind == "hardlink":
                tparts = [p.decode() for p in clean_name(m["link"].encode()).split(b"/")]
                target = self._lookup(tparts)
                assert target is not None and target["type"] != "dir", m
                if target["type"] == "symlink":
                    owner.pop("mode")
                target.update(owner)
                parent["children"][base] = target
                fresh.add(id(target))
                continue
            node: dict[str, Any] = {"type": kind, **owner}
            if kind == "dir":
                node["children"] = {}
            elif kind == "file":
                node["data"] = m["data"]
            elif kind == "symlink":
                node["target"] = m["link"]
                node["mode"] = 0o777
            elif kind in ("chr", "blk"):
                node["dev"] = [m.get("major", 0), m.get("minor", 0)]
            parent["children"][base] = node
            fresh.add(id(node))

    def tree(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        names: dict[int, int] = {}
        inos: dict[int, int] = {}

        def walk(node: dict[str, Any], path: str) -> None:
            for name, child in node["children"].items():
                p = f"{path}/{name}"
                ino = inos.setdefault(id(child), len(inos) + 100)
                row: dict[str, Any] = {
                    "path": p,
                    "type": child["type"],
                    "mode": f"{child['mode']:04o}",
                    "uid": child["uid"],
                    "gid": child["gid"],
                    "ino": ino,
                }
                if child["type"] == "dir":
                    row["nlink"] = 2 + sum(1 for c in child["children"].values() if c["type"] == "dir")
                else:
                    names[ino] = names.get(ino, 0) + 1
                if child["type"] == "file":
                    row["size"] = len(child["data"])
                    row["sha256"] = hashlib.sha256(child["data"]).hexdigest()
                elif child["type"] == "symlink":
                    row["target"] = child["target"]
                elif child["type"] in ("chr", "blk"):
                    row["dev"] = child["dev"]
                rows.append(row)
                if child["type"] == "dir":
                    walk(child, p)

        walk(self.root, "")
        for row in rows:
            if row["type"] != "dir":
                row["nlink"] = names[row["ino"]]
        return sorted(rows, key=lambda r: r["path"])


# -- building layers -------------------------------------------------------------------------------


def build_layers(
    tmp_path: Path,
    tars: list[bytes],
    *,
    mkfs: bool = False,
    check: bool = True,
    uuids: list[str] | None = None,
) -> tuple[list[str], list[Any]]:
    """Convert raw layer tars bottom up; return (stack files lowest first, built layers)."""
    base = None if mkfs else str(materialize(BASE))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    builder = DeviceBuilder(
        str(work),
        base_layer=base,
        vsize=64 << 30,
        output=OPTS,
        fs_uuid="0b5e0b5e-0000-4000-8000-000000000000",
        check=check,
    )
    built = []
    try:
        for i, data in enumerate(tars):
            spool = work / f"spool{i}"
            spool.mkdir()
            parsed = read_layer(io.BytesIO(data), spool, name=f"layer{i}")
            names = uuids or [f"{n + 1:08x}-0000-4000-8000-000000000000" for n in range(len(tars))]
            uuid, parent = names[i], (names[i - 1] if i else None)
            built.append(
                builder.build(
                    parsed, str(spool), str(tmp_path / f"layer{i}.commit"), uuid=uuid, parent_uuid=parent
                )
            )
    finally:
        builder.close()
    files = ([] if base is None else [base]) + [b.path for b in built]
    return files, built


def export(tmp_path: Path, files: list[str], name: str = "device.img") -> Path:
    out = tmp_path / name
    stack = open_layers(files)
    try:
        export_stack(stack, str(out))
    finally:
        stack.close()
    return out


def stat_text(image: Path, path: str) -> str:
    return subprocess.run(
        [require_tool("debugfs"), "-R", f'stat "{path}"', str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


# -- overlaybd's own trees ----------------------------------------------------------------------------


def test_fixture_layers_on_the_base_layer_give_overlaybds_trees(tmp_path):
    """MANIFEST §3 redone: base layer + layer1.tar (+ layer2.tar), uuids as overlaybd-commit was given."""
    tars = [fixture_path(f"overlaybd/inputs/tar/layer{i}.tar").read_bytes() for i in (1, 2)]
    files, built = build_layers(tmp_path, tars, uuids=[U1, U2])
    for n, facts in ((2, "ext4_L1"), (3, "ext4_L1L2")):
        image = export(tmp_path, files[:n], f"{facts}.img")
        expected = json.loads((FIXTURES / f"overlaybd/facts/{facts}.tree.json").read_text())
        assert compare_trees(read_tree(image), expected) == []  # hard-link quirk and xattrs included
        clean, report = e2fsck_clean(image)
        assert clean, report
    # committed as overlaybd-commit -z -t did: tar-wrapped lz4 ZFile, same vsize, uuid and parent
    for layer, theirs in zip(
        built, ("overlaybd/ext4/l1/overlaybd.commit", "overlaybd/ext4/l2/overlaybd.commit"), strict=True
    ):
        blob = open_blob(layer.path)
        assert blob.kinds == ["tar", "zfile", "lsmt"]
        blob.close()
        ours, ref = open_layer(layer.path), open_layer(fixture_path(theirs))
        for field in ("virtual_size", "uuid", "parent_uuid", "version", "sub_version"):
            assert getattr(ours.header, field) == getattr(ref.header, field), field
        ours.close()
        ref.close()


def test_only_the_blocks_a_layer_changes_are_in_it(tmp_path):
    tars = [fixture_path(f"overlaybd/inputs/tar/layer{i}.tar").read_bytes() for i in (1, 2)]
    files, built = build_layers(tmp_path, tars)
    below = open_layers(files[:2])
    top = open_layer(files[2])
    with_top = Stack([*below.lowers, top])
    try:
        mapped = 0
        for o, ln, _m, z, _t in top.index:
            assert not z
            a, b = o * 512, (o + ln) * 512
            assert a % 4096 == 0 and b % 4096 == 0
            new = with_top.pread(a, b - a)
            old = below.pread(a, b - a)
            for off in range(0, b - a, 4096):
                assert new[off : off + 4096] != old[off : off + 4096], f"unchanged block at {a + off}"
            mapped += b - a
        assert mapped == built[1].stats.changed_bytes
        # overlaybd-apply wrote ~4.7 MB for this layer (MANIFEST §3); the changed blocks are far fewer
        assert mapped < 512 << 10
    finally:
        with_top.close()


def test_an_empty_layer_changes_nothing(tmp_path):
    _, built = build_layers(tmp_path, [make_tar([])])
    assert built[0].stats.changed_bytes == 0
    sealed = open_layer(built[0].path)
    assert len(sealed.index) == 0
    sealed.close()


# -- semantics against the model ------------------------------------------------------------------------


WEIRD_NAMES = [
    "with space",
    'quo"te',
    "<12>",
    "-dash",
    "#hash",
    "semi;colon",
    "tab\there",
    "ünïcödé",
    "back\\slash",
]

LAYERS: list[list[dict[str, Any]]] = [
    [
        member("./", "dir", mode=0o755),
        member("etc", "dir"),
        member("etc/conf", data=b"conf v1\n"),
        member("etc/passwd", data=b"root:x:0:0\n", mode=0o600),
        member("usr/bin/old-name", data=b"#!/bin/sh\necho old\n", mode=0o755),  # implicit parents
        member("usr/bin/tool", data=os.urandom(70000), mode=0o755),
        member("usr/bin/tool-link", "hardlink", link="usr/bin/tool", mode=0o755),
        member("usr/lib/d", "dir"),
        member("usr/lib/d/inner", data=b"inner"),
        member("var/cache/apt/pkgcache.bin", data=os.urandom(5000)),
        member("var/cache/apt/srcpkgcache.bin", data=b"x" * 9000),
        member("opt/app/keep-old", data=b"old app"),
        member("opt/app/sub/deep", data=b"deep"),
        member("tmp", "dir", mode=0o1777),
        member("srv", "dir", mode=0o2775, uid=1000, gid=1000),
        member("srv/setuid", data=b"s", mode=0o4755),
        member("home/big", "dir", uid=3000000000, gid=4000000000),
        member("dev/null", "chr", major=1, minor=3, mode=0o666),
        member("dev/sda", "blk", major=8, minor=0, mode=0o660, gid=6),
        member("run/pipe", "fifo", mode=0o600),
        member("etc/alternatives/sh", "symlink", link="/bin/dash"),
        member("lib", "symlink", link="usr/lib"),
        *[member(f"names/{n}", data=n.encode()) for n in WEIRD_NAMES],
        member("big/zeros", data=bytes(1 << 20)),
        member("big/mixed", data=bytes(8192) + os.urandom(10000) + bytes(20000)),
    ],
    [
        member(".wh.dummy-missing"),  # whiteout of nothing
        member("usr/bin/.wh.old-name"),  # a rename: old name whited out, new name added
        member("usr/bin/new-name", data=b"#!/bin/sh\necho old\n", mode=0o755),
        member("var/.wh.cache"),  # a whole tree deleted
        member("etc/conf", "dir", mode=0o750),  # a directory replaces a file
        member("etc/conf/part", data=b"part"),
        member("usr/lib/d", data=b"now a file"),  # a file replaces a directory
        member("opt/app", "dir"),
        member("opt/app/fresh", data=b"new app"),  # unpacked before the marker: spared by it
        member("opt/app/.wh..wh..opq"),
        member("usr/bin/tool-third", "hardlink", link="usr/bin/tool", mode=0o700, uid=5),  # to a lower inode
        member("etc/passwd", data=b"root:x:0:0\nuser:x:1000:1000\n", mode=0o644),  # same path, new content
        member("srv", "dir", mode=0o755, uid=0, gid=0),  # a directory over a directory: new owner and mode
        member("names/many", "dir"),
        *[member(f"names/many/f{i:03d}-" + "n" * 60, data=b"%d" % i) for i in range(150)],
        *[
            member(f"names/many/l{i:03d}-" + "m" * 80, "hardlink", link="names/many/f000-" + "n" * 60)
            for i in range(150)
        ],
        member("etc/sh-link", "hardlink", link="etc/alternatives/sh", uid=7, mode=0o600),  # to a symlink
        member("twice", data=b"first"),
        member("twice", data=b"second"),  # later entries win
    ],
    [
        member("etc/conf", data=b"conf v3, a file again\n"),  # and back
        member("names/.wh.with space"),
        member("usr/bin/.wh.tool"),  # one name of a 3-link inode goes
        member("lib", "dir"),  # a directory replaces a symlink
        member("lib/x", data=b"x"),
        member("home/big/.wh..wh..opq"),
        member("./", "dir", mode=0o700),  # the root itself changes
    ],
]


def test_layer_semantics_match_the_model(tmp_path):
    model = Model()
    tars = []
    for members in LAYERS:
        tars.append(make_tar(members))
    files, _ = build_layers(tmp_path, tars)
    for n, members in enumerate(LAYERS):
        model.apply(members)
        image = export(tmp_path, files[: n + 2], f"l{n}.img")
        assert compare_trees(read_tree(image), model.tree(), ignore=("ino", "xattrs")) == [], (
            f"after layer {n}"
        )
        clean, report = e2fsck_clean(image)
        assert clean, report
    rows = {r["path"]: r for r in read_tree(image)}
    assert rows["/usr/bin/tool-link"]["nlink"] == 2 and rows["/usr/bin/tool-link"]["mode"] == "0700"
    assert rows["/names/many/f000-" + "n" * 60]["nlink"] == 151
    assert "/opt/app/fresh" in rows and "/opt/app/keep-old" not in rows
    assert "/var/cache" not in rows and "/var" in rows


def test_times_and_xattrs_land(tmp_path):
    value = bytes(range(256))
    tar = make_tar(
        [
            member("old", data=b"1", mtime=-86400),
            member("future", data=b"2", mtime=4102444800),  # 2100: needs the ext4 epoch bits
            member("now", data=b"3", mtime=MTIME, xattrs={"user.bin": value.decode("latin-1"), "user.e": ""}),
            member("d", "dir", mtime=1234567890),
            member("d/child", data=b"4"),
        ]
    )
    # tarfile writes PAX values as UTF-8; the reader hands the bytes on unchanged
    files, _ = build_layers(tmp_path, [tar])
    image = export(tmp_path, files)
    assert "mtime: 0xfffeae80:00000000" in stat_text(image, "/old")
    assert "mtime: 0xf4865700:00000001" in stat_text(image, "/future")
    assert "mtime: 0x499602d2:00000000" in stat_text(image, "/d")  # set after its children
    now = stat_text(image, "/now")
    assert "user.bin (" in now and "user.e (0)" in now
    assert f"crtime: 0x{MTIME:08x}:00000000" in now


# -- refusals leave the image untouched --------------------------------------------------------------------


def _digest_of_data(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, length in data_extents(fd, os.fstat(fd).st_size):
            h.update(b"%d:%d" % (off, length))
            h.update(os.pread(fd, length, off))
    finally:
        os.close(fd)
    return h.hexdigest()


@pytest.mark.parametrize(
    ("members", "text"),
    [
        (
            [member("lnk", "symlink", link="/etc"), member("lnk/passwd", data=b"x")],
            "parent /lnk is a symlink",
        ),
        ([member("f", data=b"1"), member("f/g", data=b"2")], "parent /f is a file"),
        ([member("a", "hardlink", link="no/such/file")], "does not exist"),
        ([member("d", "dir"), member("h", "hardlink", link="d")], "hard link to a directory"),
    ],
)
def test_bad_layers_are_refused_before_the_image_is_written(tmp_path, members, text):
    raw = tmp_path / "device.raw"
    stack = open_layers([materialize(BASE)])
    try:
        from obd.convert.layer import export_nonzero

        export_nonzero(stack, str(raw))
    finally:
        stack.close()
    before = _digest_of_data(raw)
    spool = tmp_path / "spool"
    spool.mkdir()
    parsed = read_layer(io.BytesIO(make_tar(members)), spool, name="bad")
    fs = Debugfs(raw, writable=True, epoch=1)
    with pytest.raises(FormatError, match=text):
        LayerApplier(fs, parsed, str(spool), epoch=1).run()
    fs.abort()
    assert _digest_of_data(raw) == before


# -- mkfs and determinism ------------------------------------------------------------------------------


def test_mkfs_makes_a_base_like_file_system(tmp_path):
    require_tool("mke2fs")
    members = LAYERS[0]
    files, built = build_layers(tmp_path, [make_tar(members)], mkfs=True)
    assert len(files) == 1
    image = export(tmp_path, files)
    model = Model()
    model.apply(members)
    assert compare_trees(read_tree(image), model.tree(), ignore=("ino", "xattrs")) == []
    info = subprocess.run(
        [require_tool("debugfs"), "-R", "stats", str(image)], capture_output=True, text=True
    ).stdout
    features = set(
        next(line for line in info.splitlines() if line.startswith("Filesystem features:")).split()[2:]
    )
    assert features == set(
        [
            "has_journal",
            "ext_attr",
            "resize_inode",
            "dir_index",
            "filetype",
            "extent",
            "64bit",
            "flex_bg",
            "sparse_super",
            "large_file",
            "huge_file",
            "uninit_bg",
            "dir_nlink",
            "extra_isize",
        ]
    )
    assert "Filesystem UUID:          0b5e0b5e-0000-4000-8000-000000000000" in info
    # the journal and inode tables are holes: the layer holds a few MiB, not the 64 GiB's metadata
    assert built[0].stats.changed_bytes < 16 << 20


def test_the_same_tars_give_the_same_bytes(tmp_path):
    tars = [make_tar(LAYERS[0]), make_tar(LAYERS[1])]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, one = build_layers(tmp_path / "a", tars)
    _, two = build_layers(tmp_path / "b", tars)
    assert [b.digest for b in one] == [b.digest for b in two]
