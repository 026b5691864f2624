"""An OCI distribution (registry v2) client on aiohttp, built for reading layer blobs on demand.

:class:`RegistryClient` is the facade; each family of requests lives in its own module:

- :mod:`~obd.registry.http`: the session, authentication round trips, retries with backoff, and
  blob redirects (followed without credentials, cached, re-resolved when they stop working).
- :mod:`~obd.registry.manifests`: manifests and indexes (digest-verified), platform selection, push.
- :mod:`~obd.registry.ranges`: blob reads — byte ranges checked rather than trusted (unlike
  overlaybd's ``registryfs_v2``, docs/formats.md §5), sizes, whole small blobs, downloads.
- :mod:`~obd.registry.uploads`: blob pushes (mount, monolithic, chunked).

Every coroutine must run on one event loop per client (the loop of :class:`~obd.registry.loop.AsyncRunner`
in the engine). Errors are :class:`~obd.errors.RegistryError` (or :class:`~obd.errors.AuthError`)
naming the URL without its query string, the HTTP status and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from obd.errors import FormatError
from obd.oci.model import Descriptor, Image, parse_descriptors
from obd.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    ManifestRequests,
    RawManifest,
    select_platform,
)
from obd.registry.ranges import BlobReads, parse_content_range
from obd.registry.reference import Reference
from obd.registry.uploads import BlobUploads


class RegistryClient(ManifestRequests, BlobReads, BlobUploads):
    """Talks to OCI registries: manifests, blobs, ranges, uploads. One aiohttp session per client.

    The constructor's settings (hosts reached over plain http, TLS, timeouts, retries, redirect
    TTL, limits, stats) are :class:`~obd.registry.http.HttpTransport`'s.
    """

    async def get_image(
        self,
        ref: Reference | str,
        platform: str | None = None,
        *,
        on_manifest: Callable[[Reference, dict[str, Any]], object] | None = None,
    ) -> Image:
        """Manifest, verified config and layer descriptors of an image (see :class:`obd.oci.model.Image`).

        ``on_manifest(ref, manifest)`` is called once the (digest-verified) image manifest is in,
        before the config is fetched: a caller can start what the manifest alone names (digest
        tables) so that it overlaps the config's round trip. It runs on the event loop: it must not
        block.
        """
        ref = self._repo(ref)
        digest, manifest, index = await self.get_manifest_and_index(ref, platform)
        if "layers" not in manifest or "config" not in manifest:
            raise FormatError("not an image manifest (no layers/config)", path=str(ref))
        if on_manifest is not None:
            on_manifest(ref, manifest)
        cfg = Descriptor.parse(manifest["config"], "config", str(ref))
        if cfg.size > MAX_MANIFEST_BYTES:
            raise FormatError(
                "config is larger than 4 MiB", path=str(ref), field="config.size", value=cfg.size
            )
        raw = self.content_cache.get_blob(cfg.digest) if self.content_cache else None
        if raw is None:
            raw = await self.get_blob(ref, cfg.digest)
            if self.content_cache is not None:
                self.content_cache.put_blob(cfg.digest, raw)
        try:
            config = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"config is not valid JSON: {e}", path=str(ref), field="config") from None
        if not isinstance(config, dict):
            raise FormatError("config must be a JSON object", path=str(ref), field="config")
        layers = parse_descriptors(manifest, "layers", str(ref))
        return Image(str(ref.with_target(digest=digest)), digest, manifest, config, layers, index=index)


__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "MANIFEST_ACCEPT",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "RawManifest",
    "RegistryClient",
    "parse_content_range",
    "select_platform",
]
