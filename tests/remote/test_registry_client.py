"""The registry client against a real ``docker-registry`` (no auth): push, manifests, ranges, coalescing."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from pathlib import Path

import pytest
from registry_server import RegistryServer

from fixtures import FIXTURES, materialize
from obd.cache import CachedSource, CacheStore
from obd.errors import ConfigError, RegistryError
from obd.image.assemble import push_file_image
from obd.layer.blob import open_blob, open_source
from obd.observability.stats import Stats
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient, RemoteBlob
from obd.registry.blob import DEFAULT_MERGE_GAP
from obd.registry.content import ContentCache
from obd.registry.push import push_layout

pytestmark = pytest.mark.timeout(120)

ACI = FIXTURES / "aci-hello-world"
ACI_BLOBS = ACI / "blobs" / "sha256"
CONVERTED = "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"
PLAIN_AMD64 = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"
ARM64_V8 = "sha256:efebf0f7aee69450f99deafe11121afa720abed733943e50581a9dc7540689c8"
ARM_V7 = "sha256:a0a386314d69d1514d7aa63d12532b284bf37bba15ed7b4fc1a3f86605f86c63"
LSMT_LAYERS = [
    "overlaybd/lsmt/commit/L0.commit",
    "overlaybd/lsmt/commit/L0.zstd.commit",
    "overlaybd/lsmt/commit/L1.commit",
    "overlaybd/lsmt/commit/L2.lz4.commit",
    "overlaybd/lsmt/commit/L2.lz4-tar.commit",
]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def runner():
    r = AsyncRunner("test-registry-client")
    yield r
    r.close()


def new_client(**kw) -> RegistryClient:
    kw.setdefault("credentials", CredentialResolver(env={}, use_docker_config=False))
    kw.setdefault("insecure", True)
    kw.setdefault("stats", Stats())
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return RegistryClient(**kw)


@pytest.fixture
def client(runner):
    c = new_client()
    yield c
    runner.run(c.aclose(), 10)


@pytest.fixture(scope="module")
def pushed(registry, runner):
    """Push the fixture images once; name → (repository, layer digest, local file)."""
    c = new_client()
    repo = f"{registry.host}/aci/hello"
    for tag in ("amd64-converted", "amd64", "docker-list"):
        runner.run(push_layout(c, f"oci:{ACI}:{tag}", repo), 60)
    out: dict[str, tuple[str, str, Path]] = {}
    for rel in LSMT_LAYERS:
        path = materialize(rel)
        name = Path(rel).name.replace(".", "-").lower()
        dest = f"{registry.host}/obd/{name}:v1"
        result = runner.run(push_file_image(c, path, dest), 60)
        assert result.uploaded  # layer and config
        out[rel] = (f"{registry.host}/obd/{name}", sha256(path.read_bytes()), path)
    runner.run(c.aclose(), 10)
    return out


def test_push_layout_preserves_manifest_and_annotations(pushed, registry, runner, client):
    raw = runner.run(client.fetch_manifest(f"{registry.host}/aci/hello:amd64-converted"), 30)
    assert raw.digest == CONVERTED
    assert raw.data == (ACI_BLOBS / CONVERTED[7:]).read_bytes()  # byte for byte
    assert raw.media_type == "application/vnd.oci.image.manifest.v1+json"
    image = runner.run(client.get_image(f"{registry.host}/aci/hello:amd64-converted"), 30)
    assert image.manifest_digest == CONVERTED
    layers = image.overlaybd_layers()
    assert len(layers) == 1 and layers[0].annotations["containerd.io/snapshot/overlaybd/version"] == "0.1.0"
    config_digest = image.manifest["config"]["digest"]
    assert image.config == json.loads((ACI_BLOBS / config_digest[7:]).read_bytes())


def test_push_again_skips_existing_blobs(pushed, registry, runner, client):
    result = runner.run(push_layout(client, f"oci:{ACI}:amd64-converted", f"{registry.host}/aci/hello"), 30)
    assert result.uploaded == [] and len(result.existing) == 2
    assert result.digest == CONVERTED


def test_manifest_by_tag_digest_and_platform(pushed, registry, runner, client):
    repo = f"{registry.host}/aci/hello"
    digest, manifest = runner.run(client.get_manifest(f"{repo}:amd64"), 30)
    assert digest == PLAIN_AMD64
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert runner.run(client.get_manifest(f"{repo}@{CONVERTED}"), 30)[0] == CONVERTED
    assert runner.run(client.get_manifest(f"{repo}:docker-list", "linux/amd64"), 30)[0] == PLAIN_AMD64
    assert runner.run(client.get_manifest(f"{repo}:docker-list", "linux/arm64/v8"), 30)[0] == ARM64_V8
    assert runner.run(client.get_manifest(f"{repo}:docker-list", "linux/arm/v7"), 30)[0] == ARM_V7
    with pytest.raises(ConfigError, match="no manifest for platform windows/amd64"):
        runner.run(client.get_manifest(f"{repo}:docker-list", "windows/amd64"), 30)
    with pytest.raises(RegistryError, match="404"):
        runner.run(client.get_manifest(f"{repo}:no-such-tag"), 30)
    assert client.stats["retries"] == 0  # a 404 is final, not retried


def test_a_warm_resolve_asks_the_registry_only_for_the_tag(pushed, registry, runner, tmp_path, caplog):
    """What a tag names is kept by digest (obd.registry.content): resolving the docker list tag
    again costs one request (the tag), not three (tag, platform manifest, config); the same
    image comes back; a damaged kept manifest is noticed and fetched again."""
    repo = f"{registry.host}/aci/hello:docker-list"
    cache = ContentCache(tmp_path / "content")

    def resolve() -> tuple[object, int]:
        c = new_client(content_cache=cache)
        try:
            return runner.run(c.get_image(repo, "linux/amd64"), 30), c.stats["requests"]
        finally:
            runner.run(c.aclose(), 10)

    cold, cold_requests = resolve()
    warm, warm_requests = resolve()
    assert cold_requests >= 3 and warm_requests == 1
    assert (warm.manifest_digest, warm.manifest, warm.config) == (
        cold.manifest_digest,
        cold.manifest,
        cold.config,
    )
    kept = tmp_path / "content" / "manifests" / "sha256" / PLAIN_AMD64[7:]
    kept.write_bytes(kept.read_bytes()[:-1] + b" ")
    with caplog.at_level("WARNING"):
        again, requests = resolve()
    assert "does not match its digest" in caplog.text and requests == 2
    assert again.manifest == cold.manifest


def test_read_range_matches_local_file(pushed, runner, client):
    rng = random.Random(1234)
    for repo, digest, path in pushed.values():
        data = path.read_bytes()
        size = len(data)
        assert runner.run(client.blob_size(repo, digest), 30) == size
        spans = [(0, 1), (0, size), (size - 1, 1), (size // 2, 4096 if size > 8192 else 1), (4095, 2)]
        spans += [
            (o, rng.randint(1, min(300_000, size - o))) for o in (rng.randrange(size) for _ in range(20))
        ]
        got = runner.run(client.read_ranges(repo, digest, spans, size=size), 60)
        for (offset, length), chunk in zip(spans, got, strict=True):
            assert chunk == data[offset : offset + length], (repo, offset, length)
    assert client.stats["errors"] == 0 and client.stats["retries"] == 0


def test_read_range_errors(pushed, runner, client):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L1.commit"]
    size = path.stat().st_size
    with pytest.raises(RegistryError, match="beyond"):
        runner.run(client.read_range(repo, digest, size - 1, 2, size=size), 30)
    missing = "sha256:" + "0" * 64
    with pytest.raises(RegistryError, match="404"):
        runner.run(client.read_range(repo, missing, 0, 10), 30)
    with pytest.raises(RegistryError, match="404"):
        runner.run(client.blob_size(repo, missing), 30)
    with pytest.raises(ConfigError, match="digest"):
        runner.run(client.read_range(repo, "sha256:xyz", 0, 1), 30)
    assert client.stats["retries"] == 0


def test_get_and_download_blob_verify_digest(pushed, runner, client, tmp_path):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L2.lz4.commit"]
    data = path.read_bytes()
    assert runner.run(client.get_blob(repo, digest), 30) == data
    out = tmp_path / "blob"
    assert runner.run(client.download_blob(repo, digest, out), 30) == len(data)
    assert out.read_bytes() == data
    with pytest.raises(RegistryError, match="limit"):
        runner.run(client.get_blob(repo, digest, max_bytes=1000), 30)


def test_remote_blob_reads_lazily_through_the_format_stack(pushed, runner, client):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L2.lz4-tar.commit"]
    remote = RemoteBlob(client, runner, repo, digest)
    assert remote.size == path.stat().st_size
    local = open_blob(path)
    blob = open_source(remote)
    assert blob.kinds == local.kinds == ["tar", "zfile", "lsmt"]
    inner, want = blob.source, local.source
    for offset in (0, 4096, inner.size // 3, inner.size - 4096):
        assert inner.pread(offset, 4096) == want.pread(offset, 4096)
    local.close()
    assert client.stats["bytes_fetched"] < remote.size  # only what the reads touched


def test_remote_blob_source_interface(pushed, runner, client):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L0.zstd.commit"]
    data = path.read_bytes()
    remote = RemoteBlob(client, runner, repo, digest, size=len(data))
    buf = bytearray(10_000)
    assert remote.readinto(memoryview(buf), len(data) - 100) == 100
    assert bytes(buf[:100]) == data[-100:]
    assert remote.readinto(memoryview(buf), len(data)) == 0
    assert remote.pread(123, 456) == data[123:579]
    assert remote.fetch(0, 0) == b""
    with pytest.raises(RegistryError, match="outside"):
        remote.fetch(len(data) - 1, 2)
    with pytest.raises(RegistryError, match="outside"):
        remote.fetch_many([(0, 1), (-1, 1)])


def test_fetch_many_merges_adjacent_and_overlapping(pushed, runner):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L0.commit"]
    data = path.read_bytes()
    stats = Stats()
    c = new_client(stats=stats)
    try:
        remote = RemoteBlob(c, runner, repo, digest, size=len(data), max_merge=1 << 20)
        ranges = [(8192 + i * 4096, 4096) for i in range(16)]
        assert remote.fetch_many(ranges) == [data[o : o + n] for o, n in ranges]
        assert (stats["fetches"], stats["coalesced"], stats["requests"]) == (1, 15, 1)
        stats.reset()
        overlapping = [(0, 8192), (4096, 8192), (2048, 1024)]
        assert remote.fetch_many(overlapping) == [data[o : o + n] for o, n in overlapping]
        assert stats["requests"] == 1 and stats["shared"] >= 2
        stats.reset()
        big = [(i * (1 << 20), 1 << 20) for i in range(3)]  # three max_merge-sized pieces
        assert remote.fetch_many(big) == [data[o : o + n] for o, n in big]
        assert stats["fetches"] == 3 and stats["coalesced"] == 0
        stats.reset()
        assert remote.fetch(100, 3 << 20) == data[100 : 100 + (3 << 20)]  # split into pieces of max_merge
        assert stats["fetches"] == 3 and stats["coalesced"] == 0
    finally:
        runner.run(c.aclose(), 10)


def _threads(n: int, target) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = target(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    return results


def test_64_concurrent_readers_of_one_range_share_a_fetch(pushed, runner):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L0.commit"]
    data = path.read_bytes()
    stats = Stats()
    c = new_client(stats=stats)
    try:
        remote = RemoteBlob(c, runner, repo, digest, size=len(data), coalesce_window=0.05)

        def read(_: int) -> bytes:
            buf = bytearray(65536)
            n = remote.readinto(memoryview(buf), 1 << 20)
            return bytes(buf[:n])

        results = _threads(64, read)
        assert all(r == data[1 << 20 : (1 << 20) + 65536] for r in results)
        assert stats["reads"] == 64
        assert stats["fetches"] == stats["requests"] <= 4  # not one GET per reader
        assert stats["shared"] >= 64 - stats["fetches"]
    finally:
        runner.run(c.aclose(), 10)


def test_64_concurrent_adjacent_readers_coalesce(pushed, runner):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L0.commit"]
    data = path.read_bytes()
    stats = Stats()
    c = new_client(stats=stats, max_connections=8)
    try:
        remote = RemoteBlob(c, runner, repo, digest, size=len(data), coalesce_window=0.05)
        results = _threads(64, lambda i: remote.fetch(i * 4096, 4096))
        assert results == [data[i * 4096 : (i + 1) * 4096] for i in range(64)]
        assert stats["reads"] == 64
        assert stats["coalesced"] > 0
        assert stats["fetches"] + stats["coalesced"] == 64
        assert stats["requests"] == stats["fetches"] < 64
    finally:
        runner.run(c.aclose(), 10)


def test_ranges_at_most_merge_gap_apart_become_one_get(pushed, runner):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L0.commit"]
    data = path.read_bytes()
    stats = Stats()
    c = new_client(stats=stats)
    try:
        remote = RemoteBlob(c, runner, repo, digest, size=len(data))
        assert remote.merge_gap == DEFAULT_MERGE_GAP == 8192
        near = [(0, 4096), (4096 + 8192, 4096)]  # 8 KiB apart: the gap is fetched and dropped
        assert remote.fetch_many(near) == [data[o : o + n] for o, n in near]
        assert (stats["fetches"], stats["coalesced"], stats["bytes_fetched"]) == (1, 1, 16384)
        stats.reset()
        far = [(0, 4096), (4096 + 8193, 4096)]
        assert remote.fetch_many(far) == [data[o : o + n] for o, n in far]
        assert (stats["fetches"], stats["coalesced"]) == (2, 0)
    finally:
        runner.run(c.aclose(), 10)


def test_cached_source_leaves_sharing_and_merging_to_the_remote_blob(pushed, runner, tmp_path):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L0.commit"]
    data = path.read_bytes()
    stats = Stats()
    c = new_client(stats=stats)
    try:
        remote = RemoteBlob(c, runner, repo, digest, size=len(data), coalesce_window=0.01)
        src = CachedSource(remote, CacheStore(tmp_path, stats=stats, sync=False), digest=digest)
        ps = src.page_size

        def read(i: int) -> bool:
            # everyone wants pages 0..63, each thread starting somewhere else
            off = (i * 8 % 64) * ps
            return src.pread(off, 64 * ps - off) + src.pread(0, off) == data[off : 64 * ps] + data[:off]

        assert all(_threads(8, read))
        assert stats["shared"] > 0  # misses of the same pages at once rode on one GET
        assert stats["bytes_fetched"] < 2 * 64 * ps  # far from one fetch of everything per thread
        stats.reset()
        # pages 3-4 present, 0-2 and 5-7 not: two ranges asked, one GET (the gap is under merge_gap)
        src2 = CachedSource(remote, CacheStore(tmp_path / "b", stats=stats, sync=False), digest=digest)
        src2.pread(3 * ps, 2 * ps)
        stats.reset()
        assert src2.pread(0, 8 * ps) == data[: 8 * ps]
        assert (stats["cache_fetch_ranges"], stats["fetches"], stats["coalesced"]) == (2, 1, 1)
    finally:
        runner.run(c.aclose(), 10)


def test_readahead_serves_sequential_reads(pushed, runner):
    repo, digest, path = pushed["overlaybd/lsmt/commit/L0.commit"]
    data = path.read_bytes()
    stats = Stats()
    c = new_client(stats=stats)
    try:
        remote = RemoteBlob(c, runner, repo, digest, size=len(data), readahead=64 << 10, coalesce_window=0)
        for offset in range(0, 512 << 10, 4096):
            assert remote.fetch(offset, 4096) == data[offset : offset + 4096]
        assert stats["reads"] == 128
        assert stats["fetches"] <= 20  # about one GET per 32 KiB of progress, not one per read
        assert stats["readahead_bytes"] > 0 and stats["shared"] > 100
    finally:
        runner.run(c.aclose(), 10)


def test_cross_repo_mount_and_chunked_upload(pushed, registry, runner):
    stats = Stats()
    c = new_client(stats=stats, chunk_size=20_000)
    try:
        _, digest, path = pushed["overlaybd/lsmt/commit/L1.commit"]
        data = path.read_bytes()
        fate = runner.run(
            c.put_blob(f"{registry.host}/mounted/x", digest, data, mount_from="obd/l1-commit"), 30
        )
        assert fate == "mounted"
        assert runner.run(c.blob_exists(f"{registry.host}/mounted/x", digest), 30)
        # a new blob bigger than chunk_size goes up in PATCH chunks
        blob = bytes(random.Random(5).randbytes(70_000))
        d = sha256(blob)
        assert not runner.run(c.blob_exists(f"{registry.host}/chunked/x", d), 30)
        assert runner.run(c.put_blob(f"{registry.host}/chunked/x", d, blob), 30) == "uploaded"
        assert runner.run(c.get_blob(f"{registry.host}/chunked/x", d), 30) == blob
        # a wrong digest is refused by the registry and reported
        with pytest.raises(RegistryError, match="400"):
            runner.run(c.put_blob(f"{registry.host}/chunked/x", "sha256:" + "1" * 64, b"abc"), 30)
    finally:
        runner.run(c.aclose(), 10)


def test_stats_recorded(pushed, runner, client):
    repo, digest, _ = pushed["overlaybd/lsmt/commit/L1.commit"]
    runner.run(client.read_range(repo, digest, 0, 4096), 30)
    snap = client.stats.snapshot()
    assert snap["requests"] >= 1 and snap["bytes_fetched"] == 4096
    assert snap["latency"]["count"] >= 1 and snap["latency"]["p50"] > 0
    assert "bytes_fetched" in client.stats.format()


def test_https_verified_by_default(pushed, registry, runner, tmp_path):
    from registry_server import FaultProxy, tls_server_context

    ctx, cert = tls_server_context(tmp_path)
    proxy = FaultProxy(registry.url, ssl_context=ctx).start()
    repo, digest, path = pushed["overlaybd/lsmt/commit/L1.commit"]
    repo = repo.replace(registry.host, proxy.host)
    data = path.read_bytes()
    clients = [
        new_client(insecure=False),
        new_client(insecure=False, ca_file=cert),
        new_client(insecure=False, tls_verify=False),
    ]
    try:
        assert clients[0].base_url(clients[0]._repo(repo)).scheme == "https"
        with pytest.raises(RegistryError, match="TLS"):
            runner.run(clients[0].read_range(repo, digest, 0, 10), 30)
        assert clients[0].stats["retries"] == 0  # a certificate failure is final
        assert runner.run(clients[1].read_range(repo, digest, 5, 10), 30) == data[5:15]
        assert (
            runner.run(clients[2].read_range(repo.replace("127.0.0.1", "localhost"), digest, 5, 10), 30)
            == data[5:15]
        )
    finally:
        for c in clients:
            runner.run(c.aclose(), 10)
        proxy.stop()
