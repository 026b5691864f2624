"""OCI image layouts on disk (``oci:DIR[:TAG]``): reading an image out of one, adding one to it.

An OCI layout is a directory with ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``. A tag is
the ``org.opencontainers.image.ref.name`` annotation of an ``index.json`` entry; an entry may be a
manifest or an index (manifest list), from which the platform's manifest is chosen. Every manifest
and config read is checked against its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from obd.errors import ConfigError, FormatError
from obd.io.publish import publish_bytes, publish_copy
from obd.oci.model import (
    INDEX_TYPES,
    MAX_JSON_BYTES,
    REF_NAME,
    Descriptor,
    Image,
    host_platform,
    parse_descriptors,
    platform_matches,
)


def file_digest(path: str) -> tuple[str, int]:
    """``("sha256:…", size)`` of a file: its digest as an OCI descriptor names it."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def layout_blob_path(root: str, digest: str) -> str:
    """Where blob ``digest`` lives in the layout at ``root`` (the digest validated first)."""
    alg, _, hexpart = digest.partition(":")
    if alg != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise FormatError("unsupported or malformed digest", path=root, field="digest", value=digest)
    return os.path.join(root, "blobs", alg, hexpart)


class OCILayout:
    """A local OCI image layout directory."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = os.fspath(root)
        marker = os.path.join(self.root, "oci-layout")
        if not os.path.isfile(marker):
            raise ConfigError("not an OCI image layout (no oci-layout file)", path=self.root)
        self.index = self._json(os.path.join(self.root, "index.json"), None)

    def blob_path(self, digest: str) -> str:
        return layout_blob_path(self.root, digest)

    def _json(self, path: str, digest: str | None) -> dict[str, Any]:
        try:
            size = os.path.getsize(path)
            if size > MAX_JSON_BYTES:
                raise FormatError(
                    f"{size} bytes is too large for a manifest or config", path=path, field="size"
                )
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=path) from e
        if digest is not None:
            got = "sha256:" + hashlib.sha256(raw).hexdigest()
            if got != digest:
                raise FormatError(f"content has digest {got}", path=path, field="digest", value=digest)
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"not valid JSON: {e}", path=path) from e
        if not isinstance(obj, dict):
            raise FormatError("must be a JSON object", path=path)
        return obj

    def descriptors(self) -> list[Descriptor]:
        return parse_descriptors(self.index, "manifests", self.root, optional=True)

    def tags(self) -> list[str]:
        return [d.annotations[REF_NAME] for d in self.descriptors() if REF_NAME in d.annotations]

    def resolve(self, tag: str | None = None, *, platform: str | None = None) -> Image:
        """The image a tag names (or the only/platform-matching entry when no tag is given)."""
        descs = self.descriptors()
        ref = f"oci:{self.root}" + (f":{tag}" if tag else "")
        if tag:
            matches = [d for d in descs if d.annotations.get(REF_NAME) == tag]
            if not matches:
                raise ConfigError(
                    f"no image tagged {tag!r} (tags: {', '.join(self.tags()) or 'none'})", path=self.root
                )
            desc = matches[0]
        elif len(descs) == 1:
            desc = descs[0]
        else:
            want = platform or host_platform()
            plat = [d for d in descs if d.platform_name and platform_matches(d.platform_name, want)]
            if not plat:
                raise ConfigError(
                    f"{len(descs)} images in the layout; name one with :TAG "
                    f"(tags: {', '.join(self.tags()) or 'none'})",
                    path=self.root,
                )
            desc = plat[0]
        return self._resolve_desc(desc, ref, platform)

    def _resolve_desc(self, desc: Descriptor, ref: str, platform: str | None, depth: int = 0) -> Image:
        doc = self._json(self.blob_path(desc.digest), desc.digest)
        media = doc.get("mediaType") or desc.media_type
        if media in INDEX_TYPES or "manifests" in doc:
            if depth:
                raise FormatError("nested image indexes are not supported", path=ref)
            want = platform or host_platform()
            subs = parse_descriptors(doc, "manifests", ref, optional=True)
            for sub in subs:
                if sub.platform_name and platform_matches(sub.platform_name, want):
                    return self._resolve_desc(sub, ref, platform, depth + 1)
            have = ", ".join(s.platform_name or "?" for s in subs)
            raise ConfigError(f"no manifest for platform {want} (have: {have})", path=ref)
        if "layers" not in doc or "config" not in doc:
            raise FormatError(
                "not an image manifest (no layers/config)", path=ref, field="mediaType", value=media
            )
        cfg_desc = Descriptor.parse(doc["config"], "config", ref)
        config = self._json(self.blob_path(cfg_desc.digest), cfg_desc.digest)
        layers = parse_descriptors(doc, "layers", ref)
        return Image(ref, desc.digest, doc, config, layers)


def parse_oci_reference(ref: str) -> tuple[str, str | None]:
    """``oci:DIR[:TAG]`` → (DIR, TAG). A colon inside DIR is allowed when DIR exists as given."""
    if not ref.startswith("oci:"):
        raise ConfigError("not an oci: reference", field="reference", value=ref)
    rest = ref[4:]
    if os.path.isdir(rest):
        return rest, None
    head, sep, tag = rest.rpartition(":")
    if sep and head and "/" not in tag:
        return head, tag
    return rest, None


# -- writing layouts -----------------------------------------------------------------------------

OCI_LAYOUT_FILE = '{"imageLayoutVersion":"1.0.0"}'


def write_layout(
    root: str | os.PathLike[str],
    *,
    manifest: bytes,
    media_type: str,
    blobs: list[tuple[str, str | bytes]],
    tag: str | None = None,
    platform: dict[str, Any] | None = None,
) -> Descriptor:
    """Add an image to the OCI layout at ``root`` (created if needed) and return its index entry.

    ``blobs`` are ``(digest, path or bytes)`` for the config and layers; files are hard-linked when
    possible. Blobs land before the manifest and ``index.json`` is replaced last, atomically, so a
    reader sees the old image or the new one, never a manifest whose blobs are missing. An existing
    entry with the same tag (or, without a tag, any untagged entry) is replaced.
    """
    root = os.fspath(root)
    try:
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the layout: {e.strerror}", path=root) from None
    marker = os.path.join(root, "oci-layout")
    index_path = os.path.join(root, "index.json")
    if os.path.exists(marker):
        layout = OCILayout(root)
        index = dict(layout.index)
    else:
        if os.path.exists(index_path):
            raise ConfigError("has an index.json but no oci-layout file", path=root)
        layout = None
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    helper = layout or _LayoutPaths(root)
    for blob_digest, data in blobs:
        dest = helper.blob_path(blob_digest)
        if isinstance(data, (bytes, bytearray)):
            if not (os.path.isfile(dest) and os.path.getsize(dest) == len(data)):
                publish_bytes(dest, bytes(data))
        else:
            if not (os.path.isfile(dest) and os.path.getsize(dest) == os.path.getsize(data)):
                publish_copy(dest, data)
    publish_bytes(helper.blob_path(digest), manifest)
    if not os.path.exists(marker):
        publish_bytes(marker, OCI_LAYOUT_FILE.encode())
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(manifest)}
    if tag:
        desc["annotations"] = {REF_NAME: tag}
    if platform:
        desc["platform"] = platform
    kept = []
    for entry in index.get("manifests") or []:
        name = (entry.get("annotations") or {}).get(REF_NAME) if isinstance(entry, dict) else None
        if name == tag:
            continue
        kept.append(entry)
    index["manifests"] = [*kept, desc]
    publish_bytes(index_path, json.dumps(index, indent=2).encode() + b"\n")
    return Descriptor.parse(desc, "manifests[-1]", root)


class _LayoutPaths(OCILayout):
    """Blob paths of a layout that is still being created (no oci-layout/index.json yet)."""

    def __init__(self, root: str):  # no oci-layout check: it is written last
        self.root = root
        self.index = {}
