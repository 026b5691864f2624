"""``obd convert`` of layers holding sparse members, as GNU tar writes them (``tar --sparse``).

The tar → ext4 path (the layer reader, the debugfs applier, the committed layer) must give each
sparse file its bytes back, holes read as zeros, and keep the holes unallocated in the file system.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from ext4tree import e2fsck_clean, read_tree
from sparsetar import gnu_sparse_tar, make_sparse_files
from test_convert_ext4 import build_layers, export, stat_text

pytestmark = pytest.mark.timeout(300)


def test_sparse_members_convert_to_sparse_ext4_files(tmp_path):
    """Two layers, old GNU format then PAX 1.0 (the second replaces one file): every file reads
    back as the source, and the 10 MiB file holds a few blocks, not 10 MiB of zeros."""
    files = make_sparse_files(tmp_path / "src")
    lower = gnu_sparse_tar(tmp_path / "src", tmp_path / "a.tar", "gnu", ["big", "many", "dense"])
    (tmp_path / "src" / "dense").write_bytes(files["many"][:70_000])
    upper = gnu_sparse_tar(tmp_path / "src", tmp_path / "b.tar", "pax1.0", ["dense", "holes"])
    stack, _built = build_layers(tmp_path, [lower, upper])
    image = export(tmp_path, stack)
    want = {
        "/big": files["big"],
        "/many": files["many"],
        "/dense": files["many"][:70_000],
        "/holes": files["holes"],
    }
    tree = {r["path"]: r for r in read_tree(image) if r["type"] == "file"}
    assert set(tree) == set(want)
    for path, data in want.items():
        assert tree[path]["size"] == len(data) and tree[path]["sha256"] == hashlib.sha256(data).hexdigest(), (
            path
        )
    found = re.search(r"Blockcount: (\d+)", stat_text(image, "/big"))
    assert found is not None
    blocks = int(found.group(1))
    assert blocks * 512 < 1 << 20, blocks  # 512-byte units, extent tree included
    clean, report = e2fsck_clean(image)
    assert clean, report
