"""Blob uploads: existence checks, cross-repository mounts, monolithic and chunked pushes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from yarl import URL

from obd.errors import RegistryError
from obd.registry.auth import safe_url
from obd.registry.http import REDIRECT_STATUSES, HttpTransport
from obd.registry.reference import Reference, validate_digest

if TYPE_CHECKING:
    import aiohttp


class BlobUploads(HttpTransport):
    """Blob upload requests of :class:`~obd.registry.client.RegistryClient`."""

    async def blob_exists(self, repo: Reference | str, digest: str, *, push: bool = False) -> bool:
        """Whether the repository has blob ``digest`` (HEAD). ``push`` asks for a push-scoped token."""
        ref = self._repo(repo)
        validate_digest(digest)
        url = self.blob_url(ref, digest)
        scopes = (f"repository:{ref.repository}:{'pull,push' if push else 'pull'}",)

        async def attempt(_: int) -> bool:
            async with self._open("HEAD", url, ref, scopes) as resp:
                if resp.status in (200, *REDIRECT_STATUSES):
                    return True
                if resp.status == 404:
                    return False
                await self._fail(resp, url, f"HEAD blob {digest}")
            raise AssertionError("unreachable")  # pragma: no cover

        return await self._retrying(f"HEAD blob {digest}", url, attempt)

    async def put_blob(
        self,
        repo: Reference | str,
        digest: str,
        data: bytes | str | os.PathLike[str],
        *,
        mount_from: str | None = None,
    ) -> str:
        """Upload a blob (bytes, or a file path); ``"mounted"`` or ``"uploaded"``.

        POST then PUT (distribution 2.8 ignores a body on the POST), or PATCH chunks of
        ``chunk_size`` then PUT for larger blobs. With ``mount_from`` (a repository on the same
        registry) the registry is first asked to mount the blob from there.
        """
        ref = self._repo(repo)
        validate_digest(digest)
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            payload: bytes | None = raw
            path = None
            size = len(raw)
        else:
            payload = None
            path = os.fspath(data)
            size = os.path.getsize(path)
        scopes = [f"repository:{ref.repository}:pull,push"]
        start = self.base_url(ref) / ref.repository / "blobs" / "uploads" / ""
        if mount_from:
            scopes.append(f"repository:{mount_from}:pull")
            start = start.with_query({"mount": digest, "from": mount_from})

        async def attempt(_: int) -> str:
            async with self._open("POST", start, ref, scopes) as resp:
                if resp.status == 201 and mount_from:
                    return "mounted"
                if resp.status != 202:
                    await self._fail(resp, start, "start upload")
                location = self._upload_location(start, resp)
            if size <= self.chunk_size:
                body = payload if payload is not None else _read_file(path, 0, size)
                final = _with_digest(location, digest)
            else:
                location = await self._patch_chunks(ref, scopes, location, payload, path, size)
                body = b""
                final = _with_digest(location, digest)
            hdrs = {"Content-Type": "application/octet-stream"}
            async with self._open(
                "PUT", final, ref, scopes, headers=hdrs, data=body, timeout=self.stream_timeout
            ) as resp:
                if resp.status != 201:
                    await self._fail(resp, final, f"finish upload of {digest}")
                said = resp.headers.get("Docker-Content-Digest")
                if said and said != digest:
                    raise RegistryError(f"registry stored the blob as {said}", path=safe_url(final))
            return "uploaded"

        return await self._retrying(f"upload blob {digest}", start, attempt)

    def _upload_location(self, url: URL, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"HTTP {resp.status} without a Location header", path=safe_url(url))
        return url.join(URL(location, encoded=True))

    async def _patch_chunks(
        self,
        ref: Reference,
        scopes: Sequence[str],
        location: URL,
        payload: bytes | None,
        path: str | None,
        size: int,
    ) -> URL:
        pos = 0
        while pos < size:
            n = min(self.chunk_size, size - pos)
            chunk = payload[pos : pos + n] if payload is not None else _read_file(path, pos, n)
            hdrs = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{pos}-{pos + n - 1}",
            }
            async with self._open(
                "PATCH", location, ref, scopes, headers=hdrs, data=chunk, timeout=self.stream_timeout
            ) as resp:
                if resp.status != 202:
                    await self._fail(resp, location, "upload chunk")
                location = self._upload_location(location, resp)
            pos += n
        return location


def _with_digest(location: URL, digest: str) -> URL:
    text = str(location)
    sep = "&" if "?" in text else "?"
    return URL(text + sep + "digest=" + digest.replace(":", "%3A"), encoded=True)


def _read_file(path: str | None, offset: int, length: int) -> bytes:
    assert path is not None
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise RegistryError(f"file shrank while uploading (read {len(data)} of {length} bytes)", path=path)
    return data


__all__ = ["BlobUploads"]
