"""Plain OCI images through ``obd nbd`` (real nbdkit) and ``obd mount`` (real FUSE), no conversion.

The three-layer plain image of test_plain_images.py (gzip, tar, gzip: whiteouts, an opaque
directory, hard links within and across layers, symlinks, a zero-filled file) is pushed to a real
docker-registry; the device each frontend serves must hold exactly the files the tars extract to.
The nbd disk is copied out with ``nbdcopy`` (holes skipped through the plugin's extents), the FUSE
disk file is read in place; both are walked with debugfs (tests/helpers/ext4tree.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from registry_server import RegistryServer

from fixtures import require_tool

# the frontends' drivers (Mounted, CLEAN_ENV, ...) live beside their own tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "frontends"))

from test_fuse_mount import Mounted, _no_mount_left_behind  # noqa: F401
from test_nbd_launch import CLEAN_ENV
from test_plain_images import _assert_tree, _layers, _push_plain, _write_plain_layout
from test_registry_frontends import obd_nbd_server

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tool("debugfs")
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    layers, tree = _layers()
    _push_plain(reg.host, tmp_path_factory.mktemp("layout") / "multi", layers)
    reg.tree = tree
    yield reg
    reg.stop()


def test_obd_nbd_serves_a_plain_image(registry, tmp_path):
    require_tool("nbdkit")
    nbdcopy = require_tool("nbdcopy")
    ref = f"{registry.host}/plain/multi:v1"
    cache = ("--cache-dir", str(tmp_path / "cache"))
    with obd_nbd_server(tmp_path, ref, "--insecure-registry", registry.host, *cache) as (sock, _pid):
        out = tmp_path / "nbd.raw"
        subprocess.run(
            [nbdcopy, f"nbd+unix:///?socket={sock}", str(out)], env=CLEAN_ENV, check=True, timeout=300
        )
    _assert_tree(out, registry.tree)


def test_obd_mount_serves_a_plain_image(registry, tmp_path):
    ref = f"{registry.host}/plain/multi:v1"
    args = ("--insecure-registry", registry.host, "--cache-dir", str(tmp_path / "cache"))
    with Mounted(tmp_path / "mnt", ref, *args) as m:
        _assert_tree(m.disk, registry.tree)


def test_obd_nbd_of_a_plain_oci_layout(registry, tmp_path):
    """``obd nbd oci:DIR:TAG`` of a plain image: the meta layers are built from the layout's blobs."""
    require_tool("nbdkit")
    nbdcopy = require_tool("nbdcopy")
    layout = tmp_path / "layout"
    _write_plain_layout(layout, _layers()[0])
    with obd_nbd_server(tmp_path, f"oci:{layout}:v1", "--cache-dir", str(tmp_path / "cache")) as (sock, _p):
        out = tmp_path / "layout.raw"
        subprocess.run(
            [nbdcopy, f"nbd+unix:///?socket={sock}", str(out)], env=CLEAN_ENV, check=True, timeout=300
        )
    _assert_tree(out, registry.tree)
