"""Verified reads through a real nbdkit (issue 12): ``verify=require`` over a registry image.

Real parts: Debian's ``docker-registry`` holding the ACI fixture with and without digest tables,
real nbdkit running ``frontends/nbd/plugin.py`` from a clean environment, libnbd as the client. The
fault is real: one byte changed in the registry's blob storage, inside a block the device's open
does not read, so the server starts and the damaged block is met by a client's read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from registry_server import RegistryServer
from test_nbd_launch import CLEAN_ENV, OBD, NbdServer, libnbd

from fixtures import FIXTURES, require_tool
from obd.layer.blob import open_blob
from obd.lsmt.format import SealedLayout
from obd.observability.stats import Stats
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient
from obd.registry.push import push_layout
from obd.registry.reference import parse_reference
from obd.verify.table import add_tables

pytestmark = pytest.mark.timeout(180)

#: The table block size ``publish`` uses.
BLOCK = 64 << 10


def publish(reg: RegistryServer, runner: AsyncRunner) -> str:
    """The ACI fixture as ``aci/hello:plain`` and, with 64 KiB digest tables, ``aci/hello:verified``
    (as tests/remote/test_verify.py publishes it); the digest of its layer blob."""
    c = RegistryClient(
        credentials=CredentialResolver(env={}, use_docker_config=False),
        insecure=True,
        stats=Stats(),
        hosts=[],
    )
    try:
        runner.run(
            push_layout(
                c, f"oci:{FIXTURES / 'aci-hello-world'}:amd64-converted", f"{reg.host}/aci/hello:plain"
            ),
            60,
        )
        add_tables(
            c, runner, parse_reference(f"{reg.host}/aci/hello:plain"), block_size=BLOCK, target="verified"
        )
        image = runner.run(c.get_image(f"{reg.host}/aci/hello:verified"), 60)
    finally:
        runner.run(c.aclose(), 10)
    return image.layers[-1].digest


def blob_file(reg: RegistryServer, digest: str) -> Path:
    root = reg.storage / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return root / digest[7:9] / digest[7:] / "data"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tool("nbdkit")
    runner = AsyncRunner("test-verify-nbd")
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    try:
        reg.layer = publish(reg, runner)
        yield reg
    finally:
        reg.stop()
        runner.close()


def _inner_read() -> tuple[int, int]:
    """A device offset of the ACI fixture whose data lives in a table block of the layer blob that
    opening the device never reads (not the first, holding the headers, nor the last two, holding
    the index, jump table and trailer), and the blob offset of a byte of that data."""
    layout = FIXTURES / "aci-hello-world"
    index = json.loads((layout / "index.json").read_text())
    name = "org.opencontainers.image.ref.name"
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(name) == "amd64-converted")
    blobs = layout / "blobs" / "sha256"
    layer = json.loads((blobs / desc["digest"].split(":")[1]).read_text())["layers"][-1]
    blob = open_blob(blobs / layer["digest"].split(":")[1])
    try:
        zf = blob.zfile
        base = blob.envelope.payload.base if blob.envelope is not None else 0
        cols = SealedLayout.read(blob.source).read_entries(blob.source)
        last = (layer["size"] - 1) // BLOCK
        for off, length, moff, zeroed in zip(
            cols.offset, cols.length, cols.moffset, cols.zeroed, strict=True
        ):
            if zeroed:
                continue
            for sector in range(int(length)):
                zblock = (int(moff) + sector) * 512 // zf.block_size
                at, n = zf.block_extent(zblock)
                if 2 <= (base + at) // BLOCK < last - 1 and (base + at + n - 1) // BLOCK < last - 1:
                    return (int(off) + sector) * 512, base + at + n // 2
    finally:
        blob.close()
    raise AssertionError("no data sector in an inner table block")


def _server(reg: RegistryServer, tmp_path: Path, tag: str) -> NbdServer:
    params = [f"image={reg.host}/aci/hello:{tag}", f"insecure-registry={reg.host}", "verify=require"]
    return NbdServer(tmp_path, [*params, "no-cache=true"], readonly=True)


def test_nbdkit_verify_require_serves_good_bytes_and_eio_for_a_flipped_byte(registry, tmp_path):
    device_off, blob_off = _inner_read()
    nbd = libnbd()
    with _server(registry, tmp_path, "verified") as srv:
        h = srv.connect()
        good = h.pread(4096, device_off - device_off % 4096)
        head = h.pread(1 << 20, 0)
    digest = registry.layer
    path = blob_file(registry, digest)
    original = path.read_bytes()
    try:
        flip(path, blob_off)
        srv = _server(registry, tmp_path, "verified").start()  # the open reads no damaged block
        try:
            h = srv.connect()
            assert h.pread(1 << 20, 0) == head  # the blocks the open read are good
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, device_off - device_off % 4096)
            assert e.value.errno == "EIO"  # an error, never other bytes
        finally:
            srv.stop()
        log = srv.log()
        assert digest in log and "the digest table says" in log and "offset" in log, log[-3000:]
        assert f"offset={blob_off - blob_off % BLOCK}" in log, log[-3000:]
    finally:
        path.write_bytes(original)
    with _server(registry, tmp_path, "verified") as srv:  # and with the blob repaired, the same bytes
        assert srv.connect().pread(4096, device_off - device_off % 4096) == good


def test_obd_nbd_verify_require_without_a_table_fails_at_start(registry, tmp_path):
    """``obd nbd REF --verify=require`` over an image with no digest table: a clear error, exit
    status non-zero, and no server left listening."""
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbd.pid"
    ref = f"{registry.host}/aci/hello:plain"
    args = ["--verify=require", "--insecure-registry", registry.host, "--no-cache"]
    try:
        res = subprocess.run(
            [str(OBD), "nbd", ref, *args, "--socket", str(sock), "--pidfile", str(pidfile)],
            env=CLEAN_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if pidfile.exists():  # it started after all: never leave it running
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert res.returncode != 0
    assert "no digest table" in res.stderr, res.stderr[-2000:]
    assert not sock.exists() and not pidfile.exists()
