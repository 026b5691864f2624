"""The parts of an image no digest table covers (issue 12): each checked, and ``obd inspect`` says how.

Real parts: Debian's ``docker-registry``, ``obd trace attach`` and ``obd pull`` making a registry
image and an ``oci:`` layout with an acceleration layer, a plain image indexed into the real meta
cache (debugfs). The faults are real files changed on disk: the acceleration layer's blob in the
layout and in the registry's storage, a cached ``gzip.meta``, the cached base layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ext4tree import read_file
from registry_server import RegistryServer
from test_verify_index import DATA, TOOL, _push_plain

from fixtures import materialize, require_tool
from obd.cli import main
from obd.errors import ChecksumError
from obd.image.acceltrace import load_image_trace
from obd.image.local import open_layers
from obd.image.remote import RemoteOptions, registry_config
from obd.image.resolve import image_config
from obd.layer.baselayer import BASE_NAME
from obd.observability.stats import Stats
from obd.prefetch.trace import TraceRecorder, load
from obd.turbo.remote import meta_root

pytestmark = pytest.mark.timeout(240)

L0 = "overlaybd/lsmt/commit/L0.lz4.commit"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tool("debugfs")
    tmp = tmp_path_factory.mktemp("cover")
    reg = RegistryServer(tmp / "registry", "noauth").start()
    try:
        host = reg.host
        layer = str(materialize(L0))
        assert main(["push", layer, f"{host}/obd/l0:v1", "--insecure-registry", host]) == 0
        stack = open_layers([layer])
        recorder = TraceRecorder(stack)
        for off in range(0, 1 << 20, 64 << 10):
            stack.pread(off, 4096)
        reg.trace = tmp / "boot.trace"
        assert recorder.save(reg.trace) > 0
        stack.close()
        args = ["--insecure-registry", host]
        assert (
            main(["trace", "attach", f"{host}/obd/l0:v1", str(reg.trace), f"{host}/obd/l0:accel", *args]) == 0
        )
        reg.plain = _push_plain(host, tmp / "layout")
        yield reg
    finally:
        reg.stop()


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.split(":")[1]


def _flip(path: Path, at: int) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[at] ^= 0x20
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    return original


def test_a_tampered_acceleration_layer_is_refused_from_a_layout_and_a_registry(registry, tmp_path, capsys):
    host = registry.host
    ref = f"{host}/obd/l0:accel"
    opts = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "cache"), stats=Stats())
    cfg = registry_config(ref, opts)
    assert load_image_trace(cfg, opts) == load(registry.trace)
    # obd inspect names the layer and its check
    assert main(["inspect", ref, "--insecure-registry", host, "--cache-dir", str(tmp_path / "i")]) == 0
    out = capsys.readouterr().out
    assert "acceleration layer" in out and "[yes] trace blob" in out, out
    assert "[no] layer blob" in out  # the overlaybd layer has no table: said, not hidden

    # an oci: layout of the image: its trace blob changed on disk
    layout = tmp_path / "layout"
    args = ["--insecure-registry", host, "--cache-dir", str(tmp_path / "pull")]
    assert main(["pull", ref, f"oci:{layout}:accel", *args, "-q"]) == 0
    local = image_config(f"oci:{layout}:accel")
    digest = local.extra["obd"]["trace_layer"]["digest"]
    assert load_image_trace(local) == load(registry.trace)
    blob = _blob(layout, digest)
    _flip(blob, blob.stat().st_size // 2)
    with pytest.raises(ChecksumError, match="the manifest pins") as e:
        load_image_trace(image_config(f"oci:{layout}:accel"))
    assert str(blob) in str(e.value)

    # the registry's copy changed: a fresh cache fetches it and refuses it
    stored = registry.storage / "data/docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    original = _flip(stored, stored.stat().st_size // 2)
    try:
        fresh = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "cache2"), stats=Stats())
        with pytest.raises(ChecksumError, match="the manifest pins") as e:
            load_image_trace(registry_config(ref, fresh), fresh)
        assert digest in str(e.value)
    finally:
        stored.write_bytes(original)


def test_plain_image_meta_and_base_layer_are_checked_and_inspect_says_how(registry, tmp_path, capsys, caplog):
    host = registry.host
    image = f"{host}/plain/app:v1"
    cache = tmp_path / "cache"
    args = ("--insecure-registry", host, "--cache-dir", str(cache), "--quiet")
    assert main(["export", image, "-o", str(tmp_path / "a.raw"), *args]) == 0
    assert main(["inspect", image, "--json", *args[:-1]]) == 0
    report = json.loads(capsys.readouterr().out)
    parts = {e["part"]: e for e in report["verification"]["coverage"]}
    assert parts["lowers[0]"]["what"] == "base layer" and parts["lowers[0]"]["verified"] == "yes"
    metas = [e for p, e in parts.items() if p.endswith(" meta")]
    assert len(metas) == 2 and {e["verified"] for e in metas} == {"local"}
    assert "gzip.meta" in metas[0]["what"] and "not a writer of the cache" in metas[0]["check"]
    assert {e["verified"] for p, e in parts.items() if p.endswith(" data")} == {"yes"}  # tables built

    # a cached gzip index with other bytes (same size): found, rebuilt, the bytes right
    gz = next(p for p in meta_root(cache).rglob("gzip.meta"))
    _flip(gz, gz.stat().st_size // 2)
    assert main(["export", image, "-o", str(tmp_path / "b.raw"), *args]) == 0
    assert "gzip.meta does not have its recorded sha256; rebuilding it" in caplog.text
    assert read_file(tmp_path / "b.raw", "/tool") == TOOL

    # the cached base layer with other bytes: found against the packaged digest, unpacked again
    base = next(cache.rglob(BASE_NAME))
    _flip(base, base.stat().st_size // 2)
    caplog.clear()
    assert main(["export", image, "-o", str(tmp_path / "c.raw"), *args]) == 0
    assert "does not have its sha256; unpacking it again" in caplog.text
    assert read_file(tmp_path / "c.raw", "/data.bin") == DATA
