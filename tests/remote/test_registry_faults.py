"""Reads through a fault-injecting proxy: right bytes or a clear RegistryError after bounded retries.

The registry behind the proxy wants Basic auth, so every request the client sends carries
``Authorization`` — which must never reach the object-storage stand-in it is redirected to.
"""

from __future__ import annotations

import threading
import time

import pytest
from registry_server import BlobStore, FaultProxy, RegistryServer, is_blob_get

from fixtures import FIXTURES
from obd.errors import RegistryError
from obd.observability.stats import Stats
from obd.registry import AsyncRunner, CredentialResolver, Credentials, RegistryClient, RemoteBlob
from obd.registry.push import push_layout

pytestmark = pytest.mark.timeout(120)

ACI = FIXTURES / "aci-hello-world"
LAYER = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
DATA = (ACI / "blobs" / "sha256" / LAYER[7:]).read_bytes()
CONFIG = "sha256:b67b1f1224de620e9a932ab7ff0e819d7dd9d236605dd8027e5ecf2df650e65e"
USER = ("faulty", "faulty-Pw-31")
ATTEMPTS = 4


@pytest.fixture(scope="module")
def runner():
    r = AsyncRunner("test-registry-faults")
    yield r
    r.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, runner):
    reg = RegistryServer(tmp_path_factory.mktemp("faults"), "htpasswd", users=dict([USER])).start()
    c = RegistryClient(credentials=Credentials(*USER), insecure=True, stats=Stats())
    runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
    runner.run(c.aclose(), 10)
    store = BlobStore().start()
    store.blobs[LAYER] = DATA
    proxy = FaultProxy(reg.url, store).start()
    yield reg, proxy, store
    proxy.stop()
    store.stop()
    reg.stop()


@pytest.fixture
def proxy(setup):
    _, proxy, store = setup
    proxy.clear()
    store.ttl = 3600.0
    store.requests = store.with_auth = store.expired = 0
    yield proxy
    proxy.clear()


@pytest.fixture
def make(runner, setup):
    made = []

    def make_client(**kw) -> RegistryClient:
        kw.setdefault("attempts", ATTEMPTS)
        kw.setdefault("connect_timeout", 2.0)
        kw.setdefault("read_timeout", 0.5)
        kw.setdefault("request_timeout", 5.0)
        kw.setdefault("backoff", 0.01)
        kw.setdefault("max_backoff", 0.05)
        kw.setdefault("stats", Stats())
        resolver = CredentialResolver(Credentials(*USER), env={}, use_docker_config=False)
        c = RegistryClient(credentials=resolver, insecure=True, **kw)
        made.append(c)
        return c

    yield make_client
    for c in made:
        runner.run(c.aclose(), 10)


def authed_blob_get(request) -> bool:
    # the first request of a client carries no credentials yet: the registry must challenge it
    return is_blob_get(request) and "Authorization" in request.headers


def repo(proxy: FaultProxy) -> str:
    return f"{proxy.host}/aci/hello"


# (fault kind, extra Fault arguments)
TRANSIENT = [
    ("status", {"status": 500}),
    ("status", {"status": 503}),
    ("status", {"status": 429, "headers": {"Retry-After": "0"}}),
    ("drop", {}),
    ("stall", {"seconds": 2.0}),
    ("stall_body", {"seconds": 2.0}),
    ("truncate", {}),
    ("shifted_range", {}),
    ("lying_range", {}),
    ("bad_range_header", {}),
    ("full200", {}),
]
IDS = [k if k != "status" else f"status{kw['status']}" for k, kw in TRANSIENT]


@pytest.mark.parametrize(("kind", "kw"), TRANSIENT, ids=IDS)
def test_transient_fault_is_retried(kind, kw, proxy, make, runner):
    c = make()
    proxy.add(kind, times=ATTEMPTS - 1, **kw)
    offset, length = 100_000, 50_000
    assert (
        runner.run(c.read_range(repo(proxy), LAYER, offset, length, size=len(DATA)), 60)
        == DATA[offset : offset + length]
    )
    assert proxy.injected == [kind] * (ATTEMPTS - 1)
    # aiohttp itself resends an idempotent request once when a reused connection drops
    assert 1 <= c.stats["retries"] <= ATTEMPTS - 1 and c.stats["errors"] == 0


@pytest.mark.parametrize(("kind", "kw"), TRANSIENT, ids=IDS)
def test_persistent_fault_fails_clearly(kind, kw, proxy, make, runner):
    c = make()
    proxy.add(kind, times=None, **kw)
    with pytest.raises(RegistryError, match=f"failed after {ATTEMPTS} attempts") as err:
        runner.run(c.read_range(repo(proxy), LAYER, 100_000, 50_000, size=len(DATA)), 60)
    assert LAYER in str(err.value) and proxy.host in str(err.value)
    # bounded: one request per attempt (aiohttp may resend once on a dropped reused connection)
    assert ATTEMPTS <= len(proxy.injected) <= 2 * ATTEMPTS
    assert c.stats["errors"] == 1


def test_full_body_200_is_used_only_from_offset_zero(proxy, make, runner):
    c = make()
    proxy.add("full200", times=None)
    assert runner.run(c.read_range(repo(proxy), LAYER, 0, 1000), 30) == DATA[:1000]
    assert runner.run(c.read_range(repo(proxy), LAYER, 0, len(DATA)), 30) == DATA
    assert c.stats["retries"] == 0
    with pytest.raises(RegistryError, match="ignored Range"):
        runner.run(c.read_range(repo(proxy), LAYER, 1000, 1000), 30)


def test_retry_after_is_honoured(proxy, make, runner):
    c = make()
    proxy.add("status", times=1, status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    assert runner.run(c.read_range(repo(proxy), LAYER, 0, 10), 30) == DATA[:10]
    assert time.monotonic() - started >= 0.9  # it waited as told (a lower bound, not a speed check)


def test_corrupt_manifest_and_blob_are_refused(proxy, make, runner):
    c = make()
    manifests = lambda r: "/manifests/" in r.path and "Authorization" in r.headers  # noqa: E731
    proxy.add("corrupt", times=1, match=manifests)
    digest, manifest = runner.run(c.get_manifest(f"{repo(proxy)}:amd64-converted"), 30)
    assert manifest["layers"][0]["digest"] == LAYER and c.stats["retries"] == 1
    proxy.add("corrupt", times=None, match=manifests)
    with pytest.raises(RegistryError, match="digest"):
        runner.run(c.get_manifest(f"{repo(proxy)}@{digest}"), 30)
    proxy.clear()
    full_gets = lambda r: authed_blob_get(r) and "Range" not in r.headers  # noqa: E731
    proxy.add("corrupt", times=1, match=full_gets)
    proxy.add("truncate", times=1, match=full_gets)
    assert runner.run(c.get_blob(repo(proxy), LAYER), 30) == DATA
    proxy.add("corrupt", times=None, match=full_gets)
    with pytest.raises(RegistryError, match="digest"):
        runner.run(c.get_blob(repo(proxy), CONFIG), 30)


def test_redirect_without_authorization_cached_and_re_resolved(setup, proxy, make, runner):
    _, _, store = setup
    c = make(redirect_ttl=3600)
    proxy.add("redirect", times=None, match=authed_blob_get)
    for offset in range(0, 600_000, 60_000):
        assert runner.run(c.read_range(repo(proxy), LAYER, offset, 4096), 30) == DATA[offset : offset + 4096]
    assert store.requests == 10 and store.with_auth == 0
    registry_gets = [s for s in proxy.seen if s[0] == "GET" and "/blobs/" in s[1] and s[3]]
    assert len(registry_gets) == 1  # resolved once (with credentials), then the cached URL is used
    assert c.stats["redirects"] == 1
    # the signed URL expires: the object store answers 403 and the client asks the registry again
    store.ttl = 0.3
    c2 = make(redirect_ttl=3600)
    assert runner.run(c2.read_range(repo(proxy), LAYER, 0, 100), 30) == DATA[:100]
    time.sleep(0.5)
    assert runner.run(c2.read_range(repo(proxy), LAYER, 100, 100), 30) == DATA[100:200]
    assert store.expired == 1 and store.with_auth == 0
    assert c2.stats["redirects"] == 2 and c2.stats["errors"] == 0
    # and the client's own TTL for redirect URLs also sends it back to the registry
    c3 = make(redirect_ttl=0.1)
    store.ttl = 3600
    before = store.expired
    runner.run(c3.read_range(repo(proxy), LAYER, 0, 10), 30)
    time.sleep(0.2)
    runner.run(c3.read_range(repo(proxy), LAYER, 10, 10), 30)
    assert c3.stats["redirects"] == 2 and store.expired == before


def test_blob_size_through_redirect(setup, proxy, make, runner):
    _, _, store = setup
    c = make()
    proxy.add("status", times=None, status=405, match=lambda r: r.method == "HEAD")
    proxy.add("redirect", times=None, match=authed_blob_get)
    assert runner.run(c.blob_size(repo(proxy), LAYER), 30) == len(DATA)
    assert store.with_auth == 0


def test_concurrent_reads_under_faults_are_all_correct(proxy, make, runner):
    c = make(attempts=8, max_connections=3)
    blob = RemoteBlob(c, runner, repo(proxy), LAYER, size=len(DATA), coalesce_window=0)
    for kind, kw in [("drop", {}), ("status", {"status": 503}), ("truncate", {}), ("shifted_range", {})]:
        proxy.add(kind, times=2, **kw)
    spans = [(i * 19_000, 7_000) for i in range(32)]
    results: list = [None] * len(spans)

    def read(i: int) -> None:
        offset, length = spans[i]
        buf = bytearray(length)
        try:
            n = blob.readinto(memoryview(buf), offset)
            results[i] = bytes(buf[:n])
        except RegistryError as e:  # would fail the test below
            results[i] = e

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(spans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [DATA[o : o + n] for o, n in spans]
    assert len(proxy.injected) == 8
    assert proxy.max_active <= 3  # the connection limit holds


def test_connection_refused_is_bounded(make, runner):
    from registry_server import free_port

    c = make()
    with pytest.raises(RegistryError, match=f"failed after {ATTEMPTS} attempts"):
        runner.run(c.read_range(f"127.0.0.1:{free_port()}/a/b", LAYER, 0, 10), 30)
