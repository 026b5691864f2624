"""The OCI image data model obd reads: descriptors, manifests, media types, platforms, and what
overlaybd adds to them (layer annotations, docs/formats.md §7).

A manifest is an overlaybd image when its layers carry the ``containerd.io/snapshot/overlaybd/
blob-digest`` and ``blob-size`` annotations; anything else is a plain OCI image. The registry client
and OCI layouts both produce :class:`Image` objects; nothing here does I/O.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from obd.errors import FormatError

ANNOTATION_PREFIX = "containerd.io/snapshot/overlaybd/"
BLOB_DIGEST = ANNOTATION_PREFIX + "blob-digest"
BLOB_SIZE = ANNOTATION_PREFIX + "blob-size"
VERSION = ANNOTATION_PREFIX + "version"
ACCELERATION_LAYER = ANNOTATION_PREFIX + "acceleration-layer"
TURBO_TARGET_DIGEST = ANNOTATION_PREFIX + "turbo-oci/target-digest"
FASTOCI_TARGET_DIGEST = ANNOTATION_PREFIX + "fastoci/target-digest"
REF_NAME = "org.opencontainers.image.ref.name"

MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
#: Manifests and configs are small; refuse anything absurd before reading it.
MAX_JSON_BYTES = 4 << 20


def host_platform() -> str:
    """``linux/amd64``-style name of this machine."""
    machine = _platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}.get(
        machine, machine
    )
    return f"linux/{arch}"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def parse(cls, obj: Any, where: str, path: object) -> Descriptor:
        if not isinstance(obj, dict):
            raise FormatError("descriptor must be an object", path=path, field=where)
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(digest, str) or ":" not in digest:
            raise FormatError("missing or malformed digest", path=path, field=f"{where}.digest", value=digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError("missing or malformed size", path=path, field=f"{where}.size", value=size)
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict):
            raise FormatError("annotations must be an object", path=path, field=f"{where}.annotations")
        platform = obj.get("platform")
        if platform is not None and not (
            isinstance(platform, dict)
            and all(isinstance(platform.get(k, ""), str) for k in ("os", "architecture", "variant"))
        ):
            raise FormatError(
                "platform must be an object with string os, architecture and variant",
                path=path,
                field=f"{where}.platform",
                value=str(platform)[:60],
            )
        return cls(
            str(obj.get("mediaType", "")),
            digest,
            size,
            {str(k): str(v) for k, v in ann.items()},
            platform,
        )

    @property
    def platform_name(self) -> str | None:
        if not self.platform:
            return None
        p = self.platform
        name = f"{p.get('os', '')}/{p.get('architecture', '')}"
        return f"{name}/{p['variant']}" if p.get("variant") else name


def parse_descriptors(doc: Any, key: str, path: object, *, optional: bool = False) -> list[Descriptor]:
    """The descriptors of list ``doc[key]`` (a manifest's ``layers``, an index's ``manifests``);
    FormatError if it is not a list of descriptors (``optional``: a missing or null one is empty)."""
    items = doc.get(key) if isinstance(doc, dict) else None
    if items is None and optional:
        return []
    if not isinstance(items, list):
        raise FormatError("must be a list of descriptors", path=path, field=key, value=str(items)[:40])
    return [Descriptor.parse(x, f"{key}[{i}]", path) for i, x in enumerate(items)]


@dataclass(frozen=True)
class OverlaybdLayer:
    """One layer of an overlaybd image: the blob to read and what its annotations say."""

    digest: str
    size: int
    media_type: str
    annotations: dict[str, str]

    @property
    def is_turbo(self) -> bool:
        return TURBO_TARGET_DIGEST in self.annotations or FASTOCI_TARGET_DIGEST in self.annotations

    @property
    def is_acceleration(self) -> bool:
        return self.annotations.get(ACCELERATION_LAYER) == "yes"


@dataclass
class Image:
    """A resolved image: its manifest, config and layers (lowest first)."""

    reference: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[Descriptor]
    #: the image index the reference named, when it named one (the manifest was chosen from it)
    index: dict[str, Any] | None = None

    def overlaybd_layers(self) -> list[OverlaybdLayer]:
        """The overlaybd layers, lowest first; a clear error if this is not an overlaybd image."""
        out = []
        for i, d in enumerate(self.layers):
            if BLOB_DIGEST not in d.annotations or BLOB_SIZE not in d.annotations:
                raise FormatError(
                    "this is a plain OCI image, not an overlaybd image (its layers lack the "
                    f"{BLOB_DIGEST} annotation); convert it first with `obd convert`",
                    path=self.reference,
                    field=f"layers[{i}].annotations",
                )
            ann = d.annotations
            if ann[BLOB_DIGEST] != d.digest:
                raise FormatError(
                    "blob-digest annotation differs from the layer digest",
                    path=self.reference,
                    field=f"layers[{i}].annotations.blob-digest",
                    value=ann[BLOB_DIGEST],
                )
            if ann[BLOB_SIZE] != str(d.size):
                raise FormatError(
                    "blob-size annotation differs from the layer size",
                    path=self.reference,
                    field=f"layers[{i}].annotations.blob-size",
                    value=ann[BLOB_SIZE],
                )
            out.append(OverlaybdLayer(d.digest, d.size, d.media_type, ann))
        return out


def config_platform(cfg: Mapping[str, Any]) -> dict[str, str]:
    """An image descriptor's ``platform`` (``os``, ``architecture``, ``variant``) from its config."""
    platform = {"os": cfg.get("os", "linux"), "architecture": cfg.get("architecture", "amd64")}
    if cfg.get("variant"):
        platform["variant"] = cfg["variant"]
    return platform


def platform_matches(have: str, want: str) -> bool:
    """Whether platform ``have`` (``os/arch[/variant]``) serves a request for ``want``; a missing
    variant on either side matches any."""
    h = have.split("/")
    w = want.split("/")
    return h[:2] == w[:2] and (len(w) < 3 or len(h) < 3 or h[2] == w[2])
