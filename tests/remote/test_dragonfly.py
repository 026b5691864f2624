"""Dragonfly's two client modes (dfdaemon's forward proxy, overlaybd's URL prefix) and the priorities.

Real parts: Debian's ``docker-registry`` as the origin; Dragonfly itself is not installable here, so
a stand-in dfdaemon on loopback (tests/helpers/dfdaemon.py) forwards to the registry and records
what it carried. Killing it mid-test must leave reads working, directly.
"""

from __future__ import annotations

import time

import pytest
from dfdaemon import StandInDfdaemon
from registry_server import RegistryServer

from fixtures import FIXTURES
from obd.errors import ConfigError
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config
from obd.observability.stats import Stats
from obd.prefetch.trace import replay
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient
from obd.registry.blob import RemoteBlob
from obd.registry.dragonfly import (
    P2P_CHECKS,
    P2P_FALLBACKS,
    P2P_REQUESTS,
    PREFIX,
    PRIORITY_ON_DEMAND,
    PRIORITY_PREFETCH,
    PROXY,
    P2PConfig,
    background_reads,
)
from obd.registry.push import push_layout

pytestmark = pytest.mark.timeout(180)

ACI = FIXTURES / "aci-hello-world"
ON_DEMAND, PREFETCH = str(PRIORITY_ON_DEMAND), str(PRIORITY_PREFETCH)


def new_client(**kw) -> RegistryClient:
    kw.setdefault("credentials", CredentialResolver(env={}, use_docker_config=False))
    kw.setdefault("insecure", True)
    kw.setdefault("stats", Stats())
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return RegistryClient(hosts=[], **kw)


@pytest.fixture(scope="module")
def runner():
    r = AsyncRunner("test-dragonfly")
    yield r
    r.close()


@pytest.fixture(scope="module")
def origin(tmp_path_factory, runner):
    reg = RegistryServer(tmp_path_factory.mktemp("origin"), "noauth").start()
    c = new_client()
    runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
    runner.run(c.aclose(), 10)
    yield reg
    reg.stop()


@pytest.fixture
def dfdaemon():
    d = StandInDfdaemon().start()
    yield d
    d.stop()


@pytest.fixture(autouse=True)
def _no_env_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def layer(client: RegistryClient, runner: AsyncRunner, ref: str) -> tuple[str, int]:
    image = runner.run(client.get_image(ref), 60)
    return image.layers[0].digest, image.layers[0].size


def test_config_validation():
    assert P2PConfig(PREFIX, "localhost:19145/dragonfly").url == "http://localhost:19145/dragonfly"
    assert P2PConfig.from_options(None, None) is None
    with pytest.raises(ConfigError, match="not both"):
        P2PConfig.from_options("http://a:1", "http://b:2")
    with pytest.raises(ConfigError, match="--p2p-ping-url"):
        P2PConfig.from_options(None, "http://b:2", "http://b:3/ping")
    with pytest.raises(ConfigError, match="--p2p-proxy"):
        P2PConfig(PROXY, "socks5://a:1")
    with pytest.raises(ConfigError, match="no path"):
        P2PConfig(PROXY, "http://a:1/x")


def test_proxy_mode_carries_blob_reads_with_priorities(origin, dfdaemon, runner):
    stats = Stats()
    client = new_client(stats=stats, p2p=P2PConfig(PROXY, dfdaemon.url, dfdaemon.ping_url))
    ref = f"{origin.host}/aci/hello:amd64-converted"
    digest, size = layer(client, runner, ref)
    try:
        direct = new_client()
        want = runner.run(direct.read_range(ref, digest, 0, size, size=size), 30)
        runner.run(direct.aclose(), 10)
        assert runner.run(client.read_range(ref, digest, 100, 2000, size=size), 30) == want[100:2100]
        with background_reads():  # the priority follows the read onto the client's event loop
            assert runner.run(client.read_range(ref, digest, 5000, 100, size=size), 30) == want[5000:5100]
        reads = dfdaemon.blob_reads(digest)
        assert [(c.mode, c.method, c.range, c.priority, c.use_p2p) for c in reads] == [
            ("proxy", "GET", "bytes=100-2099", ON_DEMAND, "true"),
            ("proxy", "GET", "bytes=5000-5099", PREFETCH, "true"),
        ]
        assert reads[0].url == f"http://{origin.host}/v2/aci/hello/blobs/{digest}"
        assert all("/manifests/" not in c.url for c in dfdaemon.carried)  # manifests go directly
        assert dfdaemon.pings == 1 and stats[P2P_CHECKS] == 1  # one health check per interval
        assert stats[P2P_REQUESTS] == len(dfdaemon.blob_reads())  # the config blob too
    finally:
        runner.run(client.aclose(), 10)


def test_readahead_beyond_the_read_is_prefetch(origin, dfdaemon, runner):
    client = new_client(p2p=P2PConfig(PROXY, dfdaemon.url))
    ref = f"{origin.host}/aci/hello:amd64-converted"
    digest, size = layer(client, runner, ref)
    assert size > 12 << 10
    blob = RemoteBlob(client, runner, ref, digest, size, readahead=8 << 10, max_merge=4 << 10, merge_gap=0)
    try:
        assert len(blob.fetch(0, 1000)) == 1000
        got = sorted((c.range, c.priority) for c in dfdaemon.blob_reads(digest))
        assert got == sorted(
            [("bytes=0-4095", ON_DEMAND), ("bytes=4096-8191", PREFETCH), ("bytes=8192-9191", PREFETCH)]
        )
    finally:
        runner.run(client.aclose(), 10)


def test_killed_proxy_falls_back_to_direct_reads_and_is_probed_again(origin, dfdaemon, runner):
    stats = Stats()
    cfg = P2PConfig(PROXY, dfdaemon.url, dfdaemon.ping_url, check_interval=0.3)
    client = new_client(stats=stats, p2p=cfg)
    ref = f"{origin.host}/aci/hello:amd64-converted"
    digest, size = layer(client, runner, ref)
    try:
        first = runner.run(client.read_range(ref, digest, 0, 512, size=size), 30)
        assert len(dfdaemon.blob_reads(digest)) == 1
        dfdaemon.stop()  # mid-test: its pooled connection dies too
        for off in range(512, 4096, 512):
            assert len(runner.run(client.read_range(ref, digest, off, 512, size=size), 30)) == 512
        assert len(dfdaemon.blob_reads(digest)) == 1
        assert stats["errors"] == 0
        assert stats[P2P_FALLBACKS] >= 1 or stats[P2P_CHECKS] >= 2  # a failed request, or a failed check
        dfdaemon.start()  # back on the same port: used again after the next health check
        time.sleep(cfg.check_interval + 0.1)
        assert runner.run(client.read_range(ref, digest, 0, 512, size=size), 30) == first
        assert len(dfdaemon.blob_reads(digest)) == 2
        assert stats["requests"] >= stats[P2P_CHECKS] + stats[P2P_REQUESTS]
    finally:
        runner.run(client.aclose(), 10)


def test_proxy_down_from_the_start_costs_one_check(origin, runner):
    gone = StandInDfdaemon().start()
    gone.stop()
    stats = Stats()
    client = new_client(stats=stats, p2p=P2PConfig(PROXY, gone.url))
    ref = f"{origin.host}/aci/hello:amd64-converted"
    digest, size = layer(client, runner, ref)
    try:
        for off in (0, 1000, 2000):
            assert len(runner.run(client.read_range(ref, digest, off, 100, size=size), 30)) == 100
        assert stats[P2P_CHECKS] == 1 and stats[P2P_REQUESTS] == 0
    finally:
        runner.run(client.aclose(), 10)


def test_prefix_mode_appends_the_blob_url_to_the_address(origin, dfdaemon, runner):
    stats = Stats()
    client = new_client(stats=stats, p2p=P2PConfig(PREFIX, dfdaemon.address))
    ref = f"{origin.host}/aci/hello:amd64-converted"
    digest, size = layer(client, runner, ref)
    try:
        data = runner.run(client.read_range(ref, digest, 10, 90, size=size), 30)
        assert len(data) == 90
        (carried,) = dfdaemon.blob_reads(digest)
        assert carried.mode == "prefix" and carried.range == "bytes=10-99"
        assert carried.url == f"http://{origin.host}/v2/aci/hello/blobs/{digest}"
        assert carried.priority == ON_DEMAND and carried.use_p2p is None
        dfdaemon.stop()
        assert runner.run(client.read_range(ref, digest, 10, 90, size=size), 30) == data
        assert stats[P2P_FALLBACKS] == 1
    finally:
        runner.run(client.aclose(), 10)


def ranged(d: StandInDfdaemon) -> list:
    return [c for c in d.blob_reads() if c.range]


def test_trace_replay_through_the_engine_is_prefetch(origin, dfdaemon, tmp_path):
    """RemoteOptions.p2p through the engine: opening reads on demand, a trace replay's GETs are prefetch."""
    # no readahead: the replay must send GETs of its own, not find the bytes kept from the opening
    opts = RemoteOptions(
        insecure=(origin.host,),
        no_cache=True,
        p2p=P2PConfig(PROXY, dfdaemon.url),
        stats=Stats(),
        readahead=0,
    )
    stack = open_config(registry_config(f"{origin.host}/aci/hello:amd64-converted", opts), remote=opts)
    try:
        opening = ranged(dfdaemon)  # trailers and indexes, read while the stack opens
        assert opening and {c.priority for c in opening} == {ON_DEMAND}
        replay(stack, [(0, 0, 4096)])
        replayed = ranged(dfdaemon)[len(opening) :]
        assert replayed and {c.priority for c in replayed} == {PREFETCH}
    finally:
        stack.close()
        opts.close()
