"""``obd export`` of a registry image reads it in a few large ranges, not one GET per ZFile span.

An export reads the whole device in order, so it asks for registry readahead (``--readahead``,
4 MiB by default): the aci-hello-world layer (628 KiB, 530 ZFile spans in the extents it maps)
then costs one blob GET instead of 530. The written image must be the same either way.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from registry_server import RegistryServer

from fixtures import FIXTURES
from obd.io.source import data_extents

OBD = [os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "obd")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    layout = f"oci:{FIXTURES / 'aci-hello-world'}:amd64-converted"
    subprocess.run(
        [*OBD, "push", layout, f"{reg.host}/aci/hello:1", "--insecure-registry", reg.host],
        check=True,
        capture_output=True,
    )
    yield reg
    reg.stop()


def export(reg: RegistryServer, out: Path, *extra: str) -> tuple[int, str]:
    """Export the image with ``extra`` options; (registry requests it made, sha256 of the image)."""
    args = [f"{reg.host}/aci/hello:1", "-o", str(out), "--insecure-registry", reg.host, "--no-cache"]
    p = subprocess.run(
        [*OBD, "export", "--stats", *args, *extra], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    requests = re.search(r"^requests\s+(\d+)", p.stderr, re.M)
    assert requests, p.stderr
    h = hashlib.sha256()
    fd = os.open(out, os.O_RDONLY)
    try:  # a 64 GiB sparse image: hash where its data is, and where
        for offset, length in data_extents(fd, os.fstat(fd).st_size):
            h.update(f"{offset}:{length}".encode() + os.pread(fd, length, offset))
    finally:
        os.close(fd)
    out.unlink()
    return int(requests.group(1)), h.hexdigest()


def test_export_fetches_a_layer_in_few_large_ranges(registry, tmp_path):
    requests, digest = export(registry, tmp_path / "ra.img")
    plain_requests, plain_digest = export(registry, tmp_path / "none.img", "--readahead", "0")
    assert digest == plain_digest
    # manifest, config and a blob size; then the layer: one GET with readahead, one per span without
    assert requests <= 8, requests
    assert plain_requests > 100 * (requests - 3), (requests, plain_requests)
