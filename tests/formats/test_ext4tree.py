"""Prove tests/helpers/ext4tree.py right without the rest of obd.

A reference ext4 image is built with ``mke2fs -d`` from ``inputs/tar/layer1.tar`` extracted as root,
then read back and compared with ``facts/ext4_L1.tree.json`` (what debugfs saw in the image overlaybd
itself produced from the same tar). A second image built from a hand-made directory checks the reader
against ``os.lstat`` on names and types the fixture does not have.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import tarfile
from pathlib import Path
from typing import Any

import ext4tree
import pytest
from ext4tree import TreeDiff

from fixtures import fixture_path, require_tool

LAYER1_TAR = "overlaybd/inputs/tar/layer1.tar"
L1_TREE = "overlaybd/facts/ext4_L1.tree.json"


@pytest.fixture(scope="module")
def tools() -> None:
    require_tool("root")
    for name in ("debugfs", "mke2fs", "e2fsck"):
        require_tool(name)


@pytest.fixture(scope="module")
def layer1_image(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("layer1")
    ext4tree.extract_layer_tar(fixture_path(LAYER1_TAR), work / "root")
    return ext4tree.mke2fs_from_dir(work / "root", work / "layer1.ext4", "32M")


def hardlink_quirk_diffs(tar_path: Path) -> list[TreeDiff]:
    """The differences overlaybd's hard-link handling must cause, derived from the tar headers.

    overlaybd-apply re-applies a hard-link entry's own mode/owner to the shared inode, so both names
    carry the link entry's values in the facts, while a plain link() keeps the target entry's values.
    """
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    diffs = []
    for link in members.values():
        if not link.islnk():
            continue
        target = members[link.linkname]
        ours = {"mode": f"{target.mode:04o}", "uid": target.uid, "gid": target.gid}
        theirs = {"mode": f"{link.mode:04o}", "uid": link.uid, "gid": link.gid}
        for key in ours:
            if ours[key] != theirs[key]:
                for name in (target.name, link.name):
                    diffs.append(TreeDiff("/" + name, key, ours[key], theirs[key]))
    return sorted(diffs, key=lambda d: (d.path, d.key))


def test_layer1_tree_matches_overlaybd_facts_except_hardlink_quirk(layer1_image: Path) -> None:
    expected = json.loads(fixture_path(L1_TREE).read_text(encoding="utf-8"))
    actual = ext4tree.read_tree(layer1_image)

    allowed = hardlink_quirk_diffs(fixture_path(LAYER1_TAR))
    assert TreeDiff("/bin/tool", "mode", "0755", "0644") in allowed
    assert ext4tree.diff_trees(actual, expected, ignore=("ino",)) == allowed
    # Same keys, same key order as the facts file: the reader emits the facts format, not a look-alike.
    assert [list(row) for row in actual] == [list(row) for row in expected]


def test_layer1_tree_details(layer1_image: Path) -> None:
    by_path = {row["path"]: row for row in ext4tree.read_tree(layer1_image)}
    assert by_path["/dev/null2"]["type"] == "chr" and by_path["/dev/null2"]["dev"] == [1, 3]
    assert by_path["/etc/abs-link"]["target"] == "/etc/hostname"
    assert by_path["/data/setuid"]["mode"] == "4755"
    assert by_path["/data"]["uid"] == by_path["/data"]["gid"] == 1000
    assert by_path["/xattr.txt"]["xattrs"] == 'user.comment (5) = "hello"   user.empty (0)'
    assert by_path["/bin/tool"]["ino"] == by_path["/bin/tool-hard"]["ino"]
    assert by_path["/bin/tool"]["nlink"] == 2
    assert "/lost+found" not in by_path
    assert "/.wh.ghost" not in by_path and "/opq1/.wh..wh..opq" not in by_path


def test_dump_bin_tool(layer1_image: Path, tmp_path: Path) -> None:
    expected = {row["path"]: row for row in json.loads(fixture_path(L1_TREE).read_text(encoding="utf-8"))}
    with tarfile.open(fixture_path(LAYER1_TAR)) as tar:
        member = tar.extractfile("bin/tool")
        assert member is not None
        from_tar = hashlib.sha256(member.read()).hexdigest()
    out = ext4tree.dump_file(layer1_image, "/bin/tool", tmp_path / "tool")
    data = out.read_bytes()
    assert len(data) == 70000
    assert hashlib.sha256(data).hexdigest() == expected["/bin/tool"]["sha256"] == from_tar
    assert ext4tree.read_file(layer1_image, "/bin/tool") == data


def test_dump_missing_file_raises(layer1_image: Path, tmp_path: Path) -> None:
    with pytest.raises(ext4tree.Ext4ToolError):
        ext4tree.dump_file(layer1_image, "/no/such/file", tmp_path / "x")


def test_e2fsck_clean(layer1_image: Path) -> None:
    ok, output = ext4tree.e2fsck_clean(layer1_image)
    assert ok, output
    assert "Pass 5" in output


def test_not_ext4_is_loud(tools: None, tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(1 << 20))
    with pytest.raises(ext4tree.Ext4ToolError, match="debugfs"):
        ext4tree.read_tree(junk)
    ok, output = ext4tree.e2fsck_clean(junk)
    assert not ok and output


def tree_from_dir(root: Path) -> list[dict[str, Any]]:
    """The tree of a host directory in read_tree's format, from os.lstat (ext4 rules for dir nlink)."""
    kinds = {
        stat.S_IFDIR: "dir",
        stat.S_IFREG: "file",
        stat.S_IFLNK: "symlink",
        stat.S_IFCHR: "chr",
        stat.S_IFBLK: "blk",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "sock",
    }
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            st = full.lstat()
            kind = kinds[stat.S_IFMT(st.st_mode)]
            row: dict[str, Any] = {
                "path": "/" + full.relative_to(root).as_posix(),
                "type": kind,
                "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                "uid": st.st_uid,
                "gid": st.st_gid,
                "ino": st.st_ino,
                "nlink": st.st_nlink,
            }
            if kind == "dir":
                row["nlink"] = 2 + sum(1 for e in os.scandir(full) if e.is_dir(follow_symlinks=False))
            elif kind == "file":
                row["size"] = st.st_size
                row["sha256"] = hashlib.sha256(full.read_bytes()).hexdigest()
            elif kind == "symlink":
                row["target"] = os.readlink(full)
            elif kind in ("chr", "blk"):
                row["dev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            attrs = [] if kind == "symlink" else os.listxattr(full)
            if attrs:
                parts = []
                for attr in attrs:
                    value = os.getxattr(full, attr).decode()
                    parts.append(f'{attr} ({len(value)}) = "{value}"' if value else f"{attr} (0)")
                row["xattrs"] = "   ".join(parts)
            rows.append(row)
    return sorted(rows, key=lambda r: r["path"])


def test_awkward_tree_matches_lstat(tools: None, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub dir" / "-dash").mkdir(parents=True)
    (root / "sub dir" / 'q"uote name').write_bytes(b"quoted\n")
    (root / "nl\nname").write_bytes(b"newline in the name")
    (root / "ünï").write_text("utf-8", encoding="utf-8")
    (root / "empty").touch()
    big = os.urandom(3 * 1024 * 1024 + 5)
    (root / "sub dir" / "-dash" / "big.bin").write_bytes(big)
    os.link(root / "sub dir" / "-dash" / "big.bin", root / "big-link")
    os.symlink("t" * 150, root / "slow-link")  # longer than 60 bytes: target stored in a data block
    os.symlink("../x", root / "sub dir" / "fast-link")
    os.mknod(root / "blk", 0o640 | stat.S_IFBLK, os.makedev(8, 17))
    os.mknod(root / "chr", 0o600 | stat.S_IFCHR, os.makedev(4, 64))
    os.mkfifo(root / "fifo", 0o620)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(root / "sock"))
    os.chown(root / "sub dir", 4242, 4343)
    os.chmod(root / "empty", 0o2711)
    os.setxattr(root / "sub dir", "user.dirattr", b"on a directory")
    image = ext4tree.mke2fs_from_dir(root, tmp_path / "awkward.ext4", "32M")

    actual = ext4tree.read_tree(image)
    assert ext4tree.compare_trees(actual, tree_from_dir(root)) == []
    by_path = {row["path"]: row for row in actual}
    assert by_path["/slow-link"]["target"] == "t" * 150
    assert by_path["/nl\nname"]["size"] == len("newline in the name")
    assert by_path["/big-link"]["sha256"] == hashlib.sha256(big).hexdigest()


def test_compare_trees_reports_every_kind_of_difference() -> None:
    base = [
        {"path": "/a", "type": "file", "mode": "0644", "uid": 0, "gid": 0, "ino": 12, "nlink": 2, "size": 1},
        {"path": "/b", "type": "file", "mode": "0644", "uid": 0, "gid": 0, "ino": 12, "nlink": 2, "size": 1},
        {"path": "/gone", "type": "dir", "mode": "0755", "uid": 0, "gid": 0, "ino": 13, "nlink": 2},
    ]
    other = [
        {"path": "/a", "type": "file", "mode": "0600", "uid": 0, "gid": 0, "ino": 20, "nlink": 2, "size": 1},
        {"path": "/b", "type": "file", "mode": "0644", "uid": 0, "gid": 0, "ino": 21, "nlink": 2, "size": 1},
        {
            "path": "/new",
            "type": "symlink",
            "mode": "0777",
            "uid": 0,
            "gid": 0,
            "ino": 22,
            "nlink": 1,
            "target": "a",
        },
    ]
    assert ext4tree.compare_trees(base, base) == []
    assert ext4tree.compare_trees(other, base) == [
        "/a: hardlinks is <absent>, expected ('/a', '/b')",
        "/a: mode is '0600', expected '0644'",
        "/b: hardlinks is <absent>, expected ('/a', '/b')",
        "/gone: only in expected",
        "/new: only in actual",
    ]
    with_ino = ext4tree.compare_trees(other, base, ignore=())
    assert "/a: ino is 20, expected 12" in with_ino
    assert not any("hardlinks" in line for line in with_ino)
