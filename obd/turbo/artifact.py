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
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from obd.errors import ConfigError, FormatError, ObdError
from obd.io.publish import publish_path
from obd.io.source import BytesSource
from obd.oci.model import ANNOTATION_PREFIX, TURBO_TARGET_DIGEST, VERSION, Image, config_platform
from obd.registry.http import NotFoundError
from obd.registry.push import push_blob, push_manifest
from obd.registry.reference import Reference
from obd.turbo.build import GZIP_INDEX_NAME, META_NAME, ZSTD_INDEX_NAME
from obd.turbo.parts import BLOCK_SIZE as PART_BLOCK_SIZE
from obd.turbo.parts import MAX_PART, IndexParts
from obd.turbo.remote import (
    GZIP_LAYER_TYPES,
    REMOTE_INDEX,
    MetaLayer,
    ensure_local_copies,
    ensure_meta,
    plan_meta,
    write_record,
)
from obd.verify.format import DigestTable, build_table
from obd.verify.index import fetch_listed_tables
from obd.verify.local import LocalTables
from obd.verify.pins import TablePin
from obd.verify.referrers import referrer_descriptors

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions

log = logging.getLogger(__name__)

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


def pack_meta(meta: MetaLayer, gzip_index: bytes | None = None) -> bytes:
    """turboOCI's ``turboOCIv1.tar.gz`` for one meta layer (fixed times, so the digest is stable).
    ``gzip_index``: the layer's ``gzip.meta`` when the cache does not hold it (read by ranges)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        members = [(META_NAME, meta.meta.read_bytes()), (TURBO_MARKER, b"")]
        if gzip_index is not None:
            members.append((GZIP_INDEX_NAME, gzip_index))
        elif meta.gzip_index is not None:  # gzip.meta, or obd's zstd.meta for a zstd layer
            members.append((meta.gzip_index.name, meta.gzip_index.read_bytes()))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


async def _gzip_index_bytes(client: Any, ref: Reference, meta: MetaLayer) -> bytes | None:
    """A gzip layer's ``gzip.meta``: the cached file, else (read by ranges until now) the whole blob
    from ``ref``'s repository, digest checked; None for other layers."""
    if meta.media_type not in GZIP_LAYER_TYPES:
        return None
    if meta.gzip_index is not None:
        return meta.gzip_index.read_bytes()
    remote = meta.remote_index
    if remote is None:
        raise FormatError("cached meta layer of a gzip layer has no gzip.meta", path=str(meta.directory))
    return bytes(await client.get_blob(ref, remote[0], max_bytes=MAX_PART))


async def _push_parts(client: Any, ref: Reference, meta: MetaLayer, index: bytes) -> IndexParts:
    """Push a gzip layer's ``ext4.fs.meta`` (gzip) and ``gzip.meta`` (raw, with its digest table)
    as blobs of their own (:mod:`obd.turbo.parts`)."""
    packed = gzip.compress(meta.meta.read_bytes(), mtime=0)
    table, index_digest = build_table(BytesSource(index).readinto, len(index), PART_BLOCK_SIZE)
    pin = TablePin("sha256:" + hashlib.sha256(table).hexdigest(), len(table), PART_BLOCK_SIZE)
    meta_digest = "sha256:" + hashlib.sha256(packed).hexdigest()
    await asyncio.gather(
        push_blob(client, ref, meta_digest, packed),
        push_blob(client, ref, index_digest, index),
        push_blob(client, ref, pin.digest, table),
    )
    return IndexParts((meta_digest, len(packed)), (index_digest, len(index)), pin)


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
        gz_index = await _gzip_index_bytes(client, ref, m)
        blob = pack_meta(m, gz_index)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        await push_blob(client, ref, digest, blob)
        total += len(blob)
        parts = await _push_parts(client, ref, m, gz_index) if gz_index is not None else None
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
                    **(parts.annotations() if parts is not None else {}),
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
    local = LocalTables(opts.cache_dir)
    todo = []
    for i, (d, m) in enumerate(zip(layers, metas, strict=True)):
        ann = d.get("annotations") or {}
        target = ann.get(TURBO_TARGET_DIGEST)
        if target != m.digest:
            raise _bad(ref, f"layers[{i}].annotations", "target digest is not the image layer's", target)
        if m.valid():
            continue
        if not isinstance(d.get("size"), int) or d["size"] > MAX_META_BLOB:
            raise _bad(ref, f"layers[{i}].size", "meta layer too large", d.get("size"))
        parts = IndexParts.from_annotations(ann, path=str(ref), field=f"layers[{i}]")
        todo.append((i, d, m, parts if m.media_type in GZIP_LAYER_TYPES else None))

    async def fetch(i: int, d: dict[str, Any], m: MetaLayer, parts: IndexParts | None) -> None:
        if parts is not None:
            try:
                packed, table = await asyncio.gather(
                    client.get_blob(ref, parts.meta[0], max_bytes=parts.meta[1]),
                    client.get_blob(ref, parts.table.digest, max_bytes=parts.table.size),
                )
            except NotFoundError as e:  # collected by a registry that keeps only what layers name
                log.warning("index artifact %s: %s; reading its turboOCI meta layer instead", digest, e)
            else:
                _unpack_parts(ref, i, packed, table, m, parts, digest, local)
                return
        _unpack(ref, i, await client.get_blob(ref, d["digest"], max_bytes=MAX_META_BLOB), m, digest)

    # every meta layer and digest table at once: one round trip for all, not one per layer
    tables = fetch_listed_tables(client, ref, layers, image, local)  # docs/verify.md
    await asyncio.gather(tables, *(fetch(*job) for job in todo))
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
        _publish_meta(out, m, digest)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _publish_meta(out: str, m: MetaLayer, artifact: str, extra: Mapping[str, object] | None = None) -> None:
    """Record the meta directory ``out`` unpacked from ``artifact`` and move it into place (a
    concurrent fetch that got there first wins; ``out`` is then dropped)."""
    record = {
        "layer": {"digest": m.digest, "size": m.size, "mediaType": m.media_type},
        "artifact": artifact,
        **(extra or {}),
    }
    write_record(out, record)
    if m.directory.exists():
        shutil.rmtree(out)
    else:
        publish_path(out, m.directory)


def _unpack_parts(
    ref: Reference,
    i: int,
    packed: bytes,
    table: bytes,
    m: MetaLayer,
    parts: IndexParts,
    digest: str,
    local: LocalTables,
) -> None:
    """Cache one gzip layer's meta from the artifact's own parts: ``ext4.fs.meta`` unpacked here,
    ``gzip.meta`` left in the registry (read by ranges) with its digest table kept."""
    try:
        kept = local.put(parts.index[0], table, parts.table.block_size)
    except ObdError as e:
        raise _bad(ref, f"layers[{i}].annotations", f"the gzip index's digest table: {e}") from e
    if DigestTable(table).blob_size != parts.index[1] or kept.digest != parts.table.digest:
        raise _bad(ref, f"layers[{i}].annotations", "the digest table does not cover the gzip index")
    unpacker = zlib.decompressobj(31)
    try:
        meta = unpacker.decompress(packed, MAX_META_BLOB + 1)
    except zlib.error as e:
        raise _bad(ref, f"layers[{i}].annotations", f"ext4.fs.meta blob is not gzip: {e}") from e
    if not unpacker.eof or len(meta) > MAX_META_BLOB or unpacker.unused_data:
        why = "ext4.fs.meta blob is truncated, too large or followed by data"
        raise _bad(ref, f"layers[{i}].annotations", why)
    m.directory.parent.mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix="fetch-", dir=m.directory.parent)
    try:
        with open(os.path.join(out, META_NAME), "wb") as f:
            f.write(meta)
        _publish_meta(out, m, digest, {REMOTE_INDEX: {"digest": parts.index[0], "size": parts.index[1]}})
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


async def push_link(client: Any, ref: Reference, image: Image, artifacts: Mapping[str, str], tag: str) -> str:
    """Push, at ``tag`` of ``ref``'s repository, an image index whose manifest descriptors carry
    their index artifact's digest (:data:`INDEX_DIGEST`, as SOCI index manifest v2 links its index):
    pulling that index by digest pins each image and its index both. ``artifacts`` maps a manifest
    digest to its artifact's. When ``image`` was picked from a multi-platform index, the link keeps
    every descriptor of that index, annotating those in ``artifacts``: a platform left unindexed
    still runs from the link (its index built on first use). Returns the index's digest."""
    top = image.index if isinstance(image.index, dict) else None
    if top is not None and isinstance(top.get("manifests"), list):
        descs = [dict(d) for d in top["manifests"] if isinstance(d, dict)]
    else:
        raw = await client.fetch_manifest(ref, image.manifest_digest)
        descs = [{"mediaType": raw.media_type, "digest": image.manifest_digest, "size": len(raw.data)}]
        descs[0]["platform"] = config_platform(image.config)
    listed = {d.get("digest") for d in descs}
    for digest in artifacts:
        if digest not in listed:
            raise ConfigError(f"{digest} is not a manifest of the image index", path=str(ref))
    for d in descs:
        if d.get("digest") in artifacts:
            d["annotations"] = {**(d.get("annotations") or {}), INDEX_DIGEST: artifacts[d["digest"]]}
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs}
    if top is not None and isinstance(top.get("annotations"), dict):
        doc["annotations"] = top["annotations"]
    data = json.dumps(doc, separators=(",", ":")).encode()
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
