"""Cold start from a registry: layers open concurrently, ``--stats`` counts the wire, ``--profile``.

Real parts: Debian's docker-registry holding overlaybd's own layers (tests/helpers/registry_server.py)
and, where the wire is compared with obd's counters, ``bench/slow_proxy.py`` in front of it as the
link (it counts every request and body byte it forwards).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from registry_server import RegistryServer

from fixtures import materialize, require_tool
from obd.cli import main
from obd.errors import RegistryError
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config
from obd.observability.stats import FETCHES, READAHEAD_BYTES, Stats
from obd.registry.blob import AUTO_MAX, AUTO_MIN, READAHEAD_AUTO, LinkEstimate, RemoteBlob
from obd.registry.client import RegistryClient
from obd.registry.loop import default_runner
from obd.registry.reference import parse_reference
from obd.verify.table import add_tables

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import slow_proxy

LSMT = "overlaybd/lsmt/commit/"
L012 = [LSMT + "L0.lz4.commit", LSMT + "L1.zstd.commit", LSMT + "L2.lz4-tar.commit"]
L012_SHA = "7e3ad718b2a31ec2b7b1cfa1bc04a262a16079afda2459ec276efcc8dded970b"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    layers = [str(materialize(r)) for r in L012]
    assert main(["push", *layers, f"{reg.host}/cold/l012:v1", "--insecure-registry", reg.host]) == 0
    yield reg
    reg.stop()


@pytest.fixture
def link(registry):
    """``bench/slow_proxy.py`` in front of the registry with 30 ms per request; yields its host and a
    function returning its (requests, bytes) so far (it stops the proxy)."""
    proc, host = slow_proxy.start(registry.url, delay="30ms")
    counted: list[tuple[int, int]] = []

    def counts() -> tuple[int, int]:
        if not counted:
            words = slow_proxy.stop(proc).split()
            counted.append((int(words[words.index("requests") + 1]), int(words[words.index("bytes") + 1])))
        return counted[0]

    yield host, counts
    counts()


class InFlight:
    """Wraps ``RegistryClient.read_range`` to note how many different blobs had GETs in flight at once."""

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.most = 0
        real = RegistryClient.read_range

        async def read_range(client, ref, digest, offset, length, **kw):
            with self.lock:
                self.now[digest] = self.now.get(digest, 0) + 1
                self.most = max(self.most, len(self.now))
            try:
                return await real(client, ref, digest, offset, length, **kw)
            finally:
                with self.lock:
                    self.now[digest] -= 1
                    if not self.now[digest]:
                        del self.now[digest]

        monkeypatch.setattr(RegistryClient, "read_range", read_range)


def device_sha(stack) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < stack.size:
        n = min(8 << 20, stack.size - pos)
        h.update(stack.pread(pos, n))
        pos += n
    return h.hexdigest()


def test_layers_open_concurrently_and_read_the_same_device(link, tmp_path, monkeypatch):
    host, _ = link
    seen = {}
    for parallel in (1, 16):
        flights = InFlight(monkeypatch)
        opts = RemoteOptions(
            insecure=True, cache_dir=str(tmp_path / f"cache{parallel}"), stats=Stats(), open_parallel=parallel
        )
        try:
            stack = open_config(registry_config(f"{host}/cold/l012:v1", opts), readonly=True, remote=opts)
            assert len(stack.lowers) == 3
            seen[parallel] = flights.most
            digest = device_sha(stack)
            stack.close()
        finally:
            opts.close()
        assert digest == L012_SHA  # overlaybd's own device, whichever way the layers were opened
    assert seen[1] == 1  # one by one: one blob at a time
    assert seen[16] == 3  # all at once: every layer's first reads in flight together


def test_a_layer_that_fails_to_open_fails_the_image_naming_it(registry, tmp_path):
    opts = RemoteOptions(insecure=True, cache_dir=str(tmp_path / "cache"), stats=Stats())
    try:
        cfg = registry_config(f"{registry.host}/cold/l012:v1", opts)
        missing = "sha256:" + "0" * 64
        cfg.lowers[1].digest = missing
        with pytest.raises(RegistryError, match=missing):
            open_config(cfg, readonly=True, remote=opts)
    finally:
        opts.close()


def test_stats_count_every_request_and_byte_the_link_carried(link, tmp_path):
    host, counts = link
    stats = Stats()
    opts = RemoteOptions(insecure=True, cache_dir=str(tmp_path / "cache"), stats=stats)
    try:
        stack = open_config(registry_config(f"{host}/cold/l012:v1", opts), readonly=True, remote=opts)
        stack.pread(0, 1 << 20)
        stack.close()
    finally:
        opts.close()
    requests, nbytes = counts()
    snap = stats.snapshot()
    # manifest, config and every layer-open and data GET: the link's numbers exactly
    assert (snap["requests"], snap["bytes_received"]) == (requests, nbytes)
    assert 0 < snap["bytes_fetched"] < snap["bytes_received"]  # blob data, without manifest and config
    assert snap["timers"]["resolve"] > 0 and snap["timers"]["open"] > 0 and snap["timers"]["fetch"] > 0


def test_export_profile_says_where_the_time_went(registry, tmp_path, capsys):
    out = tmp_path / "dev.img"
    argv = ["export", f"{registry.host}/cold/l012:v1", "-o", str(out), "-q", "--profile"]
    argv += ["--insecure-registry", registry.host, "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == L012_SHA
    for line in ("profile: resolve (token, manifest", "profile: layer opens", "profile: range GETs"):
        assert line in err, err
    assert "profile: wire: " in err and " requests, " in err, err


def test_link_estimate_sizes_readahead_by_the_bandwidth_delay_product():
    link = LinkEstimate()
    assert link.readahead() == AUTO_MIN  # nothing timed yet
    for _ in range(20):
        link.observe(4096, 0.050)  # small GETs: the round trip
        link.observe(1 << 20, 0.050 + (1 << 20) / 5e6)  # large ones: a round trip + bytes at 5 MB/s
    assert link.rtt == pytest.approx(0.050, rel=0.01) and link.rate == pytest.approx(5e6, rel=0.01)
    assert link.readahead() == int(5e6 * 0.050) & ~0xFFFF  # 250 kB, 64 KiB-aligned
    for _ in range(40):
        link.observe(1 << 20, 0.050 + (1 << 20) / 5e9)  # a fast link: capped
    assert link.readahead() == AUTO_MAX


def test_auto_readahead_follows_sequential_reads_only(link, tmp_path):
    host, _ = link
    client = RegistryClient(insecure=True)
    runner = default_runner()
    try:
        image = runner.run(client.get_image(f"{host}/cold/l012:v1"), 60)
        layer = max(image.layers, key=lambda d: d.size)
        stats = Stats()
        blob = RemoteBlob(
            client, runner, image.reference, layer.digest, layer.size, readahead=READAHEAD_AUTO, stats=stats
        )
        want = runner.run(client.get_blob(image.reference, layer.digest), 60)
        scattered = [(o, 4096) for o in range(0, layer.size - 4096, layer.size // 8)][1::2]
        assert [blob.fetch(o, n) for o, n in scattered] == [want[o : o + n] for o, n in scattered]
        assert stats[READAHEAD_BYTES] == 0  # scattered reads: no readahead
        step = 16 << 10
        got = b"".join(blob.fetch(o, min(step, layer.size - o)) for o in range(0, layer.size, step))
        assert got == want
        reads = layer.size // step
        assert stats[READAHEAD_BYTES] > 0 and stats[FETCHES] < len(scattered) + reads // 2
    finally:
        runner.run(client.aclose(), 10)


def test_nbd_profile_prints_when_the_disk_is_ready_and_at_shutdown(registry, tmp_path):
    require_tool("nbdkit")
    nbdcopy = require_tool("nbdcopy")
    sock = tmp_path / "nbd.sock"
    obd_bin = str(Path(sys.executable).with_name("obd"))
    argv = [obd_bin, "nbd", f"{registry.host}/cold/l012:v1", "--socket", str(sock), "-f", "--profile"]
    argv += ["--insecure-registry", registry.host, "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(400):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), proc.communicate(timeout=10)[1]
        subprocess.run([nbdcopy, f"nbd+unix:///?socket={sock}", str(tmp_path / "copy.img")], check=True)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert hashlib.sha256((tmp_path / "copy.img").read_bytes()).hexdigest() == L012_SHA
    ready, _, rest = err.partition("profile: disk ready (image resolved, layers opened)")
    assert "profile: resolve (token, manifest" in ready and "profile: layer opens" in ready, err
    assert "profile: range GETs in flight" in rest and "profile: wire: " in rest, err  # at shutdown


def test_digest_tables_are_fetched_while_the_config_is(registry, tmp_path, monkeypatch):
    """Resolving costs the manifest's round trip, then one more for the config and the layers'
    digest tables together: the config's GET is held until a table's GET has started."""
    import asyncio

    import obd.verify.table as tables_module

    table_started = threading.Event()
    seen: list[str] = []
    real_get_blob = RegistryClient.get_blob

    async def get_blob(client, ref, digest, **kw):
        seen.append(digest)
        if digest == config_digest:
            # the config waits, without blocking the loop, for a table GET to begin beside it
            for _ in range(100):
                if table_started.is_set():
                    break
                await asyncio.sleep(0.01)
            else:
                seen.append("config waited 1 s and no table GET began")
        else:
            table_started.set()
        return await real_get_blob(client, ref, digest, **kw)

    ref = f"{registry.host}/cold/l012:tabled"
    setup = RemoteOptions(insecure=True, no_cache=True)
    try:
        runner, client = default_runner(), setup.client()
        add_tables(client, runner, parse_reference(f"{registry.host}/cold/l012:v1"), target="tabled")
        config_digest = runner.run(client.get_image(ref)).manifest["config"]["digest"]
    finally:
        setup.close()
    monkeypatch.setattr(tables_module, "_tables", {})  # nothing from other tests in this process
    monkeypatch.setattr(RegistryClient, "get_blob", get_blob)
    opts = RemoteOptions(insecure=True, cache_dir=str(tmp_path / "cache"), stats=Stats())
    try:
        cfg = registry_config(ref, opts)
    finally:
        opts.close()
    pins = cfg.extra["obd"]["verify"]
    assert len(pins) == len(cfg.lowers) == 3
    assert "config waited 1 s and no table GET began" not in seen
    assert set(seen) == {config_digest, *(p["digest"] for p in pins.values())}  # each fetched once
    assert len(seen) == 4
