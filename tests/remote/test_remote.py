"""Overlaybd images read lazily from a real registry: exports equal local ones, auth modes, bytes
fetched per block, pull, prefetch traces, and the nbd plugin serving a registry image."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from ext4tree import read_file
from registry_server import RegistryServer, TokenServer

from fixtures import FIXTURES, data_offsets, materialize, require_tool
from obd.cli import main
from obd.image.local import open_config, open_layers
from obd.image.remote import RemoteOptions, pull_image, registry_config
from obd.image.resolve import open_image
from obd.io.priority import background_reads
from obd.observability.stats import Stats
from obd.prefetch.trace import TraceRecorder, load, replay
from obd.registry.auth import Credentials

pytestmark = pytest.mark.timeout(300)

LSMT = "overlaybd/lsmt/commit/"
L012 = [LSMT + "L0.lz4.commit", LSMT + "L1.zstd.commit", LSMT + "L2.lz4-tar.commit"]
EXT4 = [
    "overlaybd/ext4/base/ext4_64",
    "overlaybd/ext4/l1/overlaybd.commit",
    "overlaybd/ext4/l2/overlaybd.commit",
]
L012_SHA = "7e3ad718b2a31ec2b7b1cfa1bc04a262a16079afda2459ec276efcc8dded970b"
ALICE = ("alice", "alice-Pw-7731")


def obd(*args: str) -> int:
    return main(list(args))


def device_digest(stack) -> str:
    """Digest of a device over its extents (64 GiB devices are mostly holes)."""
    h = hashlib.sha256(str(stack.size).encode())
    for e in stack.extents():
        h.update(f"{e.offset}:{e.length}:{e.kind}".encode())
        if e.kind == "data":
            pos = e.offset
            while pos < e.offset + e.length:
                n = min(8 << 20, e.offset + e.length - pos)
                h.update(stack.pread(pos, n))
                pos += n
    return h.hexdigest()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    host = reg.host
    insecure = ["--insecure-registry", host]
    assert obd("push", *[str(materialize(r)) for r in L012], f"{host}/obd/l012:v1", *insecure) == 0
    assert obd("push", *[str(materialize(r)) for r in EXT4], f"{host}/obd/ext4:v1", *insecure) == 0
    assert (
        obd("push", f"oci:{FIXTURES / 'aci-hello-world'}:amd64-converted", f"{host}/aci/hello:1", *insecure)
        == 0
    )
    assert obd("push", f"oci:{FIXTURES / 'aci-hello-world'}:amd64", f"{host}/aci/plain:1", *insecure) == 0
    yield reg
    reg.stop()


def opts(reg, tmp_path, **kw) -> RemoteOptions:
    return RemoteOptions(insecure=(reg.host,), cache_dir=str(tmp_path / "cache"), stats=Stats(), **kw)


def remote_stack(reg, tmp_path, name, **kw):
    o = opts(reg, tmp_path, **kw)
    return open_config(registry_config(f"{reg.host}/{name}", o), readonly=True, remote=o), o


def test_remote_export_equals_overlaybds_device(registry, tmp_path):
    out = tmp_path / "dev.img"
    assert (
        obd(
            "export",
            f"{registry.host}/obd/l012:v1",
            "-o",
            str(out),
            "-q",
            "--insecure-registry",
            registry.host,
            "--cache-dir",
            str(tmp_path / "cache"),
        )
        == 0
    )
    assert hashlib.sha256(out.read_bytes()).hexdigest() == L012_SHA


def test_remote_ext4_stack_reads_like_the_local_one(registry, tmp_path):
    remote, _ = remote_stack(registry, tmp_path, "obd/ext4:v1")
    local = open_layers([materialize(r) for r in EXT4])
    try:
        assert device_digest(remote) == device_digest(local)
    finally:
        remote.close()
        local.close()


def test_remote_oci_image_serves_hello(registry, tmp_path):
    require_tool("debugfs")
    out = tmp_path / "hw.img"
    assert (
        obd(
            "export",
            f"{registry.host}/aci/hello:1",
            "-o",
            str(out),
            "-q",
            "--insecure-registry",
            registry.host,
            "--cache-dir",
            str(tmp_path / "cache"),
        )
        == 0
    )
    assert len(read_file(out, "/hello")) == 13256


def test_plain_oci_image_from_a_registry_is_read_lazily(registry, tmp_path, capsys):
    """No conversion step: a meta layer is built on first use (more in test_plain_images.py)."""
    out = tmp_path / "x"
    args = ("--insecure-registry", registry.host, "--cache-dir", str(tmp_path / "cache"))
    assert obd("export", f"{registry.host}/aci/plain:1", "-o", str(out), *args) == 0
    assert "plain image; building the file-system index" in capsys.readouterr().err
    assert len(read_file(out, "/hello")) == 13256


def test_one_block_costs_about_one_block_of_fetching(registry, tmp_path):
    """Opening reads the trailers and indexes; then a 4 KiB read fetches O(block), not O(blob)."""
    stack, o = remote_stack(registry, tmp_path, "obd/l012:v1")
    try:
        opened = o.stats["bytes_fetched"]
        blob_bytes = sum(os.path.getsize(materialize(r)) for r in L012)
        assert opened < blob_bytes / 4
        data = next(e for e in stack.extents() if e.kind == "data" and e.length >= 1 << 20)
        before = o.stats["bytes_fetched"]
        block = stack.pread(data.offset + 512 * 1024, 4096)
        fetched = o.stats["bytes_fetched"] - before
        assert 0 < fetched <= 16 * 1024, fetched
        local = open_layers([materialize(r) for r in L012])
        assert block == local.pread(data.offset + 512 * 1024, 4096)
        local.close()
        again = o.stats["bytes_fetched"]
        stack.pread(data.offset + 512 * 1024, 4096)
        assert o.stats["bytes_fetched"] == again  # now from the block cache
    finally:
        stack.close()


def test_pull_fills_the_cache_and_reads_then_need_no_registry(tmp_path):
    reg = RegistryServer(tmp_path / "reg", "noauth").start()
    try:
        host = reg.host
        assert (
            obd(
                "push",
                *[str(materialize(r)) for r in L012],
                f"{host}/obd/l012:v1",
                "--insecure-registry",
                host,
            )
            == 0
        )
        o = opts(reg, tmp_path)
        res = pull_image(f"{host}/obd/l012:v1", o, parallel=3)
        assert res.layers == 3 and res.fetched_bytes == res.total_bytes
        cfg = registry_config(f"{host}/obd/l012:v1", o)
    finally:
        reg.stop()
    # the registry is gone: everything comes from the cache
    o2 = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "cache"), stats=Stats())
    stack = open_config(cfg, readonly=True, remote=o2)
    try:
        assert hashlib.sha256(stack.pread(0, stack.size)).hexdigest() == L012_SHA
        assert o2.stats["requests"] == 0
    finally:
        stack.close()


def test_pull_into_a_layout_keeps_the_image_byte_for_byte(registry, tmp_path, capsys):
    """`obd pull REF oci:DIR:TAG`: same manifest digest, reads offline, pushes back unchanged."""
    host = registry.host
    layout = tmp_path / "layout"
    args = ("--insecure-registry", host, "--cache-dir", str(tmp_path / "cache"), "-q")
    assert obd("pull", f"{host}/obd/l012:v1", f"oci:{layout}:mine", *args) == 0
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "mine"
    o = opts(registry, tmp_path)
    assert entry["digest"] == pull_image(f"{host}/obd/l012:v1", o).manifest_digest
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    stack = open_image(f"oci:{layout}:mine")
    try:
        assert hashlib.sha256(stack.pread(0, stack.size)).hexdigest() == L012_SHA
    finally:
        stack.close()
    assert obd("push", f"oci:{layout}:mine", f"{host}/obd/l012-copy:v1", *args[:2]) == 0
    again = pull_image(f"{host}/obd/l012-copy:v1", o)
    assert again.manifest_digest == entry["digest"]
    assert obd("pull", f"{host}/obd/l012:v1", str(layout), *args) == 1
    assert "oci:DIR[:TAG]" in capsys.readouterr().err


def test_recorded_trace_replays_into_a_cold_cache(registry, tmp_path):
    """Record a workload's reads; on a cold cache, replaying the trace leaves nothing to fetch."""
    stack, _ = remote_stack(registry, tmp_path / "a", "obd/l012:v1")
    workload = data_offsets(stack, 40, seed=5)
    recorder = TraceRecorder(stack)
    expect = [stack.pread(off, 4096) for off in workload]
    with background_reads():  # a prefetch's guesses are not the workload's reads
        stack.pread(stack.size - (1 << 20), 1 << 20)
    trace = tmp_path / "work.trace"
    assert recorder.save(trace) == len(recorder.records) > 0
    stack.close()
    assert sum(n for _, _, n in load(trace)) <= 40 * 4096
    assert {layer for layer, _, _ in load(trace)} <= {0, 1, 2}
    assert obd("trace", "show", str(trace)) == 0

    cold, o = remote_stack(registry, tmp_path / "b", "obd/l012:v1")
    try:
        res = replay(cold, load(trace), workers=8)
        assert res.bytes > 0
        before = o.stats["requests"]
        assert [cold.pread(off, 4096) for off in workload] == expect
        assert o.stats["requests"] == before  # the workload found everything in the cache
    finally:
        cold.close()


def test_htpasswd_registry_needs_and_takes_credentials(tmp_path, capsys, monkeypatch):
    reg = RegistryServer(tmp_path / "reg", "htpasswd", users=dict([ALICE])).start()
    try:
        host = reg.host
        creds = f"{ALICE[0]}:{ALICE[1]}"
        args = ["--insecure-registry", host, "--cache-dir", str(tmp_path / "cache")]
        assert (
            obd("push", *[str(materialize(r)) for r in L012], f"{host}/obd/l012:v1", "--creds", creds, *args)
            == 0
        )
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nodocker"))
        monkeypatch.delenv("OBD_REGISTRY_USER", raising=False)
        assert obd("export", f"{host}/obd/l012:v1", "-o", str(tmp_path / "x"), *args) == 1
        err = capsys.readouterr().err
        assert "obd: error:" in err and ALICE[1] not in err
        out = tmp_path / "dev.img"
        monkeypatch.setenv("OBD_REGISTRY_USER", ALICE[0])
        monkeypatch.setenv("OBD_REGISTRY_PASSWORD", ALICE[1])
        assert obd("export", f"{host}/obd/l012:v1", "-o", str(out), "-q", *args) == 0
        assert hashlib.sha256(out.read_bytes()).hexdigest() == L012_SHA
    finally:
        reg.stop()


def test_token_registry_with_scoped_tokens(tmp_path):
    acl = {"alice": [("*", {"pull", "push"})], None: [("public/*", {"pull"})]}
    tokens = TokenServer(tmp_path, dict([ALICE]), acl).start()
    reg = RegistryServer(tmp_path, "token", token_server=tokens).start()
    try:
        host = reg.host
        creds = f"{ALICE[0]}:{ALICE[1]}"
        for repo in ("private/l012:v1", "public/l012:v1"):
            assert (
                obd(
                    "push",
                    *[str(materialize(r)) for r in L012],
                    f"{host}/{repo}",
                    "--creds",
                    creds,
                    "--insecure-registry",
                    host,
                )
                == 0
            )
        alice = RemoteOptions(
            insecure=(host,), credentials=Credentials(*ALICE), cache_dir=str(tmp_path / "c1"), stats=Stats()
        )
        stack = open_config(registry_config(f"{host}/private/l012:v1", alice), readonly=True, remote=alice)
        assert hashlib.sha256(stack.pread(0, stack.size)).hexdigest() == L012_SHA
        assert alice.stats["tokens"] >= 1
        stack.close()
        anon = RemoteOptions(
            insecure=(host,),
            cache_dir=str(tmp_path / "c2"),
            stats=Stats(),
            credentials=Credentials("", "", source="test"),
        )
        stack = open_config(registry_config(f"{host}/public/l012:v1", anon), readonly=True, remote=anon)
        assert hashlib.sha256(stack.pread(0, stack.size)).hexdigest() == L012_SHA
        stack.close()
        from obd.errors import RegistryError

        with pytest.raises(RegistryError):
            registry_config(f"{host}/private/l012:v1", anon)
    finally:
        reg.stop()
        tokens.stop()


def test_nbd_plugin_serves_a_registry_image(registry, tmp_path):
    require_tool("nbdkit")
    nbdcopy = require_tool("nbdcopy")
    sock = tmp_path / "nbd.sock"
    out = tmp_path / "copy.img"
    trace = tmp_path / "boot.trace"
    obd_bin = os.path.join(os.path.dirname(os.path.abspath(__import__("sys").executable)), "obd")
    proc = subprocess.Popen(
        [
            obd_bin,
            "nbd",
            f"{registry.host}/obd/l012:v1",
            "--socket",
            str(sock),
            "--foreground",
            "--insecure-registry",
            registry.host,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--record-trace",
            str(trace),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read().decode())
            __import__("time").sleep(0.05)
        subprocess.run([nbdcopy, f"nbd+unix:///?socket={sock}", str(out)], check=True, timeout=120)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == L012_SHA
    assert trace.exists() and len(load(trace)) > 0
