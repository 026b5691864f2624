"""Finding the artifacts that refer to an image: the OCI 1.1 referrers API, then the tag schema.

obd links two kinds of artifact to an image manifest through their ``subject``: the index artifact
of a plain image (:mod:`obd.turbo.artifact`) and the digest-table artifact (:mod:`obd.verify.index`).
A registry implementing distribution-spec 1.1 lists them at ``GET /v2/<name>/referrers/<digest>``;
one without it (Debian's docker-registry 2.8 answers 404) is served by the *referrers tag schema*:
an image index tagged ``sha256-<manifest hex>`` that the pusher keeps. :func:`referrer_descriptors`
asks the API first and falls back to the tag when the API is missing, fails, or lists nothing of
the type wanted (an artifact pushed to a mirror or registry that indexed no subject).

Both answers are weak links (neither is content-addressed), so callers read them only with
``--allow-referrers`` and check what they name: the artifact is fetched by digest and its
``subject`` must be the image's manifest digest.
"""

from __future__ import annotations

import logging
from typing import Any

from obd.errors import AuthError, RegistryError
from obd.registry.http import NotFoundError
from obd.registry.reference import Reference

log = logging.getLogger("obd.verify")


def fallback_tag(manifest_digest: str) -> str:
    """The referrers tag schema's tag of a manifest: ``sha256-<hex>``."""
    alg, _, hexpart = manifest_digest.partition(":")
    return f"{alg}-{hexpart}"


async def referrer_descriptors(
    client: Any, ref: Reference, manifest_digest: str, artifact_type: str
) -> list[dict[str, Any]]:
    """The descriptors of artifacts of ``artifact_type`` referring to ``manifest_digest`` in
    ``ref``'s repository: from the referrers API, else from the fallback tag's index; ``[]`` when
    neither lists one. Authentication errors are raised, not hidden behind the fallback."""
    listed: list[dict[str, Any]] | None = None
    try:
        listed = await client.fetch_referrers(ref, manifest_digest, artifact_type)
    except AuthError:
        raise
    except RegistryError as e:
        log.info("%s: referrers API failed (%s); trying the tag %s", ref, e, fallback_tag(manifest_digest))
    if listed:
        log.info("%s: %d %s artifact(s) found by the referrers API", ref, len(listed), artifact_type)
        return listed
    if listed is None:
        log.debug("%s: no referrers API; trying the tag %s", ref, fallback_tag(manifest_digest))
    try:
        index = (await client.fetch_manifest(ref, fallback_tag(manifest_digest))).json()
    except NotFoundError:
        return []
    entries = index.get("manifests")
    if not isinstance(entries, list):
        return []
    return [d for d in entries if isinstance(d, dict) and d.get("artifactType") == artifact_type]


__all__ = ["fallback_tag", "referrer_descriptors"]
