"""Digest tables for images already in a registry (``obd index``; docs/verify.md), with a real registry.

A plain image gets a table per layer blob while it is indexed (the blob streamed once, its digest
checked); an overlaybd image without pinned tables gets them from ``obd index`` and keeps its
manifest digest. ``--push`` publishes them with the index artifact; another machine takes them
only with ``--allow-referrers``. The fault is real: one byte changed in the registry's blob storage.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from ext4tree import read_file
from registry_server import RegistryServer

from fixtures import FIXTURES, require_tool
from frontends.nbd.backend import PluginOptions
from obd.cache.store import CacheStore, page_crcs
from obd.cli import build_parser, main
from obd.cli.nbd import build_command
from obd.errors import ChecksumError, ObdError
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config
from obd.layer.blob import open_blob
from obd.observability.stats import Stats
from obd.oci.layout import write_layout
from obd.verify.local import LocalTables
from obd.verify.repair import CRC_MISMATCHES, CRC_REFETCHES

pytestmark = pytest.mark.timeout(300)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DATA = random.Random(12).randbytes(600_000)
TOOL = random.Random(13).randbytes(200_000)


def obd(*args: str) -> int:
    return main(list(args))


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _push_plain(host: str, layout: Path) -> list[tuple[str, bytes]]:
    """A two-layer plain image (gzip, then uncompressed tar) at ``host/plain/app:v1``; its layer blobs."""
    raws = [_tar({"tool": TOOL}), _tar({"data.bin": DATA})]
    blobs = [gzip.compress(raws[0], mtime=0), raws[1]]
    types = ["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar"]
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(r).hexdigest() for r in raws],
            },
        }
    ).encode()
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cdigest,
            "size": len(config),
        },
        "layers": [
            {"mediaType": t, "digest": d, "size": len(b)}
            for t, d, b in zip(types, digests, blobs, strict=True)
        ],
    }
    write_layout(
        layout,
        manifest=json.dumps(manifest).encode(),
        media_type=OCI_MANIFEST,
        blobs=[(cdigest, config), *zip(digests, blobs, strict=True)],
        tag="v1",
        platform={"os": "linux", "architecture": "amd64"},
    )
    assert obd("push", f"oci:{layout}:v1", f"{host}/plain/app:v1", "--insecure-registry", host) == 0
    return list(zip(digests, blobs, strict=True))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tool("debugfs")
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    aci = FIXTURES / "aci-hello-world"
    host = reg.host
    assert (
        obd("push", f"oci:{aci}:amd64-converted", f"{host}/aci/hello:obd", "--insecure-registry", host) == 0
    )
    reg.plain = _push_plain(host, tmp_path_factory.mktemp("layout") / "app")
    yield reg
    reg.stop()


def blob_file(reg: RegistryServer, digest: str) -> Path:
    root = reg.storage / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return root / digest[7:9] / digest[7:] / "data"


def test_a_plain_image_gets_tables_while_indexing_and_a_flipped_byte_is_caught(registry, tmp_path, capsys):
    host = registry.host
    image = f"{host}/plain/app:v1"
    cache = tmp_path / "cache"
    args = ("--insecure-registry", host, "--cache-dir", str(cache))
    assert obd("index", image, *args) == 0
    err = capsys.readouterr().err
    assert "digest tables: 2 layers" in err
    kept = LocalTables(cache).pins(d for d, _ in registry.plain)
    assert set(kept) == {d for d, _ in registry.plain}
    blob_bytes = sum(len(b) for _, b in registry.plain)
    assert sum(p.size for p in kept.values()) < blob_bytes * 0.002  # 32 bytes per 64 KiB and a header
    cfg = registry_config(image, RemoteOptions(insecure=(host,), cache_dir=str(cache)))
    assert set(cfg.extra["obd"]["verify"]) == set(kept)
    # --verify=require accepts the image now, and the bytes are right
    out = tmp_path / "ok.raw"
    assert obd("export", image, "-o", str(out), *args, "--quiet", "--verify=require") == 0
    assert read_file(out, "/data.bin") == DATA
    # one byte of the uncompressed layer changed in the registry's storage (no ZFile CRC to catch it)
    digest, _blob = registry.plain[1]
    path = blob_file(registry, digest)
    original = path.read_bytes()
    at = original.index(DATA[:64]) + 300_000
    try:
        path.write_bytes(original[:at] + bytes([original[at] ^ 0x01]) + original[at + 1 :])
        fresh = ("--insecure-registry", host, "--cache-dir", str(tmp_path / "cache2"), "--quiet")
        # cache2 has no meta layers: its index build streams the blob and finds the digest wrong
        assert obd("export", image, "-o", str(tmp_path / "bad0.raw"), *fresh) != 0
        # with the meta and tables already kept, the lazy read itself refuses the bad block
        bad = tmp_path / "bad.raw"
        assert obd("export", image, "-o", str(bad), *args, "--quiet", "--no-cache") != 0
        err = capsys.readouterr().err
        assert digest in err and "the digest table says" in err, err[-2000:]
    finally:
        path.write_bytes(original)


def test_require_refuses_a_plain_layer_without_a_table_until_obd_index(registry, tmp_path, capsys):
    host = registry.host
    image = f"{host}/plain/app:v1"
    cache = tmp_path / "cache"
    args = ("--insecure-registry", host, "--cache-dir", str(cache))
    assert obd("index", image, *args) == 0
    for f in (cache / "verify" / "layers").rglob("*"):
        if f.is_file():
            f.unlink()  # meta layers cached, tables gone (a cache from before tables existed)
    capsys.readouterr()
    assert obd("export", image, "-o", str(tmp_path / "a.raw"), *args, "--quiet", "--verify=require") != 0
    assert "obd index" in capsys.readouterr().err
    assert obd("index", image, *args) == 0  # streams the layers for their tables only
    assert obd("export", image, "-o", str(tmp_path / "b.raw"), *args, "--quiet", "--verify=require") == 0
    assert read_file(tmp_path / "b.raw", "/tool") == TOOL


def test_pushed_tables_are_taken_only_with_allow_referrers(registry, tmp_path, capsys):
    host = registry.host
    image = f"{host}/plain/app:v1"
    reg_args = ("--insecure-registry", host)
    assert obd("index", image, "--push", *reg_args, "--cache-dir", str(tmp_path / "a")) == 0
    assert "2 digest tables" in capsys.readouterr().err
    # another machine, the opt-in: meta layers and tables come from the artifact, nothing is built
    b = tmp_path / "b"
    o = RemoteOptions(insecure=(host,), cache_dir=str(b), allow_referrers=True)
    cfg = registry_config(image, o)
    layers = {d for d, _ in registry.plain}
    indexes = {lw.gzipIndexDigest for lw in cfg.lowers if lw.gzipIndexDigest}  # read by ranges
    assert indexes and set(cfg.extra["obd"]["verify"]) == layers | indexes
    assert not (b / "turbo").exists() or not list((b / "turbo").glob("build-*"))


def test_an_overlaybd_image_without_tables_gets_them_and_keeps_its_digest(registry, tmp_path, capsys):
    host = registry.host
    image = f"{host}/aci/hello:obd"
    reg_args = ("--insecure-registry", host)
    before = registry_config(image, RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "x")))
    assert "verify" not in before.extra["obd"]
    assert obd("index", image, "--push", *reg_args, "--cache-dir", str(tmp_path / "a")) == 0
    out, err = capsys.readouterr()
    assert out.strip().startswith("sha256:") and "digest tables: " in err
    mine = registry_config(image, RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a")))
    assert mine.extra["obd"]["manifest"] == before.extra["obd"]["manifest"]  # the image is unchanged
    assert len(mine.extra["obd"]["verify"]) == len(mine.lowers)
    # another machine: tables only with the opt-in
    plain = registry_config(image, RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "b")))
    assert "verify" not in plain.extra["obd"]
    allowed = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "c"), allow_referrers=True)
    linked = registry_config(image, allowed)
    assert linked.extra["obd"]["verify"] == mine.extra["obd"]["verify"]
    assert (
        obd(
            "export",
            image,
            "-o",
            str(tmp_path / "v.raw"),
            *reg_args,
            "--cache-dir",
            str(tmp_path / "c"),
            "--allow-referrers",
            "--verify=require",
            "--quiet",
        )
        == 0
    )


def _aci_layer() -> tuple[str, int, int]:
    """The overlaybd layer of the ACI fixture: its digest, size, and the blob offset of a byte inside
    ZFile block 0's compressed record (read by every open: the LSMT header is in it)."""
    layout = FIXTURES / "aci-hello-world"
    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(ref) == "amd64-converted")
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"].split(":")[1]).read_text())
    layer = manifest["layers"][-1]
    blob = open_blob(blobs / layer["digest"].split(":")[1])
    try:
        assert blob.zfile is not None
        base = blob.envelope.payload.base if blob.envelope is not None else 0
        offset, length = blob.zfile.block_extent(0)
    finally:
        blob.close()
    return layer["digest"], layer["size"], base + offset + length // 2


def _read(reference: str, opts: RemoteOptions) -> bytes:
    stack = open_config(registry_config(reference, opts), readonly=True, remote=opts)
    try:
        return stack.pread(0, 4 << 20)
    finally:
        stack.close()


def test_a_zfile_crc_mismatch_is_refetched_from_the_origin_and_kept(registry, tmp_path):
    """No digest table: a poisoned cache page (new page CRC, so the cache itself is fooled) fails
    the ZFile block CRC; the block is refetched once from the origin, served and written back."""
    host = registry.host
    image = f"{host}/aci/hello:obd"
    cache = tmp_path / "cache"
    good = _read(image, RemoteOptions(insecure=(host,), cache_dir=str(cache), stats=Stats()))
    digest, size, at = _aci_layer()
    store = CacheStore(str(cache), stats=Stats())
    blob = store.open_blob(digest, size)
    ps = store.page_size
    page = at // ps
    buf = bytearray(min(ps, size - page * ps))
    assert blob.read_data([memoryview(buf)], page * ps) == len(buf)
    buf[at - page * ps] ^= 0xFF
    blob.write_data(memoryview(buf), page * ps)
    blob.sync_data()
    blob.mark_present(page, np.array(page_crcs(memoryview(buf), ps), dtype=np.uint32))
    blob.close()
    opts = RemoteOptions(insecure=(host,), cache_dir=str(cache), stats=Stats())
    assert _read(image, opts) == good
    assert opts.stats[CRC_MISMATCHES] == 1 and opts.stats[CRC_REFETCHES] == 1
    # the good copy went back into the cache: the next run is all hits
    again = RemoteOptions(insecure=(host,), cache_dir=str(cache), stats=Stats())
    assert _read(image, again) == good
    assert again.stats[CRC_MISMATCHES] == 0 and again.stats["cache_misses"] == 0


def test_a_zfile_crc_mismatch_at_the_origin_names_blob_and_offset(registry, tmp_path):
    host = registry.host
    digest, _size, at = _aci_layer()
    path = blob_file(registry, digest)
    original = path.read_bytes()
    try:
        path.write_bytes(original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1 :])
        opts = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "cache"), stats=Stats())
        with pytest.raises(ChecksumError) as e:
            _read(f"{host}/aci/hello:obd", opts)
        msg = str(e.value)
        assert digest in msg and "blob offset" in msg and "the origin's copy fails its CRC as well" in msg
        assert opts.stats[CRC_REFETCHES] == 1
    finally:
        path.write_bytes(original)


def test_obd_nbd_passes_the_verify_options_to_the_plugin(tmp_path):
    """`obd nbd --verify ... --verify-signature KEY --allow-referrers` become plugin keys, and the
    plugin's options give the registry reads exactly those settings."""
    key = tmp_path / "cosign.pub"
    key.write_text("not read here")
    argv = ["nbd", "localhost:5000/app:1", "--socket", str(tmp_path / "s"), "--verify=require"]
    argv += ["--verify-signature", str(key), "--allow-referrers", "--insecure-registry", "localhost:5000"]
    args = build_parser().parse_args(argv)
    cmd = build_command(args)
    params = dict(a.split("=", 1) for a in cmd[cmd.index("python") + 2 :])
    assert params["verify"] == "require" and params["allow-referrers"] == "true"
    assert params["verify-signature"] == str(key)
    plugin = PluginOptions()
    for k, v in params.items():
        plugin.set(k, v)
    remote = plugin.remote()
    assert (remote.verify, remote.verify_signature, remote.allow_referrers) == ("require", str(key), True)
    with pytest.raises(ObdError):
        plugin.set("verify", "sometimes")
