"""Manifests and indexes: fetch (digest-verified), resolve an index to a platform, push.

Media types are the OCI and Docker v2 ones; Docker schema 1 is refused. Manifests are capped at
:data:`MAX_MANIFEST_BYTES` before they are read, and every one fetched is checked against the
digest asked for, or the registry's ``Docker-Content-Digest`` for a tag.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from obd.errors import ConfigError, FormatError, RegistryError, UnsupportedError
from obd.oci.model import INDEX_TYPES, MANIFEST_TYPES, Descriptor, host_platform, platform_matches
from obd.registry.auth import safe_url
from obd.registry.http import HttpTransport, Retry, digest_of, media_type, read_capped
from obd.registry.reference import Reference, validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

log = logging.getLogger("obd.registry")

#: Answers to a referrers request meaning "no referrers API here": fall back to the tag schema.
NO_REFERRERS_API = frozenset({400, 404, 405, 406, 501})
#: Manifests and configs larger than this are refused before they are read.
MAX_MANIFEST_BYTES = 4 << 20


@dataclass(frozen=True)
class RawManifest:
    """A manifest or index exactly as the registry sent it (digest verified)."""

    digest: str
    media_type: str
    data: bytes

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.data)
        except ValueError as e:
            raise FormatError(f"manifest is not valid JSON: {e}", path=self.digest) from None
        if not isinstance(obj, dict):
            raise FormatError("manifest must be a JSON object", path=self.digest)
        return obj


class ManifestRequests(HttpTransport):
    """Manifest and index requests of :class:`~obd.registry.client.RegistryClient`."""

    async def fetch_manifest(self, ref: Reference | str, target: str | None = None) -> RawManifest:
        """The manifest or index ``target`` (tag or digest; default: the reference's) exactly as stored."""
        ref = self._repo(ref)
        target = target or ref.target
        want_digest = target if ":" in target else None
        if want_digest:
            validate_digest(want_digest)
            kept = self.content_cache.get_manifest(want_digest) if self.content_cache else None
            if kept is not None:
                return RawManifest(want_digest, kept[0], kept[1])

        async def one(host: Reference) -> RawManifest:
            url = self.manifest_url(host, target)
            scopes = (f"repository:{host.repository}:pull",)

            async def attempt(_: int) -> RawManifest:
                async with self._open("GET", url, host, scopes, headers={"Accept": MANIFEST_ACCEPT}) as resp:
                    if resp.status != 200:
                        await self._fail(resp, url, f"manifest {target}")
                    data = await read_capped(resp, MAX_MANIFEST_BYTES, url, "manifest")
                    header_digest = resp.headers.get("Docker-Content-Digest")
                    content_type = media_type(resp.headers.get("Content-Type"))
                if want_digest:
                    got = digest_of(data, want_digest.split(":", 1)[0])
                    if got != want_digest:
                        raise Retry(f"manifest content has digest {got}, not {want_digest}")
                    digest = want_digest
                else:
                    digest = digest_of(data)
                    if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                        raise Retry(
                            f"manifest content has digest {digest}, "
                            f"Docker-Content-Digest says {header_digest}"
                        )
                media = content_type
                with contextlib.suppress(ValueError, AttributeError):
                    media = json.loads(data).get("mediaType") or content_type
                if media in DOCKER_SCHEMA1:
                    raise UnsupportedError("Docker schema 1 manifests are not supported", path=str(ref))
                if want_digest and self.content_cache is not None:
                    self.content_cache.put_manifest(digest, media, data)
                return RawManifest(digest, media, data)

            return await self._retrying(f"GET manifest {target}", url, attempt)

        return await self._via_hosts(ref, self._read_capability(target), one)

    async def get_manifest(
        self, ref: Reference | str, platform: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``(digest, manifest)`` of an image; an index is resolved to ``platform`` (default: this host's).

        The digest is verified against the reference's digest, or the registry's
        ``Docker-Content-Digest``, and a platform manifest against the index entry naming it.
        """
        digest, doc, _ = await self.get_manifest_and_index(ref, platform)
        return digest, doc

    async def get_manifest_and_index(
        self, ref: Reference | str, platform: str | None = None
    ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """:meth:`get_manifest`, plus the image index ``ref`` named (None when it named a manifest):
        what it says of the manifest (e.g. an annotation linking an index artifact) needs no second
        request, and is what the digest printed for the tag pins."""
        ref = self._repo(ref)
        raw = await self.fetch_manifest(ref)
        if ref.digest is None:
            # a tag is resolved once per run: everything after this reads by this digest
            log.info("resolved %s to %s", ref, raw.digest)
        else:
            log.debug("%s: manifest bytes match the pinned digest", ref)
        doc = raw.json()
        if raw.media_type in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = select_platform(doc, platform or host_platform(), str(ref))
            child = await self.fetch_manifest(ref, desc.digest)
            if len(child.data) != desc.size:
                raise FormatError(
                    f"manifest is {len(child.data)} bytes, the index says {desc.size}",
                    path=str(ref),
                    field="manifests.size",
                )
            index = doc
            doc = child.json()
            if "manifests" in doc and "layers" not in doc:
                raise UnsupportedError("nested image indexes are not supported", path=str(ref))
            return child.digest, doc, index
        return raw.digest, doc, None

    async def fetch_referrers(
        self, ref: Reference | str, digest: str, artifact_type: str | None = None
    ) -> list[dict[str, Any]] | None:
        """The descriptors the OCI 1.1 referrers API (``GET /v2/<name>/referrers/<digest>``) lists
        for manifest ``digest``, those of ``artifact_type`` only when given (the registry may ignore
        the filter: it is applied here too). None when the registry has no such API: it answers
        404, 400, 405, 406 or 501, or something that is not an image index (distribution 2.8 and
        most mirrors), so the caller falls back to the referrers tag schema. The list is only a
        hint: it is not content-addressed, so whatever it names must be fetched by digest and
        checked against ``digest`` (its ``subject``) by the caller."""
        ref = self._repo(ref)
        validate_digest(digest)

        async def one(host: Reference) -> list[dict[str, Any]] | None:
            url = self.base_url(host) / host.repository / "referrers" / digest
            if artifact_type:
                url = url.with_query(artifactType=artifact_type)
            scopes = (f"repository:{host.repository}:pull",)

            async def attempt(_: int) -> list[dict[str, Any]] | None:
                async with self._open("GET", url, host, scopes, headers={"Accept": OCI_INDEX}) as resp:
                    if resp.status in NO_REFERRERS_API:
                        return None
                    if resp.status != 200:
                        await self._fail(resp, url, f"referrers of {digest}")
                    data = await read_capped(resp, MAX_MANIFEST_BYTES, url, "referrers")
                try:
                    listed = json.loads(data).get("manifests")
                except (ValueError, AttributeError):
                    return None
                if not isinstance(listed, list):
                    return None
                return [
                    d
                    for d in listed
                    if isinstance(d, dict)
                    and (artifact_type is None or d.get("artifactType") == artifact_type)
                ]

            return await self._retrying(f"GET referrers of {digest}", url, attempt)

        return await self._via_hosts(ref, self._read_capability(digest), one)

    async def put_manifest(
        self, ref: Reference | str, data: bytes, media_type: str, *, target: str | None = None
    ) -> str:
        """PUT a manifest or index under ``target`` (default: the reference's tag or digest); its digest."""
        ref = self._repo(ref)
        target = target or ref.target
        digest = digest_of(data)
        url = self.manifest_url(ref, target)
        scopes = (f"repository:{ref.repository}:pull,push",)

        async def attempt(_: int) -> str:
            hdrs = {"Content-Type": media_type}
            async with self._open("PUT", url, ref, scopes, headers=hdrs, data=data) as resp:
                if resp.status not in (200, 201):
                    await self._fail(resp, url, f"PUT manifest {target}")
                said = resp.headers.get("Docker-Content-Digest")
            if said and said != digest:
                raise RegistryError(
                    f"registry stored the manifest as {said}, not {digest}", path=safe_url(url)
                )
            return digest

        return await self._retrying(f"PUT manifest {target}", url, attempt)


def select_platform(index: Mapping[str, Any], platform: str, where: str) -> Descriptor:
    """The index entry for ``platform`` (``os/arch[/variant]``); ConfigError listing what there is."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError("index has no manifests list", path=where, field="manifests")
    descs = [Descriptor.parse(m, f"manifests[{i}]", where) for i, m in enumerate(entries)]
    candidates = [d for d in descs if d.platform_name and platform_matches(d.platform_name, platform)]
    if not candidates:
        have = ", ".join(d.platform_name or "?" for d in descs)
        raise ConfigError(f"no manifest for platform {platform} (have: {have})", path=where)
    # an exact variant match beats an entry without a variant
    candidates.sort(key=lambda d: d.platform_name != platform)
    for d in candidates:
        if d.media_type in MANIFEST_TYPES or not d.media_type:
            return d
    return candidates[0]


__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "DOCKER_SCHEMA1",
    "MANIFEST_ACCEPT",
    "MAX_MANIFEST_BYTES",
    "NO_REFERRERS_API",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "ManifestRequests",
    "RawManifest",
    "select_platform",
]
