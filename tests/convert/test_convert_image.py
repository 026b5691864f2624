"""``obd convert`` end to end: the ACI hello-world layout, a multi-layer image built here (OCI layout,
docker-archive and registry sources), pushing to a real registry and reading the result back lazily,
the conversion cache, manifests and configs as the convertor writes them, and refusals."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from ext4tree import compare_trees, e2fsck_clean, read_file, read_tree
from registry_server import RegistryServer
from test_convert_ext4 import LAYERS, Model
from test_convert_tar import make_tar, member

from fixtures import FIXTURES, REPO, require_tool
from obd.cli import main
from obd.convert import ConvertOptions, HostileTarError, chain_ids, convert_image
from obd.errors import FormatError, UnsupportedError
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config
from obd.image.resolve import image_config
from obd.layer.baselayer import BASE_BLOB_DIGEST
from obd.layer.export import export_stack
from obd.observability.stats import Stats
from obd.oci.layout import OCILayout
from obd.oci.model import BLOB_DIGEST, BLOB_SIZE, VERSION
from obd.registry.client import RegistryClient
from obd.verify.pins import TablePin

HELLO = FIXTURES / "aci-hello-world"
#: accelerated-container-image's ExpectedOverlaybdBaseLayerDigest (cmd/convertor testing resources)
ACI_BASE_LAYER = "sha256:a8b5fca80efae55088290f3da8110d7742de55c2a378d5ab53226a483f390e21"
F2_UUID = "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


@pytest.fixture(autouse=True)
def _tools():
    require_tool("debugfs")
    require_tool("e2fsck")


def blob(root: Path, digest: str) -> bytes:
    return (root / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def converted_tree(tmp_path: Path, ref: str, *, remote: RemoteOptions | None = None) -> tuple[Path, list]:
    """Export the overlaybd image ``ref`` (oci:… or a registry reference) and read its tree."""
    stack = open_config(image_config([ref], remote=remote), readonly=True, remote=remote)
    out = tmp_path / f"export-{abs(hash(ref))}.img"
    try:
        export_stack(stack, str(out))
    finally:
        stack.close()
    return out, read_tree(out)


def options(tmp_path: Path, **kw: Any) -> ConvertOptions:
    return ConvertOptions(cache_dir=str(tmp_path / "cache"), **kw)


# -- the ACI hello-world layout ---------------------------------------------------------------------


def test_hello_world_converts_like_the_convertor(tmp_path):
    out = tmp_path / "out"
    res = convert_image(f"oci:{HELLO}:amd64", f"oci:{out}:hw", options(tmp_path, oci=True))
    src_manifest = json.loads(
        blob(HELLO, "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3")
    )
    src_layer = blob(HELLO, src_manifest["layers"][0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(src_layer))) as tar:
        hello = tar.extractfile("hello").read()

    image, tree = converted_tree(tmp_path, f"oci:{out}:hw")
    assert read_file(image, "/hello") == hello
    assert [r["path"] for r in tree] == ["/hello"]
    assert e2fsck_clean(image)[0]

    # the layout as ACI's convertor writes it (fixture amd64-converted is its --mkfs output)
    aci = json.loads(blob(HELLO, "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"))
    manifest = json.loads(blob(out, res.manifest_digest))
    assert manifest == res.manifest
    assert (
        manifest["mediaType"] == aci["mediaType"]
        and manifest["config"]["mediaType"] == aci["config"]["mediaType"]
    )
    aci_keys = {k for layer in aci["layers"] for k in layer["annotations"]}
    for layer in manifest["layers"]:
        # plus the digest-table pins (docs/verify.md), outside containerd's snapshot label namespace
        pin = TablePin.from_annotations(layer["annotations"], path=out, field="layers")
        assert pin is not None
        ours = set(layer["annotations"]) - set(pin.annotations())
        assert ours == aci_keys == {BLOB_DIGEST, BLOB_SIZE, VERSION}
        assert layer["mediaType"] == OCI_TAR == aci["layers"][0]["mediaType"]
        assert layer["annotations"][BLOB_DIGEST] == layer["digest"]
        assert layer["annotations"][BLOB_SIZE] == str(layer["size"])
        assert layer["annotations"][VERSION] == "0.1.0"
        data = blob(out, layer["digest"])
        assert len(data) == layer["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
    # the base layer first, exactly the blob the convertor pushes; then one layer per source layer
    assert manifest["layers"][0]["digest"] == ACI_BASE_LAYER and manifest["layers"][0]["size"] == 4739584
    assert len(manifest["layers"]) == 2
    # config: diff_ids are the layer digests, the rest (history included) is the source's
    config = json.loads(blob(out, manifest["config"]["digest"]))
    src_config = json.loads(blob(HELLO, src_manifest["config"]["digest"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [x["digest"] for x in manifest["layers"]]}
    assert config["history"] == src_config["history"]
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in src_config.items() if k != "rootfs"
    }
    # the uuid comes from the chain id, as in ACI's converted layer (docs/formats.md F2)
    assert res.layers[1].uuid.upper() == F2_UUID
    assert chain_ids(src_config["rootfs"]["diff_ids"])[0] == src_config["rootfs"]["diff_ids"][0]
    from obd.image.local import open_layer

    sealed = open_layer(res.layers[1].path)
    assert (
        sealed.header.uuid == F2_UUID and sealed.header.parent_uuid == "00000000-0000-0000-0000-000000000000"
    )
    sealed.close()


def test_hello_world_mkfs_and_docker_media_types(tmp_path):
    out = tmp_path / "out"
    res = convert_image(f"oci:{HELLO}:amd64", f"oci:{out}", options(tmp_path, mkfs=True, vsize_gb=8))
    manifest = res.manifest
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert [x["mediaType"] for x in manifest["layers"]] == [DOCKER_TAR]  # no base layer with --mkfs
    image, tree = converted_tree(tmp_path, f"oci:{out}")
    assert [r["path"] for r in tree] == ["/hello"]
    assert image.stat().st_size == 8 << 30
    assert OCILayout(out).tags() == []  # untagged, as asked


# -- a multi-layer image built here -----------------------------------------------------------------


def oci_layout(root: Path, layers: list[bytes], *, compressions: list[str], tag: str = "1") -> list[str]:
    """Write an OCI layout of uncompressed tars ``layers`` (stored gzip/zstd/plain); their diff_ids."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    descs, diff_ids = [], []
    for data, comp in zip(layers, compressions, strict=True):
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
        stored = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}.get(comp, bytes)(data)
        media = "application/vnd.oci.image.layer.v1.tar" + {"gzip": "+gzip", "zstd": "+zstd"}.get(comp, "")
        descs.append({"mediaType": media, "digest": put(stored), "size": len(stored)})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"step {i}"} for i in range(len(layers))] + [{"empty_layer": True}],
    }
    cfg = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(cfg),
            "size": len(cfg),
        },
        "layers": descs,
        "annotations": {"org.example.note": "kept"},
    }
    m = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": put(m),
                "size": len(m),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return diff_ids


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> tuple[Path, Model, list[bytes]]:
    """An OCI layout ``oci:<dir>:1`` of the three LAYERS tars, and the model of its tree."""
    root = tmp_path_factory.mktemp("app")
    tars = [make_tar(members) for members in LAYERS]
    oci_layout(root, tars, compressions=["gzip", "zstd", "none"])
    model = Model()
    for members in LAYERS:
        model.apply(members)
    return root, model, tars


def test_multi_layer_layout_converts_and_caches(tmp_path, app):
    root, model, _ = app
    out = tmp_path / "out"
    first = convert_image(f"oci:{root}:1", f"oci:{out}:obd", options(tmp_path, oci=True))
    assert [x.cached for x in first.layers] == [True, False, False, False]  # base layer, then converted
    image, tree = converted_tree(tmp_path, f"oci:{out}:obd")
    assert compare_trees(tree, model.tree(), ignore=("ino", "xattrs")) == []
    assert e2fsck_clean(image)[0]
    assert first.manifest["annotations"] == {"org.example.note": "kept"}
    config = json.loads(blob(out, first.manifest["config"]["digest"]))
    assert len(config["history"]) == 4 and config["config"]["Cmd"] == ["/bin/sh"]
    # uuids chain up
    from obd.image.local import open_layer

    uuids = []
    for layer in first.layers[1:]:
        sealed = open_layer(layer.path)
        uuids.append((sealed.header.uuid, sealed.header.parent_uuid))
        sealed.close()
    assert uuids[1][1] == uuids[0][0] and uuids[2][1] == uuids[1][0]

    # a second conversion comes from the cache without reading a single source layer
    for p in (root / "blobs" / "sha256").iterdir():
        p.chmod(0)
    try:
        second = convert_image(f"oci:{root}:1", f"oci:{out}:again", options(tmp_path, oci=True))
    finally:
        for p in (root / "blobs" / "sha256").iterdir():
            p.chmod(0o644)
    assert all(x.cached for x in second.layers) and second.download_bytes == 0
    assert second.manifest_digest == first.manifest_digest

    # an image sharing the first two layers converts only its third
    other = tmp_path / "other"
    tars = [make_tar(LAYERS[0]), make_tar(LAYERS[1]), make_tar([member("only-here", data=b"!")])]
    oci_layout(other, tars, compressions=["none", "none", "none"])
    third = convert_image(f"oci:{other}:1", f"oci:{out}:other", options(tmp_path, oci=True))
    assert [x.cached for x in third.layers] == [True, True, True, False]
    assert [x.digest for x in third.layers[:3]] == [x.digest for x in first.layers[:3]]
    m = Model()
    for members in (*LAYERS[:2], [member("only-here", data=b"!")]):
        m.apply(members)
    assert (
        compare_trees(converted_tree(tmp_path, f"oci:{out}:other")[1], m.tree(), ignore=("ino", "xattrs"))
        == []
    )


def docker_archive(path: Path, tars: list[bytes], *, modern: bool = False, tag: str = "app:1") -> None:
    """A ``docker save`` tarball: classic (``<id>/layer.tar``) or Docker 25's (blobs + symlinks)."""
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    files: list[tuple[str, bytes | str]] = []
    names = []
    for i, data in enumerate(tars):
        h = hashlib.sha256(data).hexdigest()
        if modern:
            files.append((f"blobs/sha256/{h}", data))
            files.append((f"layer{i}/layer.tar", f"../blobs/sha256/{h}"))  # a symlink
            names.append(f"layer{i}/layer.tar")
        else:
            files.append((f"{h}/layer.tar", data))
            names.append(f"{h}/layer.tar")
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    files.append((cfg_name, config))
    files.append(
        ("manifest.json", json.dumps([{"Config": cfg_name, "RepoTags": [tag], "Layers": names}]).encode())
    )
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("modern", [False, True])
def test_docker_archive_source(tmp_path, app, modern):
    _, model, tars = app
    archive = tmp_path / "app.tar"
    docker_archive(archive, tars, modern=modern)
    out = tmp_path / "out"
    convert_image(f"docker-archive:{archive}:app:1", f"oci:{out}:x", options(tmp_path))
    assert (
        compare_trees(converted_tree(tmp_path, f"oci:{out}:x")[1], model.tree(), ignore=("ino", "xattrs"))
        == []
    )


# -- registries --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory, app):
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    root = app[0]
    assert main(["push", f"oci:{root}:1", f"{reg.host}/src/app:1", "--insecure-registry", reg.host]) == 0
    yield reg
    reg.stop()


def test_registry_to_registry_and_lazy_read_back(tmp_path, app, registry, monkeypatch):
    _, model, _ = app
    host = registry.host
    remote = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "blockcache"), stats=Stats())
    res = convert_image(f"docker://{host}/src/app:1", f"{host}/src/app:obd", options(tmp_path), remote=remote)
    assert res.download_bytes == sum(
        x["size"]
        for x in json.loads(
            blob(app[0], json.loads((app[0] / "index.json").read_text())["manifests"][0]["digest"])
        )["layers"]
    )
    assert sorted(res.pushed.uploaded) == sorted(
        {x.digest for x in res.layers}
        | {x.table.digest for x in res.layers if x.table}  # digest tables, docs/verify.md
        | {res.manifest["config"]["digest"]}
    )

    # read back lazily: opening the image fetches indexes, not layers
    read_from: set[str] = set()
    real_read_range = RegistryClient.read_range

    async def read_range(client, ref, digest, offset, length, **kw):
        read_from.add(digest)
        return await real_read_range(client, ref, digest, offset, length, **kw)

    monkeypatch.setattr(RegistryClient, "read_range", read_range)
    reader = RemoteOptions(insecure=(host,), cache_dir=str(tmp_path / "readcache"), stats=Stats())
    cfg = registry_config(f"{host}/src/app:obd", reader)
    stack = open_config(cfg, readonly=True, remote=reader)
    try:
        opened = reader.stats["bytes_fetched"]
        assert opened < sum(x.size for x in res.layers) // 2
        out = tmp_path / "remote.img"
        export_stack(stack, str(out))
    finally:
        stack.close()
    assert compare_trees(read_tree(out), model.tree(), ignore=("ino", "xattrs")) == []
    # the base layer, the convertor's first layer, came from obd's packaged copy: not one range of it
    assert res.manifest["layers"][0]["digest"] == BASE_BLOB_DIGEST
    assert BASE_BLOB_DIGEST not in read_from
    assert {x["digest"] for x in res.manifest["layers"][1:]} <= read_from
    assert e2fsck_clean(out)[0]

    # the same image into another repository: all from the conversion cache, blobs mounted
    again = convert_image(
        f"docker://{host}/src/app:1", f"{host}/other/app:obd", options(tmp_path), remote=remote
    )
    assert again.download_bytes == 0 and all(x.cached for x in again.layers)
    assert again.manifest_digest == res.manifest_digest
    tables = {x.table.digest for x in res.layers if x.table}  # digest tables, docs/verify.md
    blobs = {x.digest for x in res.layers} | {res.manifest["config"]["digest"]}
    assert set(again.pushed.mounted) == blobs | tables
    # and once more: the registry has every blob (HEAD), nothing goes up
    third = convert_image(
        f"docker://{host}/src/app:1", f"{host}/other/app:obd2", options(tmp_path), remote=remote
    )
    assert third.pushed.uploaded == [] and third.pushed.mounted == []


def test_cli_convert_push_and_errors(tmp_path, app, registry, capsys):
    root = app[0]
    host = registry.host
    args = ["--cache-dir", str(tmp_path / "cache"), "--insecure-registry", host, "-q"]
    assert (
        main(
            [
                "convert",
                f"oci:{root}:1",
                f"docker://{host}/cli/app:obd",
                "--oci",
                "--algorithm",
                "zstd",
                "--bs",
                "16",
                *args,
            ]
        )
        == 0
    )
    digest = capsys.readouterr().out.strip()
    assert digest.startswith("sha256:")
    image = tmp_path / "cli.img"
    assert main(["export", f"{host}/cli/app:obd", "-o", str(image), *args]) == 0
    assert len(read_file(image, "/usr/bin/tool-link")) == 70000
    # bad options and hostile layers: one line on stderr, exit 1
    assert main(["convert", f"oci:{root}:1", f"oci:{tmp_path / 'x'}", "--vsize", "8", *args]) == 1
    assert "--vsize needs --mkfs" in capsys.readouterr().err
    bad = tmp_path / "bad"
    oci_layout(
        bad, [make_tar([member("../../etc/cron.d/evil", data=b"* * * * * root sh")])], compressions=["gzip"]
    )
    assert main(["convert", f"oci:{bad}:1", f"oci:{tmp_path / 'bad-out'}", *args]) == 1
    err = capsys.readouterr().err
    assert "climbs out of the image root" in err and "../../etc/cron.d/evil" in err


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "error", "text"),
    [
        ([member("/abs", data=b"x")], HostileTarError, "absolute path"),
        ([member("a", "hardlink", link="../../x")], HostileTarError, "climbs out"),
        ([member("s", "symlink", link="/"), member("s/x", data=b"1")], FormatError, "parent /s is a symlink"),
    ],
)
def test_hostile_layers_fail_and_write_nothing(tmp_path, members, error, text):
    src = tmp_path / "src"
    oci_layout(src, [make_tar(members)], compressions=["gzip"])
    out = tmp_path / "out"
    with pytest.raises(error, match=text):
        convert_image(f"oci:{src}:1", f"oci:{out}", options(tmp_path))
    assert not out.exists()


def test_a_layer_that_is_not_what_the_config_says(tmp_path):
    src = tmp_path / "src"
    oci_layout(src, [make_tar([member("a", data=b"1")])], compressions=["none"])
    cfg_desc = json.loads(blob(src, json.loads((src / "index.json").read_text())["manifests"][0]["digest"]))[
        "config"
    ]
    path = src / "blobs" / "sha256" / cfg_desc["digest"].split(":")[1]
    config = json.loads(path.read_text())
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    # rewrite config and manifest consistently: only the diff_id lies
    oci_layout_with_config(src, config)
    with pytest.raises(FormatError, match="unpacks to sha256:"):
        convert_image(f"oci:{src}:1", f"oci:{tmp_path / 'out'}", options(tmp_path))


def oci_layout_with_config(root: Path, config: dict[str, Any]) -> None:
    index = json.loads((root / "index.json").read_text())
    manifest = json.loads(blob(root, index["manifests"][0]["digest"]))
    cfg = json.dumps(config).encode()
    (root / "blobs" / "sha256" / hashlib.sha256(cfg).hexdigest()).write_bytes(cfg)
    manifest["config"] = {
        **manifest["config"],
        "digest": "sha256:" + hashlib.sha256(cfg).hexdigest(),
        "size": len(cfg),
    }
    m = json.dumps(manifest).encode()
    (root / "blobs" / "sha256" / hashlib.sha256(m).hexdigest()).write_bytes(m)
    index["manifests"][0].update(digest="sha256:" + hashlib.sha256(m).hexdigest(), size=len(m))
    (root / "index.json").write_text(json.dumps(index))


def test_already_converted_images_and_unsupported_options(tmp_path):
    with pytest.raises(UnsupportedError, match="already an overlaybd image"):
        convert_image(f"oci:{HELLO}:amd64-converted", f"oci:{tmp_path / 'o'}", options(tmp_path))
    with pytest.raises(UnsupportedError, match="only ext4"):
        convert_image(f"oci:{HELLO}:amd64", f"oci:{tmp_path / 'o'}", options(tmp_path, fstype="erofs"))
    with pytest.raises(UnsupportedError, match="source only"):
        convert_image(f"oci:{HELLO}:amd64", f"docker-archive:{tmp_path / 'x.tar'}", options(tmp_path))


# -- a real distribution ------------------------------------------------------------------------------


def _members_of(data: bytes) -> list[dict[str, Any]]:
    kinds = {
        tarfile.REGTYPE: "file",
        tarfile.AREGTYPE: "file",
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.CHRTYPE: "chr",
        tarfile.BLKTYPE: "blk",
        tarfile.FIFOTYPE: "fifo",
    }
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            out.append(
                member(
                    m.name,
                    kinds[m.type],
                    f.read() if f else b"",
                    mode=m.mode & 0o7777,
                    uid=m.uid,
                    gid=m.gid,
                    link=m.linkname,
                    major=m.devmajor,
                    minor=m.devminor,
                )
            )
    return out


@pytest.mark.slow
def test_debian_python_image_converts_to_the_right_tree(tmp_path):
    """The benchmark image (debootstrap minbase + python3, 5 layers, whiteouts): every file right."""
    require_tool("root")
    require_tool("debootstrap")
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from images import debian_python_layout

    layout = debian_python_layout()
    out = tmp_path / "out"
    res = convert_image(f"oci:{layout}:latest", f"oci:{out}:obd", options(tmp_path))
    manifest = json.loads(
        blob(layout, json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])
    )
    model = Model()
    for layer in manifest["layers"]:
        model.apply(_members_of(gzip.decompress(blob(layout, layer["digest"]))))
    image, tree = converted_tree(tmp_path, f"oci:{out}:obd")
    assert compare_trees(tree, model.tree(), ignore=("ino", "xattrs")) == []
    clean, report = e2fsck_clean(image)
    assert clean, report
    assert len(res.layers) == len(manifest["layers"]) + 1
