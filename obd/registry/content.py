"""Small documents fetched by digest, kept on disk: manifests and image configs.

A warm start of ``obd run IMAGE:TAG`` needs the tag's manifest from the registry (a tag moves), but
what it names after that (the platform manifest of an index, the image config) is addressed by
digest and never changes. Keeping those here makes a warm resolve one round trip instead of three.
Only digests are keys, so nothing here can make a tag stale; every read re-checks the digest (a
damaged file is dropped and fetched again), and nothing larger than a manifest may be kept::

    <cache dir>/content/manifests/sha256/<hex>    media type, a newline, the manifest bytes
    <cache dir>/content/blobs/sha256/<hex>        the blob bytes (image configs)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from obd.io.publish import publish_bytes

log = logging.getLogger(__name__)

#: Largest document kept (a manifest or config is refused above this by the client anyway).
MAX_DOCUMENT = 4 << 20


class ContentCache:
    """The store under ``root`` (``<cache dir>/content``)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def _path(self, kind: str, digest: str) -> Path | None:
        alg, _, hexpart = digest.partition(":")
        if alg != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
            return None
        return self.root / kind / alg / hexpart

    def _get(self, kind: str, digest: str) -> bytes | None:
        path = self._path(kind, digest)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_DOCUMENT + 256 + 1)
        except OSError:
            return None
        body = data.partition(b"\n")[2] if kind == "manifests" else data
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            log.warning("kept %s %s does not match its digest; fetching it again", kind[:-1], digest)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def _put(self, kind: str, digest: str, data: bytes) -> None:
        path = self._path(kind, digest)
        if path is None or len(data) > MAX_DOCUMENT + 256:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            publish_bytes(path, data, durable=False)
        except OSError as e:  # an optimisation: the registry still has it
            log.debug("cannot keep %s: %s", digest, e)

    def get_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """``(media type, bytes)`` of manifest ``digest`` if kept and intact."""
        data = self._get("manifests", digest)
        if data is None:
            return None
        media, _, body = data.partition(b"\n")
        return media.decode("ascii", "replace"), body

    def put_manifest(self, digest: str, media_type: str, data: bytes) -> None:
        """Keep manifest ``data`` whose digest the caller checked."""
        if "\n" not in media_type and media_type.isascii():
            self._put("manifests", digest, media_type.encode() + b"\n" + data)

    def get_blob(self, digest: str) -> bytes | None:
        """The bytes of blob ``digest`` if kept and intact."""
        return self._get("blobs", digest)

    def put_blob(self, digest: str, data: bytes) -> None:
        """Keep blob ``data`` whose digest the caller checked."""
        self._put("blobs", digest, data)


__all__ = ["ContentCache"]
