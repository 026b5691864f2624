"""Digest tables on the read path and in registries: fetching a layer's table, wrapping its blob
Source in a :class:`~obd.verify.verifier.VerifiedSource`, refetching a bad block from the origin,
and giving an image already in a registry its tables (:func:`add_tables`). Pins and the
``--verify`` policy are in :mod:`obd.verify.pins`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from obd.errors import FormatError, IntegrityError
from obd.io.source import Source
from obd.registry.auth import CredentialResolver
from obd.registry.client import RegistryClient
from obd.registry.hosts import HostsConfig, HostsResolver
from obd.registry.reference import Reference
from obd.verify.format import (
    DEFAULT_BLOCK_SIZE,
    MEDIA_TYPE,
    DigestTable,
    build_table,
    build_table_file,
)
from obd.verify.local import LocalTables
from obd.verify.pins import TablePin, lower_pin
from obd.verify.repair import OriginRepair
from obd.verify.verifier import VerifiedSource

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions
    from obd.registry.loop import AsyncRunner

log = logging.getLogger("obd.verify")

TABLE_TIMEOUT = 120.0
REFETCH_TIMEOUT = 120.0


# -- the read path -------------------------------------------------------------------------------

_tables: dict[str, DigestTable] = {}
_tables_lock = threading.Lock()


def fetch_table(
    client: RegistryClient,
    runner: AsyncRunner,
    ref: Reference,
    pin: TablePin,
    local: LocalTables | None = None,
) -> DigestTable:
    """The table ``pin`` names: from the ``local`` store if it holds it, else from the repository of
    ``ref`` (any mirror: its digest is checked) and then kept in ``local``; parsed, and kept for the
    process, as content addressed by its digest."""
    with _tables_lock:
        found = _tables.get(pin.digest)
    if found is not None:
        return found
    data = local.get_table(pin) if local is not None else None
    if data is None:
        data = runner.run(client.get_blob(ref, pin.digest, max_bytes=pin.size), TABLE_TIMEOUT)
        if len(data) != pin.size:
            raise IntegrityError(
                f"the table is {len(data)} bytes, the manifest says {pin.size}", path=pin.digest, field="size"
            )
        if local is not None:
            local.put_table(pin, data)
    table = DigestTable(data, path=f"{ref.name}@{pin.digest}")
    if table.block_size != pin.block_size:
        raise FormatError(
            f"the table's block size is {table.block_size}, the manifest says {pin.block_size}",
            path=table.path,
            field="header.block_size",
        )
    with _tables_lock:
        _tables[pin.digest] = table
    return table


def fetch_tables(
    client: RegistryClient,
    runner: AsyncRunner,
    ref: Reference,
    pins: list[TablePin],
    local: LocalTables | None = None,
    *,
    parallel: int = 4,
) -> list[DigestTable]:
    """:func:`fetch_table` of every pin of an image's layers, ``parallel`` at a time: opening the
    layers then finds them in the process's table cache instead of fetching one after another."""
    if len(pins) <= 1:
        return [fetch_table(client, runner, ref, p, local) for p in pins]
    with ThreadPoolExecutor(max_workers=min(parallel, len(pins))) as pool:
        return list(pool.map(lambda p: fetch_table(client, runner, ref, p, local), pins))


@dataclass
class _OriginOnly(HostsResolver):
    """A hosts resolver without the mirrors: a refetch goes to the origin (hosts.toml ``server``)."""

    def hosts(self, registry: str) -> HostsConfig:
        return dataclasses.replace(super().hosts(registry), mirrors=())


def origin_fetcher(
    opts: RemoteOptions, ref: Reference, digest: str, size: int, *, http: bool
) -> Callable[[int, int], bytes]:
    """``fetch(offset, length)`` of blob ``digest`` straight from the origin registry of ``ref``,
    past mirrors and the cache, with a client of its own (a refetch is rare)."""

    def fetch(offset: int, length: int) -> bytes:
        insecure: bool | set[str]
        if opts.insecure is True:
            insecure = True
        else:
            insecure = {h.lower() for h in opts.insecure or ()} | ({ref.api_host.lower()} if http else set())
        client = RegistryClient(
            credentials=CredentialResolver(opts.credentials),
            insecure=insecure,
            tls_verify=opts.tls_verify,
            ca_file=opts.ca_file,
            stats=opts.stats,
            hosts=_OriginOnly.from_dirs(opts.hosts_dirs),
            proxy=opts.proxy,
        )
        try:
            return bytes(
                opts.runner.run(client.read_range(ref, digest, offset, length, size=size), REFETCH_TIMEOUT)
            )
        finally:
            opts.runner.run(client.aclose(), 10)

    return fetch


def origin_repair(
    src: Source, opts: RemoteOptions, ref: Reference, digest: str, *, http: bool
) -> OriginRepair:
    """The repair path of blob ``digest`` read through ``src`` (the cache over the registry): evict
    from the cache, refetch from the origin, write a checked copy back (:mod:`obd.verify.repair`)."""
    return OriginRepair(
        src.name,
        digest,
        evict=getattr(src, "evict", None),
        origin=origin_fetcher(opts, ref, digest, src.size, http=http),
        keep=getattr(src, "put", None),
        stats=opts.stats,
        size=src.size,
        align=getattr(src, "page_size", 1),
    )


def open_verified(
    src: Source, opts: RemoteOptions, ref: Reference, digest: str, pin: TablePin, *, http: bool
) -> VerifiedSource:
    """``src`` (blob ``digest`` of ``ref``'s repository, through the cache) checked block by block
    against the table ``pin`` names. A bad cached block is evicted when ``src`` can evict, and the
    good copy from the origin written back when it can store."""
    client = opts.client(ref.api_host if http else None)
    table = fetch_table(client, opts.runner, ref, pin, None if opts.no_cache else LocalTables(opts.cache_dir))
    log.debug(
        "%s: verifying %d blocks of %d bytes against %s",
        src.name,
        table.block_count,
        table.block_size,
        pin.digest,
    )
    return VerifiedSource(
        src, table, digest=digest, stats=opts.stats, repair=origin_repair(src, opts, ref, digest, http=http)
    )


# -- writing tables ------------------------------------------------------------------------------


def table_for_file(path: str, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[bytes, TablePin, str]:
    """``(table bytes, its pin, the blob's digest)`` of the layer blob file at ``path``."""
    data, blob_digest = build_table_file(path, block_size)
    return data, _pin_of(data, block_size), blob_digest


def _pin_of(data: bytes, block_size: int) -> TablePin:
    return TablePin("sha256:" + hashlib.sha256(data).hexdigest(), len(data), block_size)


def add_tables(
    client: RegistryClient,
    runner: AsyncRunner,
    reference: Reference,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    target: str | None = None,
) -> tuple[str, dict[str, TablePin]]:
    """Give an overlaybd image already in a registry digest tables: read each layer blob once
    (its digest checked on the way), push a table per layer, and put the manifest again with the
    pins, under ``target`` (default: the reference's tag). Returns the new manifest digest and the pins.
    Layers that already have a table of ``block_size`` keep it."""
    raw = runner.run(client.fetch_manifest(reference), TABLE_TIMEOUT)
    manifest = raw.json()
    if "layers" not in manifest:
        raise FormatError("not a single-platform image manifest", path=str(reference), field="layers")
    pins: dict[str, TablePin] = {}
    for i, layer in enumerate(manifest["layers"]):
        digest, size = layer["digest"], layer["size"]
        ann = layer.setdefault("annotations", {})
        have = TablePin.from_annotations(ann, path=str(reference), field=f"layers[{i}]")
        if have is not None and have.block_size == block_size:
            pins[digest] = have
            continue

        def read(buf: memoryview, offset: int, digest: str = digest, size: int = size) -> int:
            n = min(len(buf), size - offset)
            buf[:n] = runner.run(client.read_range(reference, digest, offset, n, size=size), TABLE_TIMEOUT)
            return n

        data, blob_digest = build_table(read, size, block_size)
        if blob_digest != digest:
            raise IntegrityError(
                f"the registry's copy of the layer has digest {blob_digest}",
                path=str(reference),
                field=f"layers[{i}]",
                value=digest,
            )
        pin = _pin_of(data, block_size)
        runner.run(client.put_blob(reference, pin.digest, data), TABLE_TIMEOUT)
        ann.update(pin.annotations())
        pins[digest] = pin
    body = json.dumps(manifest, separators=(",", ":")).encode()
    new = runner.run(client.put_manifest(reference, body, raw.media_type, target=target), TABLE_TIMEOUT)
    listed = [(pin, layer) for layer, pin in pins.items()]
    runner.run(push_table_artifact(client, reference, new, len(body), raw.media_type, listed), TABLE_TIMEOUT)
    log.info("%s: digest tables on %d layers; manifest is now %s", reference, len(pins), new)
    return new, pins


#: The OCI empty config of an artifact manifest.
EMPTY_CONFIG = b"{}"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def artifact_tag(manifest_digest: str) -> str:
    """The tag the tables' artifact of image ``manifest_digest`` is kept under."""
    return manifest_digest.replace(":", "-") + ".obd-verify"


def table_artifact(
    manifest_digest: str, manifest_size: int, manifest_type: str, tables: list[tuple[TablePin, str]]
) -> bytes:
    """An OCI artifact manifest listing the tables (``(pin, layer digest)``) with the image as its
    ``subject``: tagged in the repository, it keeps the table blobs referenced, so a registry's
    garbage collection keeps them. Readers never need it (the pins are in the image manifest)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MEDIA_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest(),
            "size": len(EMPTY_CONFIG),
        },
        "layers": [
            {
                "mediaType": MEDIA_TYPE,
                "digest": pin.digest,
                "size": pin.size,
                "annotations": {"io.github.obd.verify.layer": layer, **pin.annotations()},
            }
            for pin, layer in tables
        ],
        "subject": {"mediaType": manifest_type, "digest": manifest_digest, "size": manifest_size},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def push_table_artifact(
    client: RegistryClient,
    reference: Reference,
    manifest_digest: str,
    manifest_size: int,
    manifest_type: str,
    tables: list[tuple[TablePin, str]],
) -> str:
    """Push :func:`table_artifact` (and the empty config) under :func:`artifact_tag`; its digest."""
    empty = "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest()
    if not await client.blob_exists(reference, empty, push=True):
        await client.put_blob(reference, empty, EMPTY_CONFIG)
    body = table_artifact(manifest_digest, manifest_size, manifest_type, tables)
    return await client.put_manifest(reference, body, OCI_MANIFEST, target=artifact_tag(manifest_digest))


__all__ = [
    "MEDIA_TYPE",
    "TablePin",
    "add_tables",
    "artifact_tag",
    "fetch_table",
    "fetch_tables",
    "lower_pin",
    "open_verified",
    "origin_fetcher",
    "origin_repair",
    "push_table_artifact",
    "table_artifact",
    "table_for_file",
]
