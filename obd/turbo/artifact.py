"""The index artifact of a plain image: its meta layers in a registry, found by the tag fallback.

``obd index REF --push`` pushes one OCI 1.1 artifact manifest per plain image (docs/index.md):

* ``artifactType`` ``application/vnd.containerd.overlaybd.turbo.v1+json`` (turboOCI's referrer type),
  the empty config, and ``subject`` = the image manifest, so a registry with the referrers API lists
  it for the image;
* one layer per image layer: a gzip tar holding ``ext4.fs.meta``, an empty ``.turbo.ociv1`` and, for
  a gzip layer, ``gzip.meta`` — turboOCI's ``turboOCIv1.tar.gz`` — annotated as turboOCI annotates
  its layers (version ``0.1.0-turbo.ociv1``, ``turbo-oci/target-digest`` and ``target-media-type``).

Registries without the referrers API (Debian's docker-registry 2.8) are served by the OCI
distribution spec's *referrers tag schema*: an image index tagged ``sha256-<manifest hex>`` listing
the artifact, which :func:`push_index_artifact` creates or extends and :func:`fetch_index_artifact`
reads. That link is weak (anyone who can push a tag can replace it), so reading it is opt-in
(``--allow-referrers``); what is read is checked: the artifact's subject must be the image's
manifest digest, and each layer's target digest the image layer's, before anything is cached.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from obd.errors import FormatError
from obd.io.publish import publish_path
from obd.oci.model import ANNOTATION_PREFIX, TURBO_TARGET_DIGEST, VERSION, Image
from obd.registry.http import NotFoundError
from obd.registry.push import push_blob, push_manifest
from obd.registry.reference import Reference
from obd.turbo.build import GZIP_INDEX_NAME, META_NAME, ZSTD_INDEX_NAME
from obd.turbo.remote import MetaLayer, ensure_local_copies, ensure_meta, plan_meta, write_record
from obd.verify.index import fetch_listed_tables
from obd.verify.local import LocalTables
from obd.verify.pins import TablePin
from obd.verify.referrers import referrer_descriptors

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions

ARTIFACT_TYPE = "application/vnd.containerd.overlaybd.turbo.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest()
TURBO_VERSION = "0.1.0-turbo.ociv1"
TARGET_MEDIA_TYPE = ANNOTATION_PREFIX + "turbo-oci/target-media-type"
TURBO_MARKER = ".turbo.ociv1"
#: Largest meta-layer tar accepted from a registry.
MAX_META_BLOB = 1 << 30
TIMEOUT = 600.0
#: On an image index's manifest descriptor: the digest of the image's index artifact (strong link).
INDEX_DIGEST = "io.github.obd.turbo.index-digest"


def fallback_tag(manifest_digest: str) -> str:
    """The referrers tag schema's tag for a manifest digest: ``sha256-<hex>``."""
    alg, _, hexpart = manifest_digest.partition(":")
    return f"{alg}-{hexpart}"


def pack_meta(meta: MetaLayer) -> bytes:
    """turboOCI's ``turboOCIv1.tar.gz`` for one meta layer (fixed times, so the digest is stable)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        members = [(META_NAME, meta.meta.read_bytes()), (TURBO_MARKER, b"")]
        if meta.gzip_index is not None:  # gzip.meta, or obd's zstd.meta for a zstd layer
            members.append((meta.gzip_index.name, meta.gzip_index.read_bytes()))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


@dataclass(frozen=True)
class ArtifactPush:
    """What :func:`push_index_artifact` pushed."""

    digest: str
    tag: str
    layers: int
    bytes: int


async def push_index_artifact(
    client: Any,
    ref: Reference,
    image: Image,
    metas: list[MetaLayer],
    tables: Mapping[str, tuple[TablePin, bytes]] | None = None,
) -> ArtifactPush:
    """Push the artifact for ``image`` (meta layers already built) and link it with the tag fallback.
    ``tables`` (``{layer digest: (pin, table bytes)}``) are pushed too, each pinned by the annotations
    of its layer's meta descriptor (docs/verify.md)."""
    descs = []
    total = 0
    for m in metas:
        table = (tables or {}).get(m.digest)
        if table is not None:
            await push_blob(client, ref, table[0].digest, table[1])
        blob = pack_meta(m)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        await push_blob(client, ref, digest, blob)
        total += len(blob)
        descs.append(
            {
                "mediaType": LAYER_GZ,
                "digest": digest,
                "size": len(blob),
                "annotations": {
                    VERSION: TURBO_VERSION,
                    TURBO_TARGET_DIGEST: m.digest,
                    TARGET_MEDIA_TYPE: m.media_type,
                    **(table[0].annotations() if table is not None else {}),
                },
            }
        )
    await push_blob(client, ref, EMPTY_DIGEST, EMPTY_JSON)
    raw = await client.fetch_manifest(ref, image.manifest_digest)
    subject = {"mediaType": raw.media_type, "digest": image.manifest_digest, "size": len(raw.data)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_CONFIG, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": descs,
        "subject": subject,
    }
    data = json.dumps(manifest, separators=(",", ":")).encode()
    digest = await push_manifest(
        client, ref, data, OCI_MANIFEST, target="sha256:" + hashlib.sha256(data).hexdigest()
    )
    tag = fallback_tag(image.manifest_digest)
    try:
        current = (await client.fetch_manifest(ref, tag)).json()
        entries = [d for d in current.get("manifests", []) if d.get("artifactType") != ARTIFACT_TYPE]
    except NotFoundError:
        entries = []
    entries.append(
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data), "artifactType": ARTIFACT_TYPE}
    )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, separators=(",", ":")
    )
    await push_manifest(client, ref, index.encode(), OCI_INDEX, target=tag)
    return ArtifactPush(digest, tag, len(descs), total)


def _bad(ref: Reference, field: str, message: str, value: object = None) -> FormatError:
    return FormatError(f"index artifact: {message}", path=str(ref), field=field, value=value)


async def fetch_index_artifact(
    client: Any, ref: Reference, image: Image, opts: RemoteOptions
) -> list[MetaLayer] | None:
    """The meta layers of ``image`` from its index artifact (referrers API, else tag fallback),
    verified and cached; None if the registry has none. A malformed or mismatching artifact raises
    :class:`FormatError`."""
    found = await referrer_descriptors(client, ref, image.manifest_digest, ARTIFACT_TYPE)
    if not found:
        return None
    return await read_index_artifact(client, ref, image, opts, found[-1]["digest"])


async def read_index_artifact(
    client: Any, ref: Reference, image: Image, opts: RemoteOptions, digest: str
) -> list[MetaLayer]:
    """The meta layers of ``image`` from the index artifact ``digest`` (fetched by digest, so its
    bytes are checked), verified against the image and cached. Mismatches raise :class:`FormatError`."""
    manifest = (await client.fetch_manifest(ref, digest)).json()
    if manifest.get("artifactType") != ARTIFACT_TYPE:
        raise _bad(ref, "artifactType", "not an obd index artifact", manifest.get("artifactType"))
    if manifest.get("subject", {}).get("digest") != image.manifest_digest:
        raise _bad(
            ref, "subject.digest", "refers to another image", manifest.get("subject", {}).get("digest")
        )
    metas = plan_meta(image, opts.cache_dir)
    layers = manifest.get("layers") or []
    if len(layers) != len(metas):
        raise _bad(ref, "layers", f"{len(layers)} meta layers for {len(metas)} image layers", len(layers))
    todo = []
    for i, (d, m) in enumerate(zip(layers, metas, strict=True)):
        target = (d.get("annotations") or {}).get(TURBO_TARGET_DIGEST)
        if target != m.digest:
            raise _bad(ref, f"layers[{i}].annotations", "target digest is not the image layer's", target)
        if m.valid():
            continue
        if not isinstance(d.get("size"), int) or d["size"] > MAX_META_BLOB:
            raise _bad(ref, f"layers[{i}].size", "meta layer too large", d.get("size"))
        todo.append((i, d, m))
    # every meta layer and digest table at once: one round trip for all, not one per layer
    blobs = asyncio.gather(*(client.get_blob(ref, d["digest"], max_bytes=MAX_META_BLOB) for _, d, _ in todo))
    tables = fetch_listed_tables(client, ref, layers, image, LocalTables(opts.cache_dir))  # docs/verify.md
    got, _ = await asyncio.gather(blobs, tables)
    for (i, d, m), blob in zip(todo, got, strict=True):
        _unpack(ref, i, blob, m, d["digest"])
    return metas


def _unpack(ref: Reference, i: int, blob: bytes, m: MetaLayer, digest: str) -> None:
    """Unpack one ``turboOCIv1.tar.gz`` into the meta cache (only the known member names)."""
    m.directory.parent.mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix="fetch-", dir=m.directory.parent)
    try:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            names = set()
            for member in tar.getmembers():
                known = (META_NAME, GZIP_INDEX_NAME, ZSTD_INDEX_NAME, TURBO_MARKER)
                if member.name not in known or not member.isfile():
                    raise _bad(ref, f"layers[{i}]", "unexpected member in the meta layer tar", member.name)
                src = tar.extractfile(member)
                assert src is not None
                with open(os.path.join(out, member.name), "wb") as f:
                    shutil.copyfileobj(src, f)
                names.add(member.name)
        if META_NAME not in names or (m.media_type.endswith("gzip") != (GZIP_INDEX_NAME in names)):
            raise _bad(ref, f"layers[{i}]", "meta layer tar lacks ext4.fs.meta, or its gzip.meta is wrong")
        if TURBO_MARKER in names:
            os.unlink(os.path.join(out, TURBO_MARKER))
        if ZSTD_INDEX_NAME in names and not m.media_type.endswith("zstd"):
            raise _bad(ref, f"layers[{i}]", "zstd.meta for a layer that is not zstd")
        record = {
            "layer": {"digest": m.digest, "size": m.size, "mediaType": m.media_type},
            "artifact": digest,
        }
        write_record(out, record)
        if m.directory.exists():
            shutil.rmtree(out)
        else:
            publish_path(out, m.directory)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


async def push_link(client: Any, ref: Reference, image: Image, artifact: str, tag: str) -> str:
    """Push, at ``tag`` of ``ref``'s repository, an image index holding the image's manifest
    descriptor annotated with the index artifact's digest (:data:`INDEX_DIGEST`, as SOCI index
    manifest v2 links its index): pulling that index by digest pins the image and its index both.
    Returns the index's digest."""
    raw = await client.fetch_manifest(ref, image.manifest_digest)
    cfg = image.config
    platform = {"architecture": cfg.get("architecture", "amd64"), "os": cfg.get("os", "linux")}
    if cfg.get("variant"):
        platform["variant"] = cfg["variant"]
    desc = {
        "mediaType": raw.media_type,
        "digest": image.manifest_digest,
        "size": len(raw.data),
        "platform": platform,
        "annotations": {INDEX_DIGEST: artifact},
    }
    data = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}, separators=(",", ":")
    ).encode()
    return str(await push_manifest(client, ref, data, OCI_INDEX, target=tag))


def linked_artifact(ref: Reference, image: Image) -> str | None:
    """The index artifact digest that the image index ``ref`` names (tag or digest, as the user
    gave it) carries on its descriptor of ``image``'s manifest; None if ``ref`` is no such index.
    The index is the one ``image`` was resolved from (:attr:`~obd.oci.model.Image.index`)."""
    if ref.target == image.manifest_digest:
        return None
    top = image.index  # kept from resolving ``ref``: no second request for the same index
    if not isinstance(top, dict) or not isinstance(top.get("manifests"), list):
        return None
    for i, d in enumerate(top["manifests"]):
        if isinstance(d, dict) and d.get("digest") == image.manifest_digest:
            value = (d.get("annotations") or {}).get(INDEX_DIGEST)
            if value is None:
                return None
            if not isinstance(value, str) or not value.startswith("sha256:") or len(value) != 71:
                raise _bad(ref, f"manifests[{i}].annotations.{INDEX_DIGEST}", "not a sha256 digest", value)
            return value
    return None


def image_metas(ref: Reference, image: Image, opts: RemoteOptions) -> list[MetaLayer]:
    """The meta layers of a plain image: from the cache (re-checked against its records); else from
    the index artifact the image index ``ref`` links strongly (:func:`linked_artifact`); else, with
    ``opts.allow_referrers``, from the one the tag fallback names (a weak link); else built now by
    streaming the layers (:func:`ensure_meta`). A zstd layer without seek points also gets its
    local copy (:func:`~obd.turbo.remote.ensure_local_copies`)."""
    metas = plan_meta(image, opts.cache_dir)
    if not all(m.valid() for m in metas):
        client = opts.client(ref.api_host if opts.is_http(ref.api_host) else None)
        link = linked_artifact(ref, image)
        fetched = None
        if link is not None:
            fetched = opts.runner.run(read_index_artifact(client, ref, image, opts, link), TIMEOUT)
        elif opts.allow_referrers:
            fetched = opts.runner.run(fetch_index_artifact(client, ref, image, opts), TIMEOUT)
        metas = fetched if fetched is not None else ensure_meta(ref, image, opts)
    ensure_local_copies(ref, metas, opts)
    return metas


__all__ = [
    "ARTIFACT_TYPE",
    "INDEX_DIGEST",
    "ArtifactPush",
    "fallback_tag",
    "fetch_index_artifact",
    "image_metas",
    "linked_artifact",
    "pack_meta",
    "push_index_artifact",
    "push_link",
    "read_index_artifact",
]
