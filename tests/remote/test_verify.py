"""Verified lazy reads (docs/verify.md): digest tables pinned by the manifest, every block checked.

Real parts: Debian's ``docker-registry`` as the origin (and a second one as a hosts.toml mirror),
the real block cache. The faults are real too: one byte changed in a registry's blob storage, in a
cache data file, and a mirror whose copy of a layer differs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from registry_server import FaultProxy, RegistryServer

from fixtures import FIXTURES
from obd.cache.store import CacheStore, page_crcs
from obd.cli import main
from obd.convert.image import ConvertedLayer, _digest_tables
from obd.errors import ConfigError, FormatError, IntegrityError, RegistryError
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config, resolve_image
from obd.observability.stats import Stats
from obd.oci.model import BLOB_DIGEST
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient
from obd.registry.push import push_layout
from obd.registry.reference import parse_reference
from obd.verify import DigestTable, build_table
from obd.verify.pins import TABLE_DIGEST, TablePin
from obd.verify.signature import SIGNATURE_ANNOTATION, SIMPLE_SIGNING, signature_tag
from obd.verify.table import add_tables, artifact_tag
from obd.verify.verifier import MISMATCHES, REFETCHES, VERIFIED_BLOCKS, VerifiedSource

pytestmark = pytest.mark.timeout(240)

ACI = FIXTURES / "aci-hello-world"
READ = 8 << 20  # bytes of the device each test reads (the file system's metadata and more)


def new_client() -> RegistryClient:
    return RegistryClient(
        credentials=CredentialResolver(env={}, use_docker_config=False),
        insecure=True,
        stats=Stats(),
        hosts=[],
    )


@pytest.fixture(scope="module")
def runner():
    r = AsyncRunner("test-verify")
    yield r
    r.close()


def publish(reg: RegistryServer, runner: AsyncRunner, repo: str) -> str:
    """Push the ACI fixture as ``repo:plain`` and, with digest tables, as ``repo:verified``; the
    verified manifest digest."""
    c = new_client()
    try:
        runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/{repo}:plain"), 60)
        ref = parse_reference(f"{reg.host}/{repo}:plain")
        digest, _ = add_tables(c, runner, ref, block_size=64 << 10, target="verified")
    finally:
        runner.run(c.aclose(), 10)
    return digest


@pytest.fixture(scope="module")
def origin(tmp_path_factory, runner):
    reg = RegistryServer(tmp_path_factory.mktemp("origin"), "noauth").start()
    publish(reg, runner, "aci/hello")
    yield reg
    reg.stop()


def options(reg: RegistryServer, tmp_path: Path, **kw) -> RemoteOptions:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return RemoteOptions(insecure=(reg.host,), stats=Stats(), **kw)


def read_device(reference: str, opts: RemoteOptions) -> bytes:
    cfg = registry_config(reference, opts)
    stack = open_config(cfg, readonly=True, remote=opts)
    try:
        return stack.pread(0, READ)
    finally:
        stack.close()


def blob_file(reg: RegistryServer, digest: str) -> Path:
    root = reg.storage / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return root / digest[7:9] / digest[7:] / "data"


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def layer_digest(reg: RegistryServer, repo: str, runner: AsyncRunner) -> tuple[str, int]:
    c = new_client()
    try:
        image = runner.run(c.get_image(f"{reg.host}/{repo}:verified"), 60)
    finally:
        runner.run(c.aclose(), 10)
    layer = image.layers[-1]
    assert TABLE_DIGEST in layer.annotations
    return layer.digest, layer.size


# -- the table format ----------------------------------------------------------------------------


def test_table_round_trip_and_validation():
    blob = os.urandom(200_000)
    data, digest = build_table(lambda b, off: _copy(blob, b, off), len(blob), 64 << 10)
    assert digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    table = DigestTable(data, path="t")
    assert (table.block_size, table.block_count, table.blob_size) == (65536, 4, 200_000)
    assert bytes(table.digest(3)) == hashlib.sha256(blob[3 * 65536 :]).digest()
    table.check_blob(digest, len(blob))
    with pytest.raises(FormatError, match="covers blob"):
        table.check_blob("sha256:" + "0" * 64, len(blob))
    with pytest.raises(FormatError, match="header.magic"):
        DigestTable(b"X" + data[1:], path="t")
    with pytest.raises(FormatError, match="digests need"):
        DigestTable(data[:-1], path="t")
    with pytest.raises(FormatError, match="power of two"):
        build_table(lambda b, off: 0, 10, 3000)


def _copy(blob: bytes, buf: memoryview, off: int) -> int:
    n = min(len(buf), len(blob) - off)
    buf[:n] = blob[off : off + n]
    return n


class _Mem:
    """A Source over bytes that can be made to lie."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.name = "mem"
        self.size = len(data)

    def readinto(self, buf: memoryview, offset: int) -> int:
        return _copy(bytes(self.data), buf, offset)

    def close(self) -> None:
        pass


def test_verified_source_serves_checks_and_repairs():
    blob = os.urandom(300_000)
    data, digest = build_table(lambda b, off: _copy(blob, b, off), len(blob), 4096)
    table = DigestTable(data)
    inner = _Mem(blob)
    inner.data[5000] ^= 1  # block 1 lies
    evicted: list[tuple[int, int]] = []
    stats = Stats()
    src = VerifiedSource(
        inner,  # type: ignore[arg-type]
        table,
        digest=digest,
        stats=stats,
        evict=lambda o, n: evicted.append((o, n)),
        origin=lambda o, n: blob[o : o + n],
    )
    assert src.pread(4000, 10_000) == blob[4000:14_000]
    assert src.pread(0, len(blob)) == blob
    assert evicted == [(4096, 4096)]
    assert stats[MISMATCHES] == 1 and stats[REFETCHES] == 1
    assert stats[VERIFIED_BLOCKS] >= 4
    # an origin serving the same wrong bytes: a typed error naming the offset and both digests
    liar = VerifiedSource(
        inner,  # type: ignore[arg-type]
        table,
        digest=digest,
        stats=Stats(),
        origin=lambda o, n: bytes(inner.data[o : o + n]),
    )
    with pytest.raises(IntegrityError) as e:
        liar.pread(4096, 10)
    msg = str(e.value)
    assert "offset=4096" in msg and digest in msg and bytes(table.digest(1)).hex() in msg
    assert hashlib.sha256(bytes(inner.data[4096:8192])).hexdigest() in msg


def test_convert_writes_a_pinned_table_per_layer(tmp_path):
    path = tmp_path / "layer"
    path.write_bytes(os.urandom(150_000))
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    layer = ConvertedLayer(digest, 150_000, "m", str(path), None, None, None)
    blobs = _digest_tables([layer], 64 << 10)
    assert layer.table is not None and blobs[0][0] == layer.table.digest
    desc = layer.descriptor()
    assert desc["annotations"][BLOB_DIGEST] == digest
    pin = TablePin.from_annotations(desc["annotations"], path="m", field="layers[0]")
    assert pin == layer.table and pin.block_size == 65536
    DigestTable(blobs[0][1]).check_blob(digest, 150_000)  # type: ignore[arg-type]
    assert _digest_tables([layer], 0) == []


# -- against a real registry ---------------------------------------------------------------------


def test_verified_read_matches_and_counts(origin, tmp_path):
    plain = read_device(f"{origin.host}/aci/hello:plain", options(origin, tmp_path, verify="off"))
    opts = options(origin, tmp_path)
    cfg = registry_config(f"{origin.host}/aci/hello:verified", opts)
    assert cfg.extra["obd"]["verify"]
    assert read_device(f"{origin.host}/aci/hello:verified", opts) == plain
    assert opts.stats[VERIFIED_BLOCKS] > 0 and opts.stats[MISMATCHES] == 0
    # warm: served from the cache, still checked
    warm = options(origin, tmp_path)
    assert read_device(f"{origin.host}/aci/hello:verified", warm) == plain
    assert warm.stats[VERIFIED_BLOCKS] > 0 and warm.stats["cache_hits"] > 0


def test_require_refuses_an_image_without_tables(origin, tmp_path):
    with pytest.raises(IntegrityError, match="no digest table"):
        read_device(f"{origin.host}/aci/hello:plain", options(origin, tmp_path, verify="require"))
    data = read_device(f"{origin.host}/aci/hello:verified", options(origin, tmp_path, verify="require"))
    assert len(data) == READ


def test_tampered_registry_blob_is_an_integrity_error(tmp_path, runner):
    reg = RegistryServer(tmp_path / "reg", "noauth").start()
    try:
        publish(reg, runner, "t/hello")
        digest, size = layer_digest(reg, "t/hello", runner)
        flip(blob_file(reg, digest), size - 100)  # the trailer: read on every open
        opts = options(reg, tmp_path)
        with pytest.raises(IntegrityError) as e:
            read_device(f"{reg.host}/t/hello:verified", opts)
        msg = str(e.value)
        assert digest in msg and "offset=" in msg and "the origin serves the same bytes" in msg
        assert opts.stats[MISMATCHES] == 1 and opts.stats[REFETCHES] == 1
    finally:
        reg.stop()


def test_poisoned_cache_is_evicted_and_refetched(origin, tmp_path, runner):
    reference = f"{origin.host}/aci/hello:verified"
    good = read_device(reference, options(origin, tmp_path, verify="off"))
    digest, size = layer_digest(origin, "aci/hello", runner)
    # rewrite one cached page of the layer with a changed byte and a matching CRC (what an
    # attacker with write access to the cache can do; a plain bit flip the page CRC catches)
    store = CacheStore(str(tmp_path / "cache"), stats=Stats())
    blob = store.open_blob(digest, size)
    ps = store.page_size
    page = (size - 100) // ps
    length = min(ps, size - page * ps)
    buf = bytearray(length)
    assert blob.read_data([memoryview(buf)], page * ps) == length
    buf[(size - 100) - page * ps] ^= 0xFF
    blob.write_data(memoryview(buf), page * ps)
    blob.sync_data()
    blob.mark_present(page, np.array(page_crcs(memoryview(buf), ps), dtype=np.uint32))
    blob.close()
    opts = options(origin, tmp_path)
    assert read_device(reference, opts) == good
    assert opts.stats[MISMATCHES] == 1 and opts.stats[REFETCHES] == 1
    # the bad page was evicted: the next run fetches it again and finds it good
    again = options(origin, tmp_path)
    assert read_device(reference, again) == good
    assert again.stats[MISMATCHES] == 0


def test_mirror_serving_a_different_blob_falls_back_to_the_origin(origin, tmp_path, runner):
    mirror = RegistryServer(tmp_path / "mirror", "noauth").start()
    try:
        publish(mirror, runner, "aci/hello")
        digest, size = layer_digest(mirror, "aci/hello", runner)
        flip(blob_file(mirror, digest), size - 100)
        hosts = tmp_path / "hosts" / origin.host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n')
        reference = f"{origin.host}/aci/hello:verified"
        good = read_device(reference, options(origin, tmp_path / "direct", verify="off"))
        opts = options(origin, tmp_path, no_cache=True, cache_dir=None, hosts_dirs=(str(tmp_path / "hosts"),))
        assert read_device(reference, opts) == good
        assert opts.stats[MISMATCHES] >= 1 and opts.stats[REFETCHES] == opts.stats[MISMATCHES]
    finally:
        mirror.stop()


def test_cli_inspect_says_whether_tables_exist_and_require_refuses(origin, tmp_path, capsys):
    args = ["--insecure-registry", origin.host, "--cache-dir", str(tmp_path / "cache")]
    assert main(["inspect", f"{origin.host}/aci/hello:verified", *args]) == 0
    out = capsys.readouterr().out
    assert "verification: digest tables on 1 of 1 layers, 64 KiB blocks" in out, out
    assert main(["inspect", f"{origin.host}/aci/hello:plain", *args]) == 0
    assert "verification: none: no digest tables" in capsys.readouterr().out
    assert main(["inspect", f"{origin.host}/aci/hello:plain", "--verify=require", *args]) == 1
    assert "no digest table pins this layer" in capsys.readouterr().err


def test_tables_stay_referenced_and_travel_with_the_image(origin, tmp_path, runner, capsys):
    c = new_client()
    try:
        image = runner.run(c.get_image(f"{origin.host}/aci/hello:verified"), 60)
        # the artifact that keeps the tables referenced (registry garbage collection)
        raw = runner.run(
            c.fetch_manifest(f"{origin.host}/aci/hello:{artifact_tag(image.manifest_digest)}"), 60
        )
        doc = raw.json()
        assert doc["subject"]["digest"] == image.manifest_digest
        assert [x["digest"] for x in doc["layers"]] == [image.layers[-1].annotations[TABLE_DIGEST]]
    finally:
        runner.run(c.aclose(), 10)
    # pulled into a layout and pushed elsewhere, the image keeps its tables
    layout = tmp_path / "layout"
    args = ["--insecure-registry", origin.host, "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(["pull", f"{origin.host}/aci/hello:verified", f"oci:{layout}:v", *args]) == 0
    assert main(["push", f"oci:{layout}:v", f"{origin.host}/copy/hello:v", *args[:2]]) == 0
    capsys.readouterr()
    opts = options(origin, tmp_path / "copy", verify="require")
    assert len(read_device(f"{origin.host}/copy/hello:v", opts)) == READ
    assert opts.stats[VERIFIED_BLOCKS] > 0


def test_pinned_manifest_digest_and_a_corrupting_link(origin, tmp_path, runner):
    proxy = FaultProxy(origin.url).start()
    try:
        c = new_client()
        try:
            image = runner.run(c.get_image(f"{origin.host}/aci/hello:verified"), 60)
        finally:
            runner.run(c.aclose(), 10)
        pinned = f"{proxy.host}/aci/hello@{image.manifest_digest}"
        opts = RemoteOptions(insecure=(proxy.host,), no_cache=True, stats=Stats())
        # REF@sha256: the manifest bytes must have that digest (a flipped byte is refused)
        proxy.add("corrupt", times=None, match=lambda r: "/manifests/sha256:" in r.path)
        with pytest.raises(RegistryError, match="manifest content has digest"):
            registry_config(pinned, opts)
        proxy.clear()
        # one corrupted ranged response: caught by the table, the block fetched again, served right
        good = read_device(pinned, RemoteOptions(insecure=(proxy.host,), no_cache=True, stats=Stats()))
        proxy.add("corrupt", times=1, match=lambda r: r.method == "GET" and "Range" in r.headers)
        assert read_device(pinned, opts) == good
        assert opts.stats[MISMATCHES] == 1 and opts.stats[REFETCHES] == 1
    finally:
        proxy.stop()


def cosign_sign(reg: RegistryServer, runner: AsyncRunner, repo: str, digest: str, key) -> None:
    """Sign manifest ``digest`` the way ``cosign sign --key`` does: a simple-signing payload blob
    under the ``sha256-<hex>.sig`` tag, its ECDSA signature in the layer annotation."""
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": f"{reg.host}/{repo}"},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        }
    ).encode()
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    config = b"{}"
    c = new_client()
    ref = parse_reference(f"{reg.host}/{repo}")
    try:
        for blob in (payload, config):
            runner.run(c.put_blob(ref, "sha256:" + hashlib.sha256(blob).hexdigest(), blob), 30)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": SIMPLE_SIGNING,
                    "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
                    "size": len(payload),
                    "annotations": {SIGNATURE_ANNOTATION: signature},
                }
            ],
        }
        body = json.dumps(manifest).encode()
        runner.run(c.put_manifest(ref, body, manifest["mediaType"], target=signature_tag(digest)), 30)
    finally:
        runner.run(c.aclose(), 10)


def test_verify_signature_with_a_cosign_key(origin, tmp_path, runner):
    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "cosign.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    other = tmp_path / "other.pub"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    reference = f"{origin.host}/aci/hello:verified"
    with pytest.raises(IntegrityError, match="no valid signature"):
        resolve_image(reference, options(origin, tmp_path, verify_signature=str(pub)))
    digest = resolve_image(reference, options(origin, tmp_path))[1].manifest_digest
    cosign_sign(origin, runner, "aci/hello", digest, key)
    _, image = resolve_image(reference, options(origin, tmp_path, verify_signature=str(pub)))
    assert image.manifest_digest == digest
    with pytest.raises(IntegrityError, match="does not verify with this key"):
        resolve_image(reference, options(origin, tmp_path, verify_signature=str(other)))
    with pytest.raises(ConfigError, match="cannot read the key"):
        resolve_image(reference, options(origin, tmp_path, verify_signature=str(tmp_path / "none")))


def test_a_saved_config_carries_the_pins(origin, tmp_path):
    """What an ``obd nbd`` or ``obd run`` child reads: config.v1.json on disk, pins included."""
    opts = options(origin, tmp_path)
    path = tmp_path / "config.v1.json"
    registry_config(f"{origin.host}/aci/hello:verified", opts).save(path)
    child = options(origin, tmp_path)
    stack = open_config(str(path), readonly=True, remote=child)
    try:
        assert len(stack.pread(0, 1 << 20)) == 1 << 20
    finally:
        stack.close()
    assert child.stats[VERIFIED_BLOCKS] > 0
    with pytest.raises(IntegrityError, match="no digest table"):
        plain = tmp_path / "plain.json"
        registry_config(f"{origin.host}/aci/hello:plain", opts).save(plain)
        open_config(str(plain), readonly=True, remote=options(origin, tmp_path, verify="require"))
