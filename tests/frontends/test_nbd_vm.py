"""The nbd frontend under a real guest: a QEMU ``-M microvm`` (TCG is fine) boots from obd's NBD disk.

* read and write: the guest reads a file, writes one, syncs and powers off; after the nbd server is
  restarted over the same upper directory, a second boot reads the write back (and the device
  exports as a clean ext4 holding it);
* lazy: an image served from the test registry boots, and the server's counters show it fetched
  only a fraction of the layer blob.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ext4tree import e2fsck_clean, read_file
from registry_server import RegistryServer

from fixtures import require_tool
from frontends.run.images import build_layer, busybox_rootfs, push_image
from frontends.run.launcher import NbdServer
from frontends.run.vm import NbdDisk, boot

pytestmark = pytest.mark.timeout(300)

OBD = Path(sys.prefix) / "bin" / "obd"
#: Incompressible bytes the boot never reads: most of the lazy image's blob.
BIG = 24 << 20


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    require_tool("mke2fs")
    base = tmp_path_factory.mktemp("nbdvm")
    files = {
        "etc/motd": "read me\n",
        "data/big.bin": random.Random(3).randbytes(BIG),
    }
    root = busybox_rootfs(base / "root", files=files)
    os.makedirs(root / "data" / "out", exist_ok=True)
    return build_layer(root, base / "layer.commit", size=96 << 20)


def boot_tcg(assets, sock: Path, argv, **kw):
    kw.setdefault("timeout", 120)
    return boot(assets, NbdDisk(socket=str(sock)), argv, accel="tcg", **kw)


class Served:
    """``obd nbd LAYER --upper DIR --socket S --foreground`` as a child process."""

    def __init__(self, layer: Path, upper: Path, sock: Path):
        self.argv = [
            str(OBD),
            "nbd",
            str(layer),
            "--upper",
            str(upper),
            "--socket",
            str(sock),
            "--foreground",
        ]
        self.sock = sock
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Served:
        require_tool("nbdkit")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not self.sock.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"obd nbd exited: {self.proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, "obd nbd did not listen"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()  # no client is connected any more: nbdkit exits, closing the RW layer
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        self.sock.unlink(missing_ok=True)  # nbdkit may leave it behind; the next start must not see it


def test_guest_reads_writes_syncs_and_the_write_survives_a_server_restart(assets, layer, tmp_path):
    upper = tmp_path / "upper"
    sock = tmp_path / "disk.sock"
    script = "cat /etc/motd; echo 'written by the guest' > /data/out/new.txt; sync; echo synced"
    with Served(layer, upper, sock):
        first = boot_tcg(assets, sock, ["sh", "-c", script], readonly=False)
    assert (first.exit_code, first.output) == (0, b"read me\nsynced\n")
    assert (upper / "config.v1.json").is_file()

    with Served(layer, upper, sock):  # a new nbdkit process over the same upper directory
        second = boot_tcg(assets, sock, ["cat", "/data/out/new.txt", "/etc/motd"])
    assert (second.exit_code, second.output) == (0, b"written by the guest\nread me\n")

    # the device the upper directory describes is a clean ext4 holding the write
    disk = tmp_path / "disk.img"
    out = subprocess.run(
        [str(OBD), "export", "--config", str(upper / "config.v1.json"), "-o", str(disk), "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    clean, report = e2fsck_clean(disk)
    assert clean, report
    assert read_file(disk, "/data/out/new.txt") == b"written by the guest\n"


def test_lazy_registry_image_boots_fetching_a_fraction_of_the_blob(assets, layer, tmp_path):
    blob = layer.stat().st_size
    assert blob > BIG  # the random file does not compress
    reg = RegistryServer(tmp_path / "registry", "noauth").start()
    try:
        ref = f"{reg.host}/lazy/busybox:1"
        push_image([layer], ref, insecure=(reg.host,))
        runtime = Path(tempfile.mkdtemp(prefix="obdv", dir="/tmp"))
        server = NbdServer(
            runtime,
            [f"image={ref}", f"insecure-registry={reg.host}", f"cache-dir={tmp_path / 'cache'}"],
        )
        try:
            server.start()
            res = boot_tcg(assets, server.socket, ["sh", "-c", "cat /etc/motd; ls -1 /data"])
        finally:
            server.stop()
            stats = server.stats()
            shutil.rmtree(runtime, ignore_errors=True)
    finally:
        reg.stop()
    assert (res.exit_code, res.output) == (0, b"read me\nbig.bin\nout\n")
    fetched = stats["bytes_fetched"]
    print(f"\nblob {blob} bytes, fetched {fetched} ({fetched / blob:.1%}) in {stats['requests']} requests")
    assert 0 < fetched < blob * 0.25
    assert stats["cache_misses"] > 0
