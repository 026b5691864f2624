"""Pushing a converted image: blobs the registry lacks (HEAD first, mounted from the source
repository when it is on the same registry, uploaded in chunks otherwise), then the manifest."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from obd.registry.push import PushResult, push_blob
from obd.registry.reference import parse_reference
from obd.verify.pins import TablePin
from obd.verify.table import push_table_artifact

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions
    from obd.observability.progress import ProgressFactory

#: How many blobs go up at once.
PARALLEL_UPLOADS = 4
PUSH_TIMEOUT = 6 * 3600.0


def push_converted(
    remote: RemoteOptions,
    reference: str,
    blobs: list[tuple[str, str | bytes]],
    manifest: bytes,
    media_type: str,
    *,
    mount_from: str | None = None,
    progress: ProgressFactory | None = None,
    tables: list[tuple[TablePin, str]] | None = None,
) -> PushResult:
    """Push ``blobs`` (``(digest, path or bytes)``) and then ``manifest`` to ``reference``; with
    ``tables`` (``(pin, layer digest)``), then the artifact that keeps them referenced (docs/verify.md)."""
    ref = parse_reference(reference)
    client = remote.client()
    result = PushResult(str(ref), "", media_type)
    sizes = {d: len(b) if isinstance(b, (bytes, bytearray)) else os.path.getsize(b) for d, b in blobs}
    total = sum(sizes.values())
    bar = progress("upload", total) if progress is not None else None

    async def run() -> str:
        sem = asyncio.Semaphore(PARALLEL_UPLOADS)

        async def one(digest: str, data: str | bytes) -> None:
            async with sem:
                fate = await push_blob(client, ref, digest, data, mount_from=mount_from)
            {"exists": result.existing, "mounted": result.mounted, "uploaded": result.uploaded}[fate].append(
                digest
            )
            if bar is not None:
                bar.advance(sizes[digest])

        unique = list(dict(blobs).items())
        await asyncio.gather(*(one(d, b) for d, b in unique))
        digest = await client.put_manifest(ref, manifest, media_type)
        if tables:
            await push_table_artifact(client, ref, digest, len(manifest), media_type, tables)
        return digest

    try:
        result.digest = remote.runner.run(run(), PUSH_TIMEOUT)
    finally:
        if bar is not None:
            bar.finish()
    result.manifests.append(result.digest)
    return result


__all__ = ["push_converted"]
