"""Plain OCI images read lazily from a real registry (Debian's docker-registry), no conversion step.

The first use builds each layer's meta layer by streaming the layer once, then caches it; file data
is read with Range requests from the original blobs (gzip through the gzip index's seek points).
Every file read through obd must equal the file extracted from the plain image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile

import pytest
import zstandard
from ext4tree import read_file, read_tree
from registry_server import RegistryServer
from sparsetar import gnu_sparse_tar, make_sparse_files

from fixtures import FIXTURES, require_tool
from obd.cli import main
from obd.convert.layertar import FILE, TarEntry
from obd.errors import FormatError
from obd.formats.gzindex.format import HEADER_SIZE
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config, resolve_image
from obd.observability.stats import Stats
from obd.oci.layout import write_layout
from obd.oci.model import TURBO_TARGET_DIGEST, Image
from obd.registry.push import push_manifest
from obd.turbo.artifact import (
    ARTIFACT_TYPE,
    INDEX_DIGEST,
    fallback_tag,
    image_metas,
    push_index_artifact,
    push_link,
)
from obd.turbo.build import LocalExtent, RemoteExtent, file_extents
from obd.turbo.parts import (
    INDEX_DIGEST as PART_INDEX_DIGEST,
)
from obd.turbo.parts import (
    INDEX_SIZE,
    INDEX_TABLE_BLOCK_SIZE,
    META_DIGEST,
    META_SIZE,
    IndexParts,
)
from obd.turbo.remote import ensure_meta, meta_root
from obd.verify import coverage as coverage_module
from obd.verify.coverage import coverage
from obd.verify.local import SIDECAR_SUFFIX
from obd.verify.pins import TablePin

pytestmark = pytest.mark.timeout(600)

MTIME = 1700000000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def obd(*args: str) -> int:
    return main(list(args))


def _tar(entries) -> bytes:
    """A layer tar from ``(name, kind, payload)``: kind is file, dir, symlink or hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname, info.mode = tarfile.LNKTYPE, payload, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(payload), 0o755
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _layers():
    """Three layers (gzip, tar, gzip) and the tree they leave: path -> file bytes or ("->", target)."""
    rnd = random.Random(14)
    big = rnd.randbytes(3 << 20)  # several gzip seek points (1 MiB span)
    tool = rnd.randbytes(100_000)
    a = [
        ("etc", "dir", None),
        ("etc/a", "file", b"version one\n"),
        ("etc/gone", "file", b"whited out by layer 2\n"),
        ("bin", "dir", None),
        ("bin/tool", "file", tool),
        ("bin/sh", "symlink", "tool"),
        ("bin/tool-hard", "hardlink", "bin/tool"),
        ("opq", "dir", None),
        ("opq/old", "file", b"hidden by the opaque marker\n"),
        ("opq/sub", "dir", None),
        ("opq/sub/old2", "file", b"also hidden\n"),
        ("data", "dir", None),
        ("data/big.bin", "file", big),
        ("data/empty", "file", b""),
    ]
    b = [
        ("etc/.wh.gone", "file", b""),
        ("etc/a", "file", b"version two\n"),
        ("opq", "dir", None),
        ("opq/.wh..wh..opq", "file", b""),
        ("opq/new", "file", b"new in layer 2\n"),
        ("bin/tool-lower-link", "hardlink", "bin/tool"),
        ("usr", "dir", None),
        ("usr/lib", "dir", None),
        ("usr/lib/libx.so.1", "file", rnd.randbytes(20_000)),
        ("usr/lib/libx.so", "symlink", "libx.so.1"),
    ]
    c = [
        ("bin/.wh.sh", "file", b""),
        ("data/.wh.big.bin", "file", b""),
        ("data/big.bin", "file", big[:1_500_000]),
        ("zeros", "file", bytes(40_000) + b"tail"),
    ]
    tree = {
        "/etc/a": b"version two\n",
        "/bin/tool": tool,
        "/bin/tool-hard": tool,
        "/bin/tool-lower-link": tool,
        "/opq/new": b"new in layer 2\n",
        "/data/big.bin": big[:1_500_000],
        "/data/empty": b"",
        "/usr/lib/libx.so.1": dict((n, p) for n, _k, p in b)["usr/lib/libx.so.1"],
        "/usr/lib/libx.so": ("->", "libx.so.1"),
        "/zeros": bytes(40_000) + b"tail",
    }
    return [
        (gzip.compress(_tar(a), mtime=0), LAYER_GZ, _tar(a)),
        (_tar(b), LAYER_TAR, _tar(b)),
        (gzip.compress(_tar(c), mtime=0), LAYER_GZ, _tar(c)),
    ], tree


def _zstd_layers(layers):
    """The same three layers as zstd: the first of many small frames (zstd:chunked style, seekable),
    the second left uncompressed, the third one zstd frame (no seek point)."""
    (_a, _ta, tar_a), b, (_c, _tc, tar_c) = layers
    z = zstandard.ZstdCompressor()
    step = 256 << 10
    frames = b"".join(z.compress(tar_a[i : i + step]) for i in range(0, len(tar_a), step))
    return [(frames, LAYER_ZSTD, tar_a), b, (z.compress(tar_c), LAYER_ZSTD, tar_c)]


def _push_plain(host: str, layout, layers, name: str = "plain/multi:v1") -> None:
    """Write the plain image of ``layers`` to the OCI layout ``layout`` (tag v1) and push it as ``name``."""
    _write_plain_layout(layout, layers)
    assert obd("push", f"oci:{layout}:v1", f"{host}/{name}", "--insecure-registry", host) == 0


def _write_plain_layout(layout, layers) -> None:
    """The plain image of ``(blob, media type, tar)`` layers in an OCI layout, tagged v1."""
    blobs = []
    descs = []
    diff_ids = []
    for blob, media_type, raw in layers:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        blobs.append((digest, blob))
        descs.append({"mediaType": media_type, "digest": digest, "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/tool"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": descs,
        }
    ).encode()
    write_layout(
        layout,
        manifest=manifest,
        media_type=OCI_MANIFEST,
        blobs=[(config_digest, config), *blobs],
        tag="v1",
        platform={"os": "linux", "architecture": "amd64"},
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tool("debugfs")
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    host = reg.host
    hello = FIXTURES / "aci-hello-world"
    assert obd("push", f"oci:{hello}:amd64", f"{host}/hello:latest", "--insecure-registry", host) == 0
    layers, tree = _layers()
    reg.layout = tmp_path_factory.mktemp("layout") / "multi"
    _push_plain(host, reg.layout, layers)
    _push_plain(host, tmp_path_factory.mktemp("layout") / "zstd", _zstd_layers(layers), "plain/zstd:v1")
    reg.layers, reg.tree = layers, tree
    yield reg
    reg.stop()


def _hello_bytes(tag: str = "amd64") -> bytes:
    """The /hello of the hello-world fixture's image tagged ``tag``, from its layer tar."""
    layout = FIXTURES / "aci-hello-world"
    index = json.loads((layout / "index.json").read_text())
    plain = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF) == tag)
    blob = layout / "blobs" / "sha256"
    manifest = json.loads((blob / plain["digest"].split(":")[1]).read_text())
    layer = (blob / manifest["layers"][0]["digest"].split(":")[1]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("hello")
        assert member is not None
        return member.read()


REF = "org.opencontainers.image.ref.name"


def test_plain_hello_world_is_read_without_conversion(registry, tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "hello.raw"
    host = registry.host
    args = ("--insecure-registry", host, "--cache-dir", str(cache))
    assert obd("export", f"{host}/hello:latest", "-o", str(out), *args) == 0
    err = capsys.readouterr().err
    assert "plain image; building the file-system index of 1 of 1 layers" in err
    assert read_file(out, "/hello") == _hello_bytes()
    metas = list(meta_root(cache).iterdir())
    assert len(metas) == 1 and {p.name for p in metas[0].iterdir()} == {
        "ext4.fs.meta",
        "gzip.meta",
        "turbo.json",
    }
    # the second use finds the meta layer in the cache
    assert obd("export", f"{host}/hello:latest", "-o", str(tmp_path / "again.raw"), *args) == 0
    assert "building" not in capsys.readouterr().err
    assert read_file(tmp_path / "again.raw", "/hello") == _hello_bytes()


def _assert_tree(out, want) -> None:
    """The exported device holds exactly the files of ``want``, with their links and whiteouts."""
    tree = {r["path"]: r for r in read_tree(out)}
    files = {p: r for p, r in tree.items() if r["type"] in ("file", "symlink")}
    assert set(files) == set(want)
    for path, data in want.items():
        if isinstance(data, tuple):
            assert files[path]["type"] == "symlink" and files[path]["target"] == data[1]
        else:
            assert files[path]["sha256"] == hashlib.sha256(data).hexdigest(), path
    # hard links (one in the layer, one onto a lower layer's file) share one inode
    assert tree["/bin/tool"]["ino"] == tree["/bin/tool-hard"]["ino"] == tree["/bin/tool-lower-link"]["ino"]
    assert tree["/bin/tool"]["nlink"] == 3
    # the whiteouts and the opaque directory left nothing behind
    assert (
        "/etc/gone" not in tree
        and "/opq/old" not in tree
        and "/opq/sub" not in tree
        and "/bin/sh" not in tree
    )


def test_multi_layer_plain_image_has_exactly_the_extracted_files(registry, tmp_path, capsys):
    out = tmp_path / "multi.raw"
    host = registry.host
    args = ("--insecure-registry", host, "--cache-dir", str(tmp_path / "cache"), "--quiet")
    assert obd("export", f"{host}/plain/multi:v1", "-o", str(out), *args) == 0
    assert capsys.readouterr().err == ""  # --quiet: the index build says nothing
    _assert_tree(out, registry.tree)


def test_zstd_layers_are_read_through_frames_or_a_local_copy(registry, tmp_path, capsys):
    """A many-frame zstd layer is read lazily at frame boundaries; a one-frame layer is fetched once
    and kept decompressed, and the build says so; the files are those of the gzip image."""
    cache = tmp_path / "cache"
    out = tmp_path / "zstd.raw"
    host = registry.host
    image = f"{host}/plain/zstd:v1"
    assert obd("export", image, "-o", str(out), "--insecure-registry", host, "--cache-dir", str(cache)) == 0
    err = capsys.readouterr().err
    assert "zstd frame index" in err and "keeping it decompressed in the cache" in err
    _assert_tree(out, registry.tree)
    # no block cache: the export above filled it, and this read must go to the registry
    o = RemoteOptions(insecure=(host,), cache_dir=str(cache), no_cache=True, readahead=0, stats=Stats())
    cfg = registry_config(image, o)
    assert [bool(x.targetDigest) for x in cfg.lowers] == [False, True, True, False]
    assert cfg.lowers[1].gzipIndex.endswith("zstd.meta") and cfg.lowers[3].targetFile.endswith("layer.tar")
    # the local copy is read against the digest table made with it: a flipped byte is an error
    copy = cfg.lowers[3].targetFile
    assert os.path.isfile(copy + SIDECAR_SUFFIX) and SIDECAR_SUFFIX == coverage_module.SIDECAR_SUFFIX
    assert [c["verified"] for c in coverage(cfg) if "local decompressed copy" in c["what"]] == ["local"]
    with tarfile.open(copy) as tar:
        member = max((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.size)
    pristine = open(copy, "rb").read()  # noqa: SIM115
    damaged = bytearray(pristine)
    damaged[member.offset_data] ^= 0xFF
    with open(copy, "r+b") as f:
        f.write(damaged)
    try:
        bad = ("-o", str(tmp_path / "bad.raw"), "--insecure-registry", host, "--cache-dir", str(cache))
        assert obd("export", image, *bad) == 1
        err = capsys.readouterr().err
        assert "layer.tar" in err and "block" in err, err
    finally:
        with open(copy, "r+b") as f:
            f.write(pristine)
    stack = open_config(cfg, readonly=True, remote=o)
    try:
        bottom = stack.lowers[1]  # layer 1: many 256 KiB frames
        moffset = max((m for m in bottom.index if m[4] == 1), key=lambda m: m[1])[2]
        before = o.stats["bytes_fetched"]
        got = bottom.files[1].pread(moffset * 512, 4096)  # the tar stream the tag-1 mappings point into
        assert got == registry.layers[0][2][moffset * 512 : moffset * 512 + 4096]
        fetched = o.stats["bytes_fetched"] - before
        assert 0 < fetched < len(_zstd_layers(registry.layers)[0][0]) / 2, fetched
    finally:
        stack.close()
    # through an index artifact: the frame index travels in it, the one-frame layer is fetched once
    reg_args = ("--insecure-registry", host, "--cache-dir", str(cache))
    assert obd("index", image, "--link", "v1-lazy", *reg_args, "--quiet") == 0
    out, err = capsys.readouterr()
    assert err == "" and len(out.split()) == 2  # --quiet: only the two digests
    fresh = ("--insecure-registry", host, "--cache-dir", str(tmp_path / "fresh"))
    assert obd("export", f"{host}/plain/zstd:v1-lazy", "-o", str(tmp_path / "z2.raw"), *fresh) == 0
    err = capsys.readouterr().err
    assert "building" not in err and "fetching it once and keeping it decompressed" in err
    _assert_tree(tmp_path / "z2.raw", registry.tree)


def test_plain_image_in_an_oci_layout(registry, tmp_path, capsys):
    """``oci:DIR:TAG`` of a plain image: meta layers built from the layout's blobs, cached the same way."""
    cache = tmp_path / "cache"
    out = tmp_path / "layout.raw"
    args = ("--cache-dir", str(cache))
    assert obd("export", f"oci:{registry.layout}:v1", "-o", str(out), *args) == 0
    assert "building the file-system index of 3 of 3 layers" in capsys.readouterr().err
    _assert_tree(out, registry.tree)
    # the registry image with the same layers finds them cached (same chain keys)
    reg = ("--insecure-registry", registry.host)
    assert obd("export", f"{registry.host}/plain/multi:v1", "-o", str(tmp_path / "r.raw"), *args, *reg) == 0
    assert "building" not in capsys.readouterr().err


def test_damaged_cached_meta_is_rebuilt(registry, tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    host = registry.host
    args = ("--insecure-registry", host, "--cache-dir", str(cache), "--quiet")
    assert obd("export", f"{host}/plain/multi:v1", "-o", str(tmp_path / "a.raw"), *args) == 0
    metas = sorted(meta_root(cache).iterdir())
    victim = next(d / "ext4.fs.meta" for d in metas)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size, other bytes
    victim.write_bytes(bytes(data))
    assert obd("export", f"{host}/plain/multi:v1", "-o", str(tmp_path / "b.raw"), *args) == 0
    assert "does not have its recorded sha256; rebuilding it" in caplog.text
    _assert_tree(tmp_path / "b.raw", registry.tree)


def test_file_data_is_read_with_ranges_into_the_original_blobs(registry, tmp_path):
    """Once the meta layers exist, reading a block fetches about a seek-point span, not the blob."""
    # readahead off: what is measured is what the seek points cost, not what a readahead adds
    o = RemoteOptions(
        insecure=(registry.host,), cache_dir=str(tmp_path / "cache"), readahead=0, stats=Stats()
    )
    cfg = registry_config(f"{registry.host}/plain/multi:v1", o)  # builds and caches the meta layers
    assert cfg.extra["obd"]["plain"] is True
    assert [bool(low.targetDigest) for low in cfg.lowers] == [False, True, True, True]
    stack = open_config(cfg, readonly=True, remote=o)
    try:
        top = stack.lowers[-1]  # layer 3: data/big.bin, 1.5 MB, in a gzip blob
        remote = [m for m in top.index if m[4] == 1]
        offset, length, moffset, _z, _t = max(remote, key=lambda m: m[1])
        before = o.stats["bytes_fetched"]
        pos = (offset + length // 2) * 512 // 4096 * 4096  # a block in the middle of the file
        got = stack.pread(pos, 4096)
        fetched = o.stats["bytes_fetched"] - before
        tar_c = registry.layers[2][2]
        want_at = moffset * 512 + (pos - offset * 512)
        assert got == tar_c[want_at : want_at + 4096]
        blob_size = len(registry.layers[2][0])
        assert 0 < fetched < blob_size * 0.9, (fetched, blob_size)
    finally:
        stack.close()


def test_index_artifact_is_pushed_and_read_back_only_when_allowed(registry, tmp_path, capsys):
    host = registry.host
    image = f"{host}/plain/multi:v1"
    reg_args = ("--insecure-registry", host)
    assert obd("index", image, "--push", *reg_args, "--cache-dir", str(tmp_path / "a")) == 0
    out, err = capsys.readouterr()
    artifact = out.strip()
    assert artifact.startswith("sha256:") and "linked by tag sha256-" in err
    # the tag fallback of the referrers API: an index listing the artifact
    o = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a"))
    ref, resolved = resolve_image(image, o)
    client = o.client()
    index = o.runner.run(client.fetch_manifest(ref, fallback_tag(resolved.manifest_digest)), 60).json()
    assert [(d["digest"], d["artifactType"]) for d in index["manifests"]] == [(artifact, ARTIFACT_TYPE)]
    manifest = o.runner.run(client.fetch_manifest(ref, artifact), 60).json()
    assert manifest["subject"]["digest"] == resolved.manifest_digest
    assert [d["annotations"][TURBO_TARGET_DIGEST] for d in manifest["layers"]] == [
        d.digest for d in resolved.layers
    ]
    # pushing again replaces the entry instead of adding one
    assert obd("index", image, "--push", *reg_args, "--cache-dir", str(tmp_path / "a")) == 0
    capsys.readouterr()
    index = o.runner.run(client.fetch_manifest(ref, fallback_tag(resolved.manifest_digest)), 60).json()
    assert len(index["manifests"]) == 1
    # another machine (an empty cache) with the opt-in starts from the artifact: nothing is built
    fresh = ("--cache-dir", str(tmp_path / "b"), "--quiet")
    assert obd("export", image, "-o", str(tmp_path / "b.raw"), *reg_args, *fresh, "--allow-referrers") == 0
    assert "building" not in capsys.readouterr().err
    assert read_file(tmp_path / "b.raw", "/data/big.bin") == registry.tree["/data/big.bin"]
    # without the opt-in the weak link is ignored and the index is built locally
    other = ("--cache-dir", str(tmp_path / "c"))
    assert obd("export", image, "-o", str(tmp_path / "c.raw"), *reg_args, *other) == 0
    assert "building the file-system index of 3 of 3 layers" in capsys.readouterr().err


def test_strong_link_finds_the_artifact_without_referrers(registry, tmp_path, capsys):
    """``obd index --link TAG``: an image index at TAG whose descriptor of the image carries the
    artifact's digest; pulling TAG, or that index by digest, starts from the artifact (nothing is
    built) with no --allow-referrers, on a registry without the referrers API."""
    host = registry.host
    reg_args = ("--insecure-registry", host)
    image = f"{host}/plain/multi:v1"
    assert obd("index", image, "--link", "v1-lazy", *reg_args, "--cache-dir", str(tmp_path / "a")) == 0
    artifact, linked = capsys.readouterr().out.split()
    o = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a"))
    ref, resolved = resolve_image(f"{host}/plain/multi:v1-lazy", o)
    index = o.runner.run(o.client().fetch_manifest(ref, linked), 60).json()
    assert [(d["digest"], d["annotations"][INDEX_DIGEST]) for d in index["manifests"]] == [
        (resolved.manifest_digest, artifact)
    ]
    for n, pulled in enumerate((f"{host}/plain/multi:v1-lazy", f"{host}/plain/multi@{linked}")):
        cache = ("--cache-dir", str(tmp_path / f"fresh{n}"))
        out = tmp_path / f"{n}.raw"
        assert obd("export", pulled, "-o", str(out), *reg_args, *cache) == 0
        assert "building" not in capsys.readouterr().err
        assert read_file(out, "/data/big.bin") == registry.tree["/data/big.bin"]
    # the image itself, pulled by its own tag, is not linked: its index is built
    assert (
        obd("export", image, "-o", str(tmp_path / "p.raw"), *reg_args, "--cache-dir", str(tmp_path / "p"))
        == 0
    )
    assert "building the file-system index" in capsys.readouterr().err


def test_all_platforms_link_every_platform(registry, tmp_path, capsys):
    """``obd index --all-platforms --link TAG`` on a multi-platform image: one artifact per platform,
    and a link keeping the original index's descriptors (order, platforms) each annotated with its
    own artifact. Pulling TAG for any platform starts from that platform's artifact."""
    host = registry.host
    reg_args = ("--insecure-registry", host)
    hello = FIXTURES / "aci-hello-world"
    assert obd("push", f"oci:{hello}:docker-list", f"{host}/plain/hello:multi", *reg_args) == 0
    capsys.readouterr()  # the pushed index's digest
    cache = ("--cache-dir", str(tmp_path / "a"))
    image = f"{host}/plain/hello:multi"
    assert obd("index", image, "--all-platforms", "--link", "multi-lazy", *reg_args, *cache, "--quiet") == 0
    *artifacts, linked = capsys.readouterr().out.split()
    o = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a"))
    ref, _ = resolve_image(image, o)
    original = o.runner.run(o.client().fetch_manifest(ref), 60).json()["manifests"]
    link = o.runner.run(o.client().fetch_manifest(ref, linked), 60).json()["manifests"]
    assert [(d["digest"], d["platform"]) for d in link] == [(d["digest"], d["platform"]) for d in original]
    assert len(original) == 9 and [d["annotations"][INDEX_DIGEST] for d in link] == artifacts
    assert len(set(artifacts)) == 9
    for n, (platform, tag) in enumerate((("linux/arm64/v8", "arm64"), ("linux/amd64", "amd64"))):
        out = tmp_path / f"{n}.raw"
        fresh = ("--cache-dir", str(tmp_path / f"fresh{n}"), "--platform", platform)
        assert obd("export", f"{host}/plain/hello:multi-lazy", "-o", str(out), *reg_args, *fresh) == 0
        assert "building" not in capsys.readouterr().err
        assert read_file(out, "/hello") == _hello_bytes(tag)


def test_a_link_of_one_platform_keeps_the_others(registry, tmp_path, capsys):
    """Without --all-platforms only the picked platform is indexed, but the link still lists every
    platform: another one runs from it, its index built on first use."""
    host = registry.host
    reg_args = ("--insecure-registry", host)
    hello = FIXTURES / "aci-hello-world"
    assert obd("push", f"oci:{hello}:docker-list", f"{host}/plain/hello:multi", *reg_args) == 0
    capsys.readouterr()  # the pushed index's digest
    args = ("--platform", "linux/amd64", "--link", "amd64-lazy", *reg_args, "--quiet")
    assert obd("index", f"{host}/plain/hello:multi", *args, "--cache-dir", str(tmp_path / "a")) == 0
    artifact, linked = capsys.readouterr().out.split()
    o = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a"))
    ref, _ = resolve_image(f"{host}/plain/hello:multi", o)
    link = o.runner.run(o.client().fetch_manifest(ref, linked), 60).json()["manifests"]
    assert len(link) == 9
    assert [d.get("annotations", {}).get(INDEX_DIGEST) for d in link] == [artifact] + [None] * 8
    out = tmp_path / "arm.raw"
    fresh = ("--cache-dir", str(tmp_path / "b"), "--platform", "linux/arm64")
    assert obd("export", f"{host}/plain/hello:amd64-lazy", "-o", str(out), *reg_args, *fresh) == 0
    assert "building the file-system index of 1 of 1 layers" in capsys.readouterr().err
    assert read_file(out, "/hello") == _hello_bytes("arm64")
    # a single image has no platforms to walk
    assert obd("index", f"{host}/hello:latest", "--all-platforms", *reg_args) == 1
    assert "--all-platforms needs a multi-platform image" in capsys.readouterr().err


def test_a_strong_link_to_another_images_artifact_is_refused(registry, tmp_path):
    """An index whose annotation names the artifact of another image (hello-world, pushed to the same
    repository) fails loudly instead of being used."""
    host = registry.host
    hello = FIXTURES / "aci-hello-world"
    assert obd("push", f"oci:{hello}:amd64", f"{host}/plain/multi:hello", "--insecure-registry", host) == 0
    o = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a"))
    client = o.client()
    href, himage = resolve_image(f"{host}/plain/multi:hello", o)
    metas = ensure_meta(href, himage, o, quiet=True)
    pushed = o.runner.run(push_index_artifact(client, href, himage, metas), 60)
    ref, multi = resolve_image(f"{host}/plain/multi:v1", o)
    o.runner.run(push_link(client, ref, multi, {multi.manifest_digest: pushed.digest}, "v1-bad"), 60)
    bad, image = resolve_image(f"{host}/plain/multi:v1-bad", o)
    with pytest.raises(FormatError, match="refers to another image"):
        image_metas(bad, image, RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "b")))


def test_an_artifact_for_another_image_is_refused(registry, tmp_path):
    """A tag fallback pointing at another image's artifact fails loudly instead of being used."""
    host = registry.host
    o = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a"), allow_referrers=True)
    ref, multi = resolve_image(f"{host}/plain/multi:v1", o)
    _, hello = resolve_image(f"{host}/hello:latest", o)
    client = o.client()
    metas = ensure_meta(ref, multi, o, quiet=True)
    pushed = o.runner.run(push_index_artifact(client, ref, multi, metas), 60)
    # re-point the fallback tag of another manifest digest (as a tampered registry could)
    index = o.runner.run(client.fetch_manifest(ref, pushed.tag), 60)
    fake = Image(hello.reference, hello.manifest_digest, hello.manifest, hello.config, multi.layers)
    o.runner.run(
        push_manifest(client, ref, index.data, index.media_type, target=fallback_tag(fake.manifest_digest)),
        60,
    )
    o2 = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "b"), allow_referrers=True)
    with pytest.raises(FormatError, match="refers to another image"):
        image_metas(ref, fake, o2)


# -- the artifact's own parts: gzip.meta read by ranges ------------------------------------------------


def _stored(registry, digest: str):
    return registry.storage / "data/docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"


def _linked_parts(registry, tmp_path, capsys, tag: str):
    """Index plain/multi:v1 with a strong link at ``tag``; the artifact manifest's layer descriptors."""
    host = registry.host
    cache = ("--cache-dir", str(tmp_path / "a"))
    assert obd("index", f"{host}/plain/multi:v1", "--link", tag, "--insecure-registry", host, *cache) == 0
    artifact, _linked = capsys.readouterr().out.split()
    o = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "a"))
    ref, _image = resolve_image(f"{host}/plain/multi:v1", o)
    return artifact, o.runner.run(o.client().fetch_manifest(ref, artifact), 60).json()["layers"]


def test_gzip_indexes_are_read_by_ranges_from_the_artifacts_own_parts(registry, tmp_path, capsys):
    """Each gzip layer's descriptor names its ext4.fs.meta and gzip.meta as blobs of their own: a new
    machine fetches the meta whole and reads gzip.meta by ranges (none is cached), the bytes are the
    image's, inspect shows the index checked by its table, and ``obd index --push`` from that cache
    (no gzip.meta in it) pushes the very same artifact."""
    host = registry.host
    artifact, layers = _linked_parts(registry, tmp_path, capsys, "v1-parts")
    parts = [IndexParts.from_annotations(d["annotations"], path="t", field="l") for d in layers]
    assert [p is not None for p in parts] == [True, False, True]  # gzip, tar, gzip
    fresh = ("--insecure-registry", host, "--cache-dir", str(tmp_path / "b"))
    out = tmp_path / "b.raw"
    assert obd("export", f"{host}/plain/multi:v1-parts", "-o", str(out), *fresh, "--quiet") == 0
    assert "building" not in capsys.readouterr().err
    _assert_tree(out, registry.tree)
    dirs = sorted(meta_root(tmp_path / "b").iterdir())
    names = sorted(sorted(p.name for p in d.iterdir()) for d in dirs)
    assert names.count(["ext4.fs.meta", "turbo.json"]) == 3  # no gzip.meta anywhere
    remote = sorted(
        json.loads((d / "turbo.json").read_text()).get("gzipIndexBlob", {}).get("digest", "") for d in dirs
    )
    assert remote == sorted(["", *(p.index[0] for p in parts if p is not None)])
    assert obd("inspect", f"{host}/plain/multi:v1-parts", "--json", *fresh) == 0
    report = json.loads(capsys.readouterr().out)
    gz = [e for e in report["verification"]["coverage"] if e["part"].endswith(" gzip index")]
    assert len(gz) == 2 and {e["verified"] for e in gz} == {"yes"}
    assert obd("index", f"{host}/plain/multi:v1", "--push", *fresh, "--quiet") == 0
    assert capsys.readouterr().out.split()[0] == artifact  # gzip.meta fetched whole, packed alike


def test_a_bad_gzip_index_part_is_refused_and_a_missing_one_falls_back(registry, tmp_path, capsys, caplog):
    host = registry.host
    _artifact, layers = _linked_parts(registry, tmp_path, capsys, "v1-parts")
    parts = IndexParts.from_annotations(layers[0]["annotations"], path="t", field="l")
    assert parts is not None
    image = f"{host}/plain/multi:v1-parts"
    reg = ("--insecure-registry", host, "--quiet")
    # a byte flipped in the registry's gzip.meta (in the first seek point's window, which every
    # read from the layer's start needs): refused, naming the blob, not inflated with a wrong window
    stored = _stored(registry, parts.index[0])
    original = stored.read_bytes()
    data = bytearray(original)
    data[HEADER_SIZE + 100] ^= 0x20
    stored.write_bytes(bytes(data))
    try:
        cache = ("--cache-dir", str(tmp_path / "bad"))
        assert obd("export", image, "-o", str(tmp_path / "bad.raw"), *reg, *cache) != 0
        err = capsys.readouterr().err
        assert parts.index[0] in err and "sha256" in err
    finally:
        stored.write_bytes(original)
    # the meta part gone (a garbage collector that follows only `layers`): the turboOCI tar is used
    stored = _stored(registry, parts.meta[0])
    original = stored.read_bytes()
    stored.unlink()
    try:
        cache = ("--cache-dir", str(tmp_path / "gone"))
        with caplog.at_level("WARNING"):
            assert obd("export", image, "-o", str(tmp_path / "gone.raw"), *reg, *cache) == 0
        assert "reading its turboOCI meta layer instead" in caplog.text
        _assert_tree(tmp_path / "gone.raw", registry.tree)
    finally:
        stored.write_bytes(original)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({META_DIGEST: "sha256:xyz"}, META_DIGEST),
        ({INDEX_SIZE: "0"}, INDEX_SIZE),
        ({INDEX_SIZE: "-5"}, INDEX_SIZE),
        ({META_SIZE: str(1 << 40)}, META_SIZE),
        ({INDEX_TABLE_BLOCK_SIZE: "1000"}, INDEX_TABLE_BLOCK_SIZE),
        ({PART_INDEX_DIGEST: None}, PART_INDEX_DIGEST),
    ],
)
def test_malformed_part_annotations_are_refused_naming_the_field(change, field):
    good = IndexParts(
        ("sha256:" + "a" * 64, 10), ("sha256:" + "b" * 64, 20), TablePin("sha256:" + "c" * 64, 72, 16384)
    )
    ann = good.annotations()
    assert IndexParts.from_annotations(ann, path="art", field="layers[0]") == good
    assert IndexParts.from_annotations({}, path="art", field="layers[0]") is None
    ann.update(change)
    ann = {k: v for k, v in ann.items() if v is not None}
    with pytest.raises(FormatError) as e:
        IndexParts.from_annotations(ann, path="art", field="layers[0]")
    assert e.value.field == f"layers[0].annotations.{field}"


# -- sparse members ----------------------------------------------------------------------------------


def _odd_sparse_tar() -> bytes:
    """A PAX 0.1 sparse member whose segments are not sector-aligned (GNU tar's are): the second
    segment starts 10 bytes into the tar's sector, so its bytes cannot be a remote mapping."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("odd")
        info.mtime, info.mode, info.size = MTIME, 0o644, 10 + 5000 + 3
        info.pax_headers = {"GNU.sparse.size": "20000", "GNU.sparse.map": "3,10,9000,5000,19997,3"}
        tar.addfile(info, io.BytesIO(b"A" * 10 + b"B" * 5000 + b"C" * 3))
    return buf.getvalue()


def test_sparse_members_of_a_plain_image_are_read_lazily(tmp_path, capsys):
    """GNU tar's sparse members in a plain image (old GNU gzip, PAX 0.1 with raw hole detection
    uncompressed, PAX 1.0 and 0.0 gzip, an unaligned PAX 0.1 map): each data segment is a run of
    the tar, the holes between read as zeros, and every file equals the source."""
    require_tool("debugfs")
    files = make_sparse_files(tmp_path / "src")
    src = tmp_path / "src"
    a = gnu_sparse_tar(src, tmp_path / "a.tar", "gnu", ["big", "many"])
    b = gnu_sparse_tar(src, tmp_path / "b.tar", "pax0.1", ["big", "dense"])  # replaces /big
    (src / "c").mkdir()
    (src / "c" / "holes").write_bytes(files["holes"])
    c = gnu_sparse_tar(src, tmp_path / "c.tar", "pax1.0", ["c"])
    d = gnu_sparse_tar(src, tmp_path / "d.tar", "pax0.0", ["many"])
    e = _odd_sparse_tar()
    layers = [
        (gzip.compress(a, mtime=0), LAYER_GZ, a),
        (b, LAYER_TAR, b),
        (gzip.compress(c, mtime=0), LAYER_GZ, c),
        (gzip.compress(d, mtime=0), LAYER_GZ, d),
        (gzip.compress(e, mtime=0), LAYER_GZ, e),
    ]
    layout = tmp_path / "layout"
    _write_plain_layout(layout, layers)
    out = tmp_path / "sparse.raw"
    assert obd("export", f"oci:{layout}:v1", "-o", str(out), "--cache-dir", str(tmp_path / "cache")) == 0
    assert "building the file-system index of 5 of 5 layers" in capsys.readouterr().err
    odd = bytearray(20000)
    odd[3:13], odd[9000:14000], odd[19997:] = b"A" * 10, b"B" * 5000, b"CCC"
    want = {f"/{n}": files[n] for n in ("big", "many", "dense")} | {"/c/holes": files["holes"], "/odd": odd}
    tree = {r["path"]: r for r in read_tree(out) if r["type"] == "file"}
    assert set(tree) == set(want)
    for path, data in want.items():
        assert tree[path]["sha256"] == hashlib.sha256(data).hexdigest(), path


def test_sparse_file_extents_map_segments_and_write_the_rest():
    """:func:`file_extents` of a sparse member: a 512-byte segment inside a 4 KiB block is remote,
    the block's holes are local; an unaligned segment is local whole; the tail maps to its sector."""
    entry = TarEntry(0, 0, b"f", FILE, 0o644, 0, 0, 0, size=10 * 4096 + 3, data_offset=1024)
    entry.sparse = ((4096 + 512, 512), (3 * 4096, 4096 + 7), (10 * 4096, 3))
    # file blocks 1, 3-4 and 10, at device blocks 100, 200-201 and 300
    remote, local = file_extents(entry, [(1, 100, 1), (3, 200, 2), (10, 300, 1)])
    blk = 4096
    assert remote == [RemoteExtent(100 * blk + 512, 512, 1024), RemoteExtent(200 * blk, 4096, 1536)]
    assert local == [
        LocalExtent(100 * blk, 512, 4096),  # the hole before the 512-byte segment
        LocalExtent(100 * blk + 1024, 3072, 5120),  # and after it
        LocalExtent(200 * blk + 4096, 4096, 16384),  # the segment's last 7 bytes: no whole sector
        LocalExtent(300 * blk, 512, 40960),  # the tail, 7 bytes off a tar sector boundary
    ]
    # a file stored whole: one remote run per extent, up to its size rounded to a sector
    plain = TarEntry(1, 0, b"g", FILE, 0o644, 0, 0, 0, size=5000, data_offset=2048)
    assert file_extents(plain, [(0, 7, 2)]) == ([RemoteExtent(7 * blk, 5120, 2048)], [])
