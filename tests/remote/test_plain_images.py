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
import random
import tarfile

import pytest
from ext4tree import read_file, read_tree
from registry_server import RegistryServer

from fixtures import FIXTURES, require_tool
from obd.cli import main
from obd.errors import FormatError
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config, resolve_image
from obd.observability.stats import Stats
from obd.oci.layout import write_layout
from obd.oci.model import TURBO_TARGET_DIGEST, Image
from obd.registry.push import push_manifest
from obd.turbo.artifact import ARTIFACT_TYPE, fallback_tag, image_metas, push_index_artifact
from obd.turbo.remote import ensure_meta, meta_root

pytestmark = pytest.mark.timeout(600)

MTIME = 1700000000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


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


def _push_plain(host: str, layout, layers) -> None:
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
    assert obd("push", f"oci:{layout}:v1", f"{host}/plain/multi:v1", "--insecure-registry", host) == 0


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tool("debugfs")
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    host = reg.host
    hello = FIXTURES / "aci-hello-world"
    assert obd("push", f"oci:{hello}:amd64", f"{host}/hello:latest", "--insecure-registry", host) == 0
    layers, tree = _layers()
    _push_plain(host, tmp_path_factory.mktemp("layout") / "multi", layers)
    reg.layers, reg.tree = layers, tree
    yield reg
    reg.stop()


def _hello_bytes() -> bytes:
    layout = FIXTURES / "aci-hello-world"
    index = json.loads((layout / "index.json").read_text())
    plain = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF) == "amd64")
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


def test_multi_layer_plain_image_has_exactly_the_extracted_files(registry, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "multi.raw"
    host = registry.host
    assert (
        obd(
            "export",
            f"{host}/plain/multi:v1",
            "-o",
            str(out),
            "--insecure-registry",
            host,
            "--cache-dir",
            str(cache),
            "--quiet",
        )
        == 0
    )
    tree = {r["path"]: r for r in read_tree(out)}
    files = {p: r for p, r in tree.items() if r["type"] in ("file", "symlink")}
    assert set(files) == set(registry.tree)
    for path, want in registry.tree.items():
        if isinstance(want, tuple):
            assert files[path]["type"] == "symlink" and files[path]["target"] == want[1]
        else:
            assert files[path]["sha256"] == hashlib.sha256(want).hexdigest(), path
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


def test_file_data_is_read_with_ranges_into_the_original_blobs(registry, tmp_path):
    """Once the meta layers exist, reading a block fetches about a seek-point span, not the blob."""
    o = RemoteOptions(insecure=(registry.host,), cache_dir=str(tmp_path / "cache"), stats=Stats())
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
    other = ("--cache-dir", str(tmp_path / "c"), "--quiet")
    assert obd("export", image, "-o", str(tmp_path / "c.raw"), *reg_args, *other) == 0
    assert "building the file-system index of 3 of 3 layers" in capsys.readouterr().err


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
