"""Every file of the demo's debootstrap python image, read lazily from the plain image (issue 14).

The image is bench/images.py's :func:`debian_python_layout` (debootstrap minbase + python3-minimal,
four gzip layers split by subtree and a fifth of whiteouts), built once into the image cache
(``$OBD_CACHE_DIR/images``, else ``~/.cache/obd/images``) and reused. It is exported through obd's
plain-image path (meta layers built by streaming each layer once, file data read through the gzip
index from the original blobs) and every entry is compared with the layers' tars applied in
order by an independent model (Python's tarfile, tests/convert/test_convert_ext4.py's Model):
each regular file's bytes, each symlink's target, modes, owners, device numbers, hard-link groups.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
from ext4tree import compare_trees, read_tree

from fixtures import require_tool
from obd.cli import main

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "convert"))
sys.path.insert(0, str(REPO / "bench"))

from test_convert_ext4 import Model  # noqa: E402
from test_convert_image import _members_of, blob  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def test_every_file_of_the_plain_python_image_equals_its_tars(tmp_path, capsys):
    require_tool("debugfs")
    require_tool("root")  # debootstrap, the first time the image cache is filled
    require_tool("debootstrap")
    from images import debian_python_layout

    layout = debian_python_layout()
    manifest = json.loads(
        blob(layout, json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])
    )
    out = tmp_path / "python.raw"
    args = ("-o", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert main(["export", f"oci:{layout}:latest", *args]) == 0
    n = len(manifest["layers"])
    assert f"plain image; building the file-system index of {n} of {n} layers" in capsys.readouterr().err
    model = Model()
    for layer in manifest["layers"]:
        model.apply(_members_of(gzip.decompress(blob(layout, layer["digest"]))))
    want = model.tree()
    tree = read_tree(out)
    assert compare_trees(tree, want, ignore=("ino", "xattrs")) == []
    # the image is a real distribution: many files, symlinks and hard links, whiteouts applied
    kinds = [r["type"] for r in tree]
    assert kinds.count("file") > 1000 and kinds.count("symlink") > 100
    assert any(r["type"] == "file" and r["nlink"] > 1 for r in tree)
    assert not any(r["path"].startswith("/usr/share/doc/") for r in tree)
