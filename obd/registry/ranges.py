"""Blob reads: exact byte ranges (checked, not trusted), sizes, whole small blobs, downloads.

What it does that overlaybd's ``registryfs_v2`` does not (docs/formats.md §5 lists overlaybd's behaviour):
a ranged GET must answer 206 with a ``Content-Range`` naming exactly the bytes asked for and a body
of exactly that length. A 200 (a server that ignored ``Range``) is accepted only when the read
starts at offset 0, and then only the first ``length`` bytes are used and the connection is
dropped; at any other offset it is retried and, if it persists, reported — overlaybd returns the
wrong bytes there. Every whole blob downloaded is checked against its digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from yarl import URL

from obd.errors import RegistryError
from obd.io.publish import publishing
from obd.observability import stats as st
from obd.registry.auth import safe_url
from obd.registry.hosts import PULL
from obd.registry.http import HttpTransport, Retry, digest_of, media_type, read_capped
from obd.registry.reference import Reference, validate_digest

if TYPE_CHECKING:
    import aiohttp

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.I)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` → (a, b, total or None for ``*``); None if malformed."""
    if not value:
        return None
    m = _CONTENT_RANGE.fullmatch(value)
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


class BlobReads(HttpTransport):
    """Blob read requests of :class:`~obd.registry.client.RegistryClient`."""

    async def read_range(
        self, repo: Reference | str, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes:
        """Exactly ``length`` bytes of blob ``digest`` at ``offset``, or an error.

        The answer must be a 206 whose ``Content-Range`` is exactly the range asked for (and whose
        total is ``size`` when given) with a body of exactly ``length`` bytes. A 200 is taken only
        for ``offset == 0``: its first ``length`` bytes are used and the connection is closed.
        """
        ref = self._repo(repo)
        validate_digest(digest)
        if offset < 0 or length < 0:
            raise RegistryError(f"invalid range offset={offset} length={length}", path=str(ref))
        if length == 0:
            return b""
        if size is not None and offset + length > size:
            raise RegistryError(
                f"range [{offset}, {offset + length}) is beyond the blob's {size} bytes",
                path=f"{ref.name}@{digest}",
            )
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}

        async def handle(resp: aiohttp.ClientResponse, url: URL) -> bytes:
            data, _ = await self._range_body(resp, url, offset, length, size)
            return data

        what = f"GET {digest}[{offset}:{offset + length}]"
        return await self._via_hosts(
            ref,
            PULL,
            lambda host: self._retrying(
                what, self.blob_url(host, digest), lambda _: self._blob_get(host, digest, headers, handle)
            ),
        )

    async def read_ranges(
        self,
        repo: Reference | str,
        digest: str,
        ranges: Iterable[tuple[int, int]],
        *,
        size: int | None = None,
    ) -> list[bytes]:
        """Several ``(offset, length)`` ranges fetched concurrently (up to the connection limit)."""
        ref = self._repo(repo)
        return list(await asyncio.gather(*(self.read_range(ref, digest, o, n, size=size) for o, n in ranges)))

    async def _range_body(
        self, resp: aiohttp.ClientResponse, url: URL, offset: int, length: int, size: int | None
    ) -> tuple[bytes, int | None]:
        """Validate a range answer and read its body; return (data, total size if known)."""
        end = offset + length - 1
        if resp.status == 206:
            raw_range = resp.headers.get("Content-Range")
            parsed = parse_content_range(raw_range)
            if media_type(resp.headers.get("Content-Type")).startswith("multipart/"):
                raise Retry("multipart answer to a single-range request")
            if parsed is None or parsed[0] != offset or parsed[1] != end:
                raise Retry(f"Content-Range {raw_range!r} is not the requested bytes {offset}-{end}")
            total = parsed[2]
            if size is not None and total is not None and total != size:
                raise Retry(f"Content-Range total {total} is not the blob size {size}")
            if resp.content_length is not None and resp.content_length != length:
                raise Retry(f"Content-Length {resp.content_length} for a {length}-byte range")
            data = await resp.content.readexactly(length)
            if resp.content_length is None and await resp.content.read(1):
                raise Retry(f"body longer than the {length}-byte range")
        elif resp.status == 200:
            if offset != 0:
                raise Retry(f"server ignored Range (HTTP 200 for bytes {offset}-{end})")
            total = resp.content_length
            if total is not None and size is not None and total != size:
                raise Retry(f"HTTP 200 body of {total} bytes for a blob of {size}")
            if total is not None and total < length:
                raise Retry(f"HTTP 200 body of {total} bytes, {length} wanted")
            data = await resp.content.readexactly(length)
            if total != length:
                resp.close()  # the rest of the body is not wanted: drop the connection
        else:
            raise AssertionError(resp.status)  # pragma: no cover - _blob_get passes only 200/206
        self.stats.incr(st.BYTES_FETCHED, len(data))
        return data, total

    async def blob_size(self, repo: Reference | str, digest: str) -> int:
        """Size of blob ``digest``: HEAD, or a ``Range: bytes=0-0`` GET's ``Content-Range`` total."""
        ref = self._repo(repo)
        validate_digest(digest)

        async def one(host: Reference) -> int:
            url = self.blob_url(host, digest)
            scopes = (f"repository:{host.repository}:pull",)

            async def head(_: int) -> int | None:
                async with self._open("HEAD", url, host, scopes) as resp:
                    if resp.status == 200 and resp.content_length is not None:
                        said = resp.headers.get("Docker-Content-Digest")
                        if said and said != digest:
                            raise RegistryError(
                                f"HEAD answered for digest {said}",
                                path=safe_url(url),
                                field="Docker-Content-Digest",
                            )
                        return resp.content_length
                    if resp.status == 404:
                        await self._fail(resp, url, f"blob {digest}")
                    if resp.status >= 500 or resp.status == 429:
                        await self._fail(resp, url, f"HEAD blob {digest}")
                    return None  # 200 without length, a redirect, 405…: ask with a ranged GET

            size = await self._retrying(f"HEAD blob {digest}", url, head)
            if size is not None:
                return size

            async def handle(resp: aiohttp.ClientResponse, target: URL) -> int:
                _, total = await self._range_body(resp, target, 0, 1, None)
                if total is None:
                    raise RegistryError("the registry does not say the blob's size", path=safe_url(target))
                return total

            headers = {"Range": "bytes=0-0"}
            return await self._retrying(
                f"size of blob {digest}", url, lambda _: self._blob_get(host, digest, headers, handle)
            )

        return await self._via_hosts(ref, PULL, one)

    async def get_blob(self, repo: Reference | str, digest: str, *, max_bytes: int | None = None) -> bytes:
        """A whole (small) blob in memory, its digest verified. Refused above ``max_bytes``."""
        ref = self._repo(repo)
        validate_digest(digest)
        limit = self.max_blob_bytes if max_bytes is None else max_bytes
        algorithm = digest.split(":", 1)[0]

        async def handle(resp: aiohttp.ClientResponse, url: URL) -> bytes:
            if resp.status != 200:
                raise Retry(f"HTTP {resp.status} to a GET without Range")
            data = await read_capped(resp, limit, url, "blob")
            if resp.content_length is not None and len(data) != resp.content_length:
                raise Retry(f"body of {len(data)} bytes, Content-Length {resp.content_length}")
            self.stats.incr(st.BYTES_FETCHED, len(data))
            got = digest_of(data, algorithm)
            if got != digest:
                raise Retry(f"downloaded content has digest {got}")
            return data

        return await self._via_hosts(
            ref,
            PULL,
            lambda host: self._retrying(
                f"GET blob {digest}",
                self.blob_url(host, digest),
                lambda _: self._blob_get(host, digest, {}, handle, timeout=self.stream_timeout),
            ),
        )

    async def download_blob(self, repo: Reference | str, digest: str, path: str | os.PathLike[str]) -> int:
        """Stream a whole blob to ``path``, published atomically (:mod:`obd.io.publish`); digest verified."""
        ref = self._repo(repo)
        validate_digest(digest)
        dest = os.fspath(path)
        algorithm = digest.split(":", 1)[0]

        async def handle(resp: aiohttp.ClientResponse, url: URL) -> int:
            if resp.status != 200:
                raise Retry(f"HTTP {resp.status} to a GET without Range")
            h = hashlib.new(algorithm)
            total = 0
            # not fsync'ed, as before: the file is a working copy its user verifies or refetches
            with publishing(dest, durable=False) as f:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                    total += len(chunk)
                self.stats.incr(st.BYTES_FETCHED, total)
                if resp.content_length is not None and total != resp.content_length:
                    raise Retry(f"body of {total} bytes, Content-Length {resp.content_length}")
                got = f"{algorithm}:{h.hexdigest()}"
                if got != digest:
                    raise Retry(f"downloaded content has digest {got}")
            return total

        return await self._via_hosts(
            ref,
            PULL,
            lambda host: self._retrying(
                f"download blob {digest}",
                self.blob_url(host, digest),
                lambda _: self._blob_get(host, digest, {}, handle, timeout=self.stream_timeout),
            ),
        )


__all__ = ["BlobReads", "parse_content_range"]
