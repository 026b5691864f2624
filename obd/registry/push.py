"""Pushing images to a registry: an OCI image layout (``oci:DIR[:TAG]``) or single blobs + a manifest.

Blobs go up byte for byte — an overlaybd layer is never recompressed or rewrapped, and manifests are
sent exactly as stored, so digests and layer annotations (``containerd.io/snapshot/overlaybd/*``)
arrive unchanged. A blob the repository already has (HEAD) is skipped; with ``mount_from`` the
registry is first asked to mount it from another repository of the same registry. Child manifests
of an index are pushed by digest before the index; the top manifest is tagged with the
destination's tag.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from obd.errors import ConfigError, FormatError
from obd.oci.layout import OCILayout
from obd.oci.layout import parse_oci_reference as _parse_oci
from obd.oci.model import (
    INDEX_TYPES,
    REF_NAME,
    Descriptor,
)
from obd.registry.client import RegistryClient
from obd.registry.manifests import OCI_INDEX, OCI_MANIFEST
from obd.registry.reference import Reference, parse_reference
from obd.verify.pins import table_descriptors

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class PushResult:
    """What a push did: the top manifest's digest and each blob's fate."""

    reference: str
    digest: str
    media_type: str
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)


async def push_blob(
    client: RegistryClient,
    dest: Reference | str,
    digest: str,
    data: bytes | str | os.PathLike[str],
    *,
    mount_from: str | None = None,
) -> str:
    """Push one blob unless the repository has it: ``"exists"``, ``"mounted"`` or ``"uploaded"``."""
    if await client.blob_exists(dest, digest, push=True):
        return "exists"
    return await client.put_blob(dest, digest, data, mount_from=mount_from)


async def push_manifest(
    client: RegistryClient,
    dest: Reference | str,
    data: bytes,
    media_type: str | None = None,
    *,
    target: str | None = None,
) -> str:
    """PUT a manifest (bytes as given) with its media type (read from it when not given); its digest."""
    if media_type is None:
        media_type = _media_type_of(data, None)
    return await client.put_manifest(dest, data, media_type, target=target)


def _media_type_of(data: bytes, fallback: str | None) -> str:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise FormatError(f"manifest is not valid JSON: {e}") from None
    media = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(media, str) and media:
        return media
    if fallback:
        return fallback
    return OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST


class _LayoutPusher:
    def __init__(self, client: RegistryClient, layout: OCILayout, dest: Reference, mount_from: str | None):
        self.client = client
        self.layout = layout
        self.dest = dest
        self.mount_from = mount_from
        self.result = PushResult(str(dest), "", "")

    def read_verified(self, desc: Descriptor) -> bytes:
        path = self.layout.blob_path(desc.digest)
        try:
            with open(path, "rb") as f:
                data = f.read(desc.size + 1)
        except OSError as e:
            raise ConfigError(f"cannot read blob: {e.strerror}", path=path) from None
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if len(data) != desc.size or got != desc.digest:
            raise FormatError(
                f"blob has {len(data)} bytes, digest {got}; the descriptor says {desc.size}, {desc.digest}",
                path=path,
            )
        return data

    async def blob(self, desc: Descriptor) -> None:
        path = self.layout.blob_path(desc.digest)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise ConfigError(f"blob missing from the layout: {e.strerror}", path=path) from None
        if size != desc.size:
            raise FormatError(f"blob is {size} bytes, the descriptor says {desc.size}", path=path)
        fate = await push_blob(self.client, self.dest, desc.digest, path, mount_from=self.mount_from)
        {"exists": self.result.existing, "mounted": self.result.mounted, "uploaded": self.result.uploaded}[
            fate
        ].append(desc.digest)

    async def manifest(self, desc: Descriptor, target: str, depth: int = 0) -> tuple[str, str]:
        data = self.read_verified(desc)
        media = _media_type_of(data, desc.media_type)
        doc: dict[str, Any] = json.loads(data)
        if media in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            if depth:
                raise FormatError("nested image indexes are not supported", path=self.layout.root)
            children = [
                Descriptor.parse(m, f"manifests[{i}]", self.layout.root)
                for i, m in enumerate(doc["manifests"])
            ]
            for child in children:
                await self.manifest(child, child.digest, depth + 1)
        else:
            if "config" not in doc or "layers" not in doc:
                raise FormatError("not an image manifest (no config/layers)", path=self.layout.root)
            blobs = [Descriptor.parse(doc["config"], "config", self.layout.root)]
            blobs += [
                Descriptor.parse(x, f"layers[{i}]", self.layout.root) for i, x in enumerate(doc["layers"])
            ]
            blobs += table_descriptors(doc["layers"], path=self.layout.root)  # docs/verify.md
            await asyncio.gather(*(self.blob(b) for b in blobs))
        digest = await self.client.put_manifest(self.dest, data, media, target=target)
        if digest != desc.digest:
            raise FormatError(
                f"pushed manifest has digest {digest}, not {desc.digest}", path=self.layout.root
            )
        self.result.manifests.append(digest)
        return digest, media


async def push_layout(
    client: RegistryClient,
    source: str | os.PathLike[str],
    dest: Reference | str,
    *,
    tag: str | None = None,
    mount_from: str | None = None,
) -> PushResult:
    """Push an image from an OCI layout to ``dest`` (``host/repo[:tag]``).

    ``source`` is ``oci:DIR[:TAG]`` or a directory (then ``tag`` picks the image, or the layout must
    hold exactly one). The destination tag defaults to the source tag, else ``latest``.
    """
    text = os.fspath(source)
    if text.startswith("oci:"):
        root, src_tag = _parse_oci(text)
    else:
        root, src_tag = text, None
    src_tag = tag or src_tag
    layout = OCILayout(root)
    descs = layout.descriptors()
    if src_tag:
        matches = [d for d in descs if d.annotations.get(REF_NAME) == src_tag]
        if not matches:
            raise ConfigError(
                f"no image tagged {src_tag!r} (tags: {', '.join(layout.tags()) or 'none'})", path=root
            )
        desc = matches[0]
    elif len(descs) == 1:
        desc = descs[0]
    else:
        raise ConfigError(
            f"{len(descs)} images in the layout; name one with oci:DIR:TAG "
            f"(tags: {', '.join(layout.tags()) or 'none'})",
            path=root,
        )
    ref = dest if isinstance(dest, Reference) else parse_reference(dest)
    if isinstance(dest, str) and src_tag and ":" not in dest.rsplit("/", 1)[-1] and "@" not in dest:
        ref = ref.with_target(tag=src_tag)
    pusher = _LayoutPusher(client, layout, ref, mount_from)
    digest, media = await pusher.manifest(desc, ref.target)
    pusher.result.digest, pusher.result.media_type = digest, media
    pusher.result.reference = str(ref)
    return pusher.result


__all__ = [
    "OCI_CONFIG",
    "OCI_LAYER_TAR",
    "PushResult",
    "push_blob",
    "push_layout",
    "push_manifest",
]
