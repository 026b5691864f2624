"""Digest tables for images already in a registry, unchanged (``obd index``; docs/verify.md).

An image whose manifest pins no tables keeps its manifest digest: the tables are built by streaming
each layer blob once (its sha256 checked on the way, so a table is exactly as good as the digest the
manifest pins) and kept in the :class:`~obd.verify.local.LocalTables` store. ``--push`` publishes
them for other machines in an OCI artifact whose ``subject`` is the image manifest: for a plain
image inside its index artifact (:mod:`obd.turbo.artifact`), for an overlaybd image as a table
artifact, both found by the OCI 1.1 referrers API or, on registries without it, the referrers tag
fallback ``sha256-<manifest hex>`` (:mod:`obd.verify.referrers`). That link is weak, so
a reader takes tables from it only with ``--allow-referrers`` — the rule the turbo index follows.

The chain of trust is then: manifest digest → artifact (its ``subject`` checked) → table digest
(each layer descriptor of the artifact) → every block.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from obd.errors import FormatError, IntegrityError
from obd.observability.progress import Progress
from obd.oci.model import TURBO_TARGET_DIGEST, Image
from obd.registry.http import NotFoundError
from obd.registry.reference import Reference
from obd.verify.format import DEFAULT_BLOCK_SIZE, MEDIA_TYPE, build_table
from obd.verify.local import LocalTables
from obd.verify.pins import TablePin, layer_pins
from obd.verify.referrers import fallback_tag, referrer_descriptors
from obd.verify.table import OCI_MANIFEST, TABLE_TIMEOUT, fetch_tables, push_table_artifact

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions
    from obd.registry.client import RegistryClient

log = logging.getLogger("obd.verify")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: Annotation naming, on each table of an artifact, the layer blob it covers.
LAYER_ANNOTATION = "io.github.obd.verify.layer"
#: Layers streamed at once while building tables.
PARALLEL = 4
#: Bytes per ranged GET while a layer is streamed.
PIECE = 4 << 20


def _client(opts: RemoteOptions, ref: Reference) -> RegistryClient:
    return opts.client(ref.api_host if opts.is_http(ref.api_host) else None)


def build_layer_tables(
    ref: Reference,
    layers: Iterable[tuple[str, int]],
    opts: RemoteOptions,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    quiet: bool = False,
) -> dict[str, TablePin]:
    """The tables of the layer blobs ``(digest, size)`` of ``ref``'s repository: those kept already,
    the others built by streaming each blob once (several at a time), its digest checked, and kept."""
    local = LocalTables(opts.cache_dir)
    todo = []
    pins: dict[str, TablePin] = {}
    for digest, size in layers:
        have = local.pin(digest)
        if have is not None and have.block_size == block_size:
            pins[digest] = have
        else:
            todo.append((digest, size))
    if not todo:
        return pins
    client = _client(opts, ref)
    total = sum(size for _, size in todo)
    with Progress(f"digest tables of {len(todo)} layers", total, quiet=quiet) as progress:

        def one(job: tuple[str, int]) -> tuple[str, TablePin]:
            digest, size = job

            def read(buf: memoryview, offset: int) -> int:
                n = min(len(buf), size - offset)
                buf[:n] = opts.runner.run(client.read_range(ref, digest, offset, n, size=size), TABLE_TIMEOUT)
                progress.advance(n)
                return n

            data, got = build_table(read, size, block_size)
            if got != digest:
                raise IntegrityError(
                    f"the registry's copy of the layer has digest {got}",
                    path=str(ref),
                    field="layer",
                    value=digest,
                )
            return digest, local.put(digest, data, block_size)

        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(todo))) as pool:
            for digest, pin in pool.map(one, todo):
                pins[digest] = pin
    log.info("%s: digest tables built for %d layers (%d bytes of layers)", ref, len(todo), total)
    return pins


def table_bytes(opts: RemoteOptions, pins: Mapping[str, TablePin]) -> dict[str, tuple[TablePin, bytes]]:
    """``{layer digest: (pin, table bytes)}`` of kept tables, to push."""
    local = LocalTables(opts.cache_dir)
    out = {}
    for digest, pin in pins.items():
        data = local.get_table(pin)
        if data is None:
            raise IntegrityError(
                "the kept digest table is missing or damaged", path=pin.digest, field="table"
            )
        out[digest] = (pin, data)
    return out


async def push_linked_tables(
    client: RegistryClient, ref: Reference, image: Image, tables: Mapping[str, tuple[TablePin, bytes]]
) -> str:
    """Push the tables of an overlaybd image's layers and the table artifact that lists them (subject:
    the image), and link it with the referrers tag fallback; the artifact's digest."""
    for pin, data in tables.values():
        if not await client.blob_exists(ref, pin.digest, push=True):
            await client.put_blob(ref, pin.digest, data)
    raw = await client.fetch_manifest(ref, image.manifest_digest)
    listed = [(pin, layer) for layer, (pin, _) in tables.items()]
    digest = await push_table_artifact(
        client, ref, image.manifest_digest, len(raw.data), raw.media_type, listed
    )
    body = (await client.fetch_manifest(ref, digest)).data
    tag = fallback_tag(image.manifest_digest)
    try:
        current = (await client.fetch_manifest(ref, tag)).json()
        entries = [d for d in current.get("manifests", []) if d.get("artifactType") != MEDIA_TYPE]
    except NotFoundError:
        entries = []
    entries.append(
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": MEDIA_TYPE}
    )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, separators=(",", ":")
    )
    await client.put_manifest(ref, index.encode(), OCI_INDEX, target=tag)
    return digest


def _bad(ref: Reference, field: str, message: str, value: object = None) -> FormatError:
    return FormatError(f"digest-table artifact: {message}", path=str(ref), field=field, value=value)


async def fetch_linked_tables(
    client: RegistryClient, ref: Reference, image: Image, local: LocalTables
) -> dict[str, TablePin]:
    """The tables the table artifact referring to ``image`` lists (found by the referrers API, else
    the tag fallback), checked (subject, digests, the blob each covers) and kept in ``local``; ``{}``
    when there is none."""
    found = await referrer_descriptors(client, ref, image.manifest_digest, MEDIA_TYPE)
    if not found:
        return {}
    manifest = (await client.fetch_manifest(ref, found[-1]["digest"])).json()
    subject = (manifest.get("subject") or {}).get("digest")
    if subject != image.manifest_digest:
        raise _bad(ref, "subject.digest", "refers to another image", subject)
    return await fetch_listed_tables(client, ref, manifest.get("layers") or [], image, local)


async def fetch_listed_tables(
    client: RegistryClient, ref: Reference, descs: list[Any], image: Image, local: LocalTables
) -> dict[str, TablePin]:
    """Fetch and keep the tables that artifact layer descriptors ``descs`` pin, each naming the image
    layer it covers (:data:`LAYER_ANNOTATION`, or turboOCI's target digest)."""
    layers = {d.digest for d in image.layers}
    pins: dict[str, TablePin] = {}
    for i, desc in enumerate(descs):
        ann = (desc.get("annotations") if isinstance(desc, dict) else None) or {}
        pin = TablePin.from_annotations(ann, path=str(ref), field=f"layers[{i}]")
        if pin is None:
            continue
        layer = ann.get(LAYER_ANNOTATION) or ann.get(TURBO_TARGET_DIGEST)
        if layer not in layers:
            raise _bad(ref, f"layers[{i}].annotations", "the table covers no layer of the image", layer)
        data = local.get_table(pin)
        if data is None:
            data = await client.get_blob(ref, pin.digest, max_bytes=pin.size)
        pins[layer] = local.put(layer, data, pin.block_size)  # checks the table covers that blob
    return pins


def fetch_manifest_tables(
    ref: Reference, layers: Iterable[tuple[str, Mapping[str, str]]], opts: RemoteOptions
) -> None:
    """The tables the manifest's own ``(digest, annotations)`` layers pin, fetched into the
    process's table cache and the local store, before :func:`image_table_pins` asks for them (a
    resolve starts this with the manifest, beside the config's fetch)."""
    pins = layer_pins(layers, path=str(ref))
    if pins and opts.verify != "off":
        local = None if opts.no_cache else LocalTables(opts.cache_dir)
        fetch_tables(_client(opts, ref), opts.runner, ref, list(pins.values()), local)


def image_table_pins(
    ref: Reference, image: Image, opts: RemoteOptions, digests: Iterable[str]
) -> dict[str, TablePin]:
    """The pins to verify layers ``digests`` of ``image`` with: the manifest's own first, then tables
    kept locally, then (with ``opts.allow_referrers``, for layers still without one) those of the
    table artifact linked to the image."""
    wanted = list(digests)
    pins = layer_pins(((d.digest, d.annotations) for d in image.layers), path=image.reference)
    if opts.verify == "off":
        return pins
    local = LocalTables(opts.cache_dir)
    missing = [d for d in wanted if d not in pins]
    pins.update(local.pins(missing))
    missing = [d for d in missing if d not in pins]
    if missing and opts.allow_referrers:
        linked = opts.runner.run(fetch_linked_tables(_client(opts, ref), ref, image, local), TABLE_TIMEOUT)
        pins.update({d: p for d, p in linked.items() if d in missing})
    used = [pins[d] for d in wanted if d in pins]
    fetch_tables(_client(opts, ref), opts.runner, ref, used, None if opts.no_cache else local)  # at once
    return pins


__all__ = [
    "LAYER_ANNOTATION",
    "build_layer_tables",
    "fallback_tag",
    "fetch_linked_tables",
    "fetch_listed_tables",
    "fetch_manifest_tables",
    "image_table_pins",
    "push_linked_tables",
    "table_bytes",
]
