"""Registry images through ``obd nbd``, ``obd mount`` and the raw nbdkit line (issue 11, items 2–4).

A real docker-registry on 127.0.0.1 (tests/helpers/registry_server.py), real nbdkit started from a
clean environment, real FUSE. The registry options are given the way a user types them
(``--insecure-registry HOST``, ``--tls-verify=false``, ``--creds``); credentials must reach the
server without appearing on any command line (``/proc/PID/cmdline`` is readable by everyone).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dfdaemon import StandInDfdaemon
from registry_server import FaultProxy, RegistryServer
from test_fuse_mount import Mounted, _no_mount_left_behind  # noqa: F401
from test_nbd_launch import CLEAN_ENV, OBD, libnbd, read_device, sha256, wait_for_socket

from fixtures import fixture_path, materialize, require_tool, sha256_file, stack
from obd.cli import main
from obd.image.device import DeviceOptions, open_device

ENTRY = "L0L1/lz4"
#: How much of a large disk is compared.
HEAD = 16 << 20


@pytest.fixture
def registry(tmp_path):
    """A plain-HTTP registry holding the L0L1/lz4 fixture stack as obd/app:v1."""
    reg = RegistryServer(tmp_path / "registry", "noauth").start()
    try:
        push(reg, f"{reg.host}/obd/app:v1")
        yield reg
    finally:
        reg.stop()


def push(reg: RegistryServer, ref: str, *extra: str) -> None:
    layers = [str(materialize(r)) for r in stack(ENTRY)["layers"]]
    assert main(["push", *layers, ref, "--insecure-registry", reg.host, *extra]) == 0


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@contextlib.contextmanager
def obd_nbd_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    """``obd nbd ARGS --socket S --pidfile P`` (nbdkit in the background) until the block ends."""
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbd.pid"
    res = subprocess.run(
        [str(OBD), "nbd", *args, "--socket", str(sock), "--pidfile", str(pidfile)],
        env=env or CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    pid = int(pidfile.read_text())
    try:
        yield sock, pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        # nbdkit forked into the background after opening the image: it must still exit on SIGTERM
        # (Python in the child once waited forever at exit to join the parent's threads)
        deadline = time.monotonic() + 20
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"nbdkit {pid} did not exit within 20 s of SIGTERM")


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive and not a zombie waiting for a parent that may never reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_nbd(sock: Path) -> str:
    h = libnbd().NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    try:
        return sha256(read_device(h))
    finally:
        h.shutdown()


def head_nbd(sock: Path) -> tuple[int, str]:
    """The disk's size and the hash of its first :data:`HEAD` bytes (a whole image is 64 GiB)."""
    h = libnbd().NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    try:
        return h.get_size(), sha256(h.pread(HEAD, 0))
    finally:
        h.shutdown()


def head_local(spec: str) -> tuple[int, str]:
    """What :func:`head_nbd` should see, from the device opened in this process."""
    device = open_device(DeviceOptions(image=[spec]))
    try:
        buf = bytearray(HEAD)
        device.read(memoryview(buf), 0)
        return device.size, sha256(buf)
    finally:
        device.close()


def test_obd_nbd_with_insecure_registry(registry, tmp_path):
    """The README's quick-start line: registry options as options, not nbdkit parameters after --."""
    require_tool("nbdkit")
    ref = f"{registry.host}/obd/app:v1"
    with obd_nbd_server(
        tmp_path, ref, "--insecure-registry", registry.host, "--cache-dir", str(tmp_path / "c")
    ) as (
        sock,
        pid,
    ):
        assert read_nbd(sock) == stack(ENTRY)["sha256"]
        assert f"insecure-registry={registry.host}" in cmdline(pid)
    assert any((tmp_path / "c").rglob("*"))  # read through the block cache given as --cache-dir


def test_obd_nbd_with_tls_verify_false_and_credentials_off_the_command_line(tmp_path):
    require_tool("nbdkit")
    users = {"alice": "s3cret-pw"}
    reg = RegistryServer(tmp_path / "registry", "htpasswd", users=users).start()
    try:
        ref = f"{reg.host}/obd/app:v1"
        push(reg, ref, "--creds", "alice:s3cret-pw")
        with obd_nbd_server(
            tmp_path, ref, "--tls-verify=false", "--creds", "alice:s3cret-pw", "--no-cache"
        ) as (
            sock,
            pid,
        ):
            assert read_nbd(sock) == stack(ENTRY)["sha256"]
            words = cmdline(pid)
            assert "tls-verify=false" in words  # HTTPS tried without verification, then plain HTTP
            assert not any("s3cret" in w or "alice" in w for w in words)
        # without credentials the same registry refuses, and says so before nbdkit listens
        res = subprocess.run(
            [str(OBD), "nbd", ref, "--tls-verify=false", "--socket", str(tmp_path / "x.sock")],
            env=CLEAN_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode != 0 and not (tmp_path / "x.sock").exists()
    finally:
        reg.stop()


def test_raw_nbdkit_line_with_the_plugin_path(registry, tmp_path):
    """``nbdkit ... python "$(obd nbd --plugin-path)" image=IMAGE`` as docs/nbd.md writes it, run by a
    shell: a layer file, an oci: layout and a registry reference with the registry parameters."""
    nbdkit = require_tool("nbdkit")
    env = {**CLEAN_ENV, "PATH": f"{CLEAN_ENV['PATH']}:{Path(sys.prefix) / 'bin'}"}  # `obd` installed
    layout = fixture_path("aci-hello-world/oci-layout").parent
    layer = stack("L0/plain")
    hello = f"oci:{layout}:amd64-converted"
    cases = [
        ([f"image={materialize(layer['layers'][0])}"], layer["sha256"]),
        ([f"image={hello}"], head_local(hello)),
        (
            [f"image={registry.host}/obd/app:v1", f"insecure-registry={registry.host}", "no-cache=true"],
            stack(ENTRY)["sha256"],
        ),
    ]
    for i, (params, want) in enumerate(cases):
        sock = tmp_path / f"raw{i}.sock"
        line = f'{nbdkit} -f -U {sock} python "$(obd nbd --plugin-path)" {shlex.join(params)}'
        log = tmp_path / f"raw{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["/bin/sh", "-c", f"exec {line}"], env=env, stdout=out, stderr=out)
        try:
            wait_for_socket(sock, 60, proc, log.read_text)
            assert (head_nbd(sock) if isinstance(want, tuple) else read_nbd(sock)) == want, params
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_obd_mount_with_insecure_registry_and_tls_verify_false(registry, tmp_path):
    """``obd mount REF MNT --insecure-registry HOST``: the background FUSE server gets the options."""
    ref = f"{registry.host}/obd/app:v1"
    want = stack(ENTRY)["sha256"]
    with Mounted(tmp_path / "m1", ref, "--insecure-registry", registry.host, "--no-cache") as m:
        assert sha256_file(m.disk) == want
        assert "--insecure-registry=" + registry.host in cmdline(m.pid or 0)
    with Mounted(tmp_path / "m2", "--tls-verify=false", ref, "--cache-dir", str(tmp_path / "c")) as m:
        assert sha256_file(m.disk) == want


def mirror_hosts(root: Path, registry: str, mirror: FaultProxy) -> Path:
    """A containerd hosts directory sending ``registry``'s reads to ``mirror`` (plain HTTP)."""
    folder = root / registry
    folder.mkdir(parents=True)
    (folder / "hosts.toml").write_text(
        f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return root


def mirror_blob_reads(mirror: FaultProxy) -> list[str]:
    return [path for method, path, rng, _ in mirror.seen if method == "GET" and "/blobs/" in path and rng]


def test_obd_nbd_reads_through_the_hosts_toml_mirror_and_the_p2p_proxy(registry, tmp_path):
    """--hosts-dir and --p2p-proxy reach the nbdkit plugin: its range reads go to the mirror, carried
    by the (stand-in) dfdaemon at on-demand or prefetch priority."""
    require_tool("nbdkit")
    mirror = FaultProxy(registry.url).start()
    dfd = StandInDfdaemon().start()
    try:
        hosts = mirror_hosts(tmp_path / "certs.d", registry.host, mirror)
        ref = f"{registry.host}/obd/app:v1"
        args = ["--insecure-registry", registry.host, "--hosts-dir", str(hosts), "--no-cache"]
        with obd_nbd_server(tmp_path, ref, *args, "--p2p-proxy", dfd.url) as (sock, pid):
            mirror.seen.clear()  # what obd nbd itself resolved; from here on only nbdkit reads
            assert read_nbd(sock) == stack(ENTRY)["sha256"]
            words = cmdline(pid)
            assert f"hosts-dir={hosts}" in words and f"p2p-proxy={dfd.url}" in words
        assert mirror_blob_reads(mirror)
        carried = [c for c in dfd.blob_reads() if c.range]
        assert carried and all(c.url.startswith(f"http://{mirror.host}/v2/") for c in carried)
        assert {c.priority for c in carried} <= {"3", "6"} and "6" in {c.priority for c in carried}
    finally:
        dfd.stop()
        mirror.stop()


def test_obd_mount_reads_through_the_hosts_toml_mirror_and_the_p2p_address(registry, tmp_path):
    """The background FUSE server gets --hosts-dir and --p2p-address (overlaybd's URL prefix)."""
    mirror = FaultProxy(registry.url).start()
    dfd = StandInDfdaemon().start()
    try:
        hosts = mirror_hosts(tmp_path / "certs.d", registry.host, mirror)
        ref = f"{registry.host}/obd/app:v1"
        args = ["--insecure-registry", registry.host, "--hosts-dir", str(hosts), "--no-cache"]
        with Mounted(tmp_path / "m", ref, *args, "--p2p-address", dfd.address) as m:
            assert sha256_file(m.disk) == stack(ENTRY)["sha256"]
            words = cmdline(m.pid or 0)
            assert words[words.index("--hosts-dir") + 1] == str(hosts)
            assert words[words.index("--p2p-address") + 1] == dfd.address
        assert mirror_blob_reads(mirror)
        carried = [c for c in dfd.blob_reads() if c.range]
        assert carried and {c.mode for c in carried} == {"prefix"}
        assert all(c.url.startswith(f"http://{mirror.host}/v2/obd/app/blobs/sha256:") for c in carried)
    finally:
        dfd.stop()
        mirror.stop()
