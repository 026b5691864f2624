"""``obd convert``: an OCI/Docker image in, an overlaybd image out (docs/formats.md §7.1).

As accelerated-container-image's userspace convertor does, each source layer becomes one overlaybd
layer: its tar is applied to the ext4 file system of the layers below it (the stock base layer, or a
fresh ``mkfs``) and the blocks it changed are committed as a tar-wrapped ZFile whose uuid (and parent
uuid) derive from the chain id. The new manifest lists the layers with the uncompressed-tar media type
and the ``containerd.io/snapshot/overlaybd/*`` annotations, the base layer first when one was used;
the config keeps everything of the source (history included) but ``rootfs.diff_ids``, which become
the layer digests.

Converted layers are cached by chain id (:mod:`obd.convert.cache`), so a second image on the same
base layers downloads and applies only what is new.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from obd.cache.store import default_cache_dir
from obd.convert.cache import ConvertCache, cache_key
from obd.convert.layer import BuiltLayer, DeviceBuilder, LayerStats
from obd.convert.layertar import Spool, TarLimits, open_stream, read_layer
from obd.convert.push import push_converted
from obd.convert.source import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    SourceImage,
    Transport,
    open_source,
    parse_transport,
)
from obd.errors import ConfigError, FormatError, UnsupportedError
from obd.image.local import open_layer
from obd.image.remote import RemoteOptions, default_remote_options
from obd.layer.baselayer import BASE_SHA256, base_layer_blob, base_layer_path
from obd.layer.tools import OutputOptions
from obd.observability.progress import Progress, ProgressFactory
from obd.oci.layout import write_layout
from obd.oci.model import BLOB_DIGEST, BLOB_SIZE, VERSION
from obd.registry.reference import parse_reference
from obd.verify.format import DEFAULT_BLOCK_SIZE as DEFAULT_TABLE_BLOCK
from obd.verify.format import check_block_size
from obd.verify.pins import TablePin
from obd.verify.table import table_for_file

log = logging.getLogger(__name__)

GiB = 1 << 30
#: What ``containerd.io/snapshot/overlaybd/version`` says on converted layers.
OVERLAYBD_VERSION = "0.1.0"
ALGORITHMS = ("lz4", "zstd")


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert. ``vsize_gb`` only applies with ``mkfs`` (the base layer is 64 GiB)."""

    fstype: str = "ext4"
    mkfs: bool = False
    vsize_gb: int | None = None
    algorithm: str = "lz4"
    block_size: int = 4096
    oci: bool = False
    platform: str | None = None
    cache_dir: str | None = None  # the obd cache root; None: $OBD_CACHE_DIR / ~/.cache/obd
    use_cache: bool = True
    check: bool = True  # e2fsck -fn the file system after each layer
    workdir: str | None = None  # where scratch files go (default: the system temp dir)
    mount: bool = True  # ask the destination registry to mount blobs it has in the source repository
    #: block size of the per-layer digest tables the manifest pins (docs/verify.md); 0: write none
    verify_block_size: int = DEFAULT_TABLE_BLOCK

    def validate(self) -> None:
        if self.fstype != "ext4":
            raise UnsupportedError(
                f"file system {self.fstype!r}: only ext4 is built (erofs is for turboOCI layers)",
                field="fstype",
                value=self.fstype,
            )
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {', '.join(ALGORITHMS)}", field="algorithm")
        bs = self.block_size
        if bs & (bs - 1) or not 4096 <= bs <= 65536:
            raise ConfigError("ZFile block size must be 4, 8, 16, 32 or 64 KiB", field="bs", value=bs)
        if not self.mkfs and self.vsize_gb not in (None, 64):
            raise ConfigError(
                "the base layer is a 64 GiB file system: --vsize needs --mkfs",
                field="vsize",
                value=self.vsize_gb,
            )
        if self.verify_block_size:
            check_block_size(self.verify_block_size, path="--verify-block-size")
        if self.vsize_gb is not None and not 1 <= self.vsize_gb <= 16384:
            raise ConfigError("virtual size must be 1 to 16384 GiB", field="vsize", value=self.vsize_gb)

    @property
    def vsize(self) -> int:
        return (self.vsize_gb or 64) * GiB

    def settings(self) -> dict[str, Any]:
        """What goes into the conversion cache key: every setting that changes a layer's bytes."""
        return {
            "fs": self.fstype,
            "lower": "mkfs" if self.mkfs else f"base:{BASE_SHA256}",
            "vsize": self.vsize,
            "algorithm": self.algorithm,
            "block_size": self.block_size,
        }


@dataclass
class ConvertedLayer:
    """One layer of the result, in manifest order."""

    digest: str
    size: int
    media_type: str
    path: str
    source_digest: str | None  # None for the base layer
    chain_id: str | None
    uuid: str | None
    cached: bool = False
    stats: LayerStats | None = None
    table: TablePin | None = None  # the layer's digest table, pinned by an annotation

    def descriptor(self) -> dict[str, Any]:
        annotations = {BLOB_DIGEST: self.digest, BLOB_SIZE: str(self.size), VERSION: OVERLAYBD_VERSION}
        if self.table is not None:
            annotations.update(self.table.annotations())
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "annotations": annotations,
        }


@dataclass
class ConvertResult:
    source: str
    destination: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[ConvertedLayer]
    download_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    pushed: Any = None  # obd.registry.push.PushResult for registry destinations


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain ids: ``chain(0) = diff_id(0)``, ``chain(n) = sha256(chain(n-1) + " " + diff_id(n))``."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def chain_uuid(chain_id: str) -> str:
    """The convertor's ``chainIDtoUUID``: the first 32 hex digits of the chain id, 8-4-4-4-12."""
    h = chain_id.split(":", 1)[1]
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _media_types(oci: bool) -> tuple[str, str, str]:
    return (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER) if oci else (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)


def _quiet(label: str, total: int | None) -> Progress:
    return Progress(label, total, quiet=True)


def build_manifest(
    source: SourceImage, layers: list[ConvertedLayer], *, oci: bool
) -> tuple[bytes, bytes, dict[str, Any], dict[str, Any]]:
    """``(manifest bytes, config bytes, manifest, config)`` of the converted image."""
    manifest_type, config_type, _ = _media_types(oci)
    config = copy.deepcopy(source.config)
    rootfs = dict(config.get("rootfs") or {})
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = [layer.digest for layer in layers]
    config["rootfs"] = rootfs
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {
            "mediaType": config_type,
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "size": len(config_bytes),
        },
        "layers": [layer.descriptor() for layer in layers],
    }
    if source.manifest_annotations and oci:
        manifest["annotations"] = dict(source.manifest_annotations)
    return json.dumps(manifest, separators=(",", ":")).encode(), config_bytes, manifest, config


def convert_image(
    src: str | Transport,
    dst: str | Transport,
    options: ConvertOptions = ConvertOptions(),
    *,
    remote: RemoteOptions | None = None,
    progress: ProgressFactory | None = None,
) -> ConvertResult:
    """Convert image ``src`` into an overlaybd image at ``dst`` (transport syntax, see
    :func:`~obd.convert.source.parse_transport`); return what was written."""
    options.validate()
    source_t = parse_transport(src) if isinstance(src, str) else src
    dest_t = parse_transport(dst) if isinstance(dst, str) else dst
    if dest_t.kind == "docker-archive":
        raise UnsupportedError("docker-archive: is a source only; write to oci:DIR or a registry")
    if dest_t.kind == "docker":
        parse_reference(dest_t.location)  # a bad destination fails before any work
    bar = progress or _quiet
    if remote is None and "docker" in (source_t.kind, dest_t.kind):
        remote = default_remote_options()
    cache_root = options.cache_dir
    if cache_root is None:
        cache_root = str(default_cache_dir())
    cache = ConvertCache(cache_root if options.use_cache else None)
    timings: dict[str, float] = {}
    work = tempfile.mkdtemp(prefix="obd-convert-", dir=options.workdir)
    try:
        t0 = time.monotonic()
        source = open_source(source_t, remote=remote, platform=options.platform, workdir=work)
        if not source.layers:
            raise FormatError("the image has no layers", path=source.name)
        timings["resolve"] = time.monotonic() - t0
        result = _convert(source, dest_t, options, cache, cache_root, work, bar, timings, remote)
        result.source = str(source_t)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(
    source: SourceImage,
    dest: Transport,
    options: ConvertOptions,
    cache: ConvertCache,
    cache_root: str,
    work: str,
    bar: ProgressFactory,
    timings: dict[str, float],
    remote: RemoteOptions | None,
) -> ConvertResult:
    _, _, layer_type = _media_types(options.oci)
    chains = chain_ids([layer.diff_id for layer in source.layers])
    uuids = [chain_uuid(c) for c in chains]
    settings = options.settings()
    keys = [cache_key(c, settings) for c in chains]
    hits = [cache.get(k) for k in keys]
    # a layer is needed only if it, or a layer above it, misses the cache
    last_miss = max((i for i, h in enumerate(hits) if h is None), default=-1)
    need = [i for i in range(last_miss + 1) if hits[i] is None]

    t0 = time.monotonic()
    download_total = sum(source.layers[i].size for i in need)
    blobs: dict[int, str] = {}
    if need:
        with bar("download", download_total) as p:
            blobs = source.fetch(need, work, p.advance)
    timings["download"] = time.monotonic() - t0

    converted: list[ConvertedLayer] = []
    base_path = None if options.mkfs else str(base_layer_path(cache_root))
    builder = DeviceBuilder(
        work,
        base_layer=base_path,
        vsize=options.vsize,
        output=OutputOptions(compress=options.algorithm, block_size=options.block_size, tar=True),
        fs_uuid=uuids[0],
        check=options.check,
    )
    st = os.statvfs(work)
    # keep room for the device's working copy and the committed layer next to the spool
    limits = TarLimits(max_bytes=options.vsize, max_spool=max(0, st.f_bavail * st.f_frsize // 2))
    t0 = time.monotonic()
    try:
        with bar("convert", sum(source.layers[i].size for i in need)) if need else _quiet("", None) as p:
            for i, layer in enumerate(source.layers):
                parent = uuids[i - 1] if i else None
                hit = hits[i]
                if hit is not None:
                    if i < last_miss:  # a layer above is to be built on it
                        builder.add_existing(hit.path)
                    conv = _layer(hit.path, hit.digest, hit.size, layer_type, layer, chains[i], uuids[i])
                    conv.cached = True
                    converted.append(conv)
                    continue
                base_done = p.done
                built = _build_one(source, i, blobs[i], work, builder, limits, uuids[i], parent, p)
                p.update(base_done + layer.size)
                meta = {
                    "digest": built.digest,
                    "size": built.size,
                    "uuid": uuids[i],
                    "parent_uuid": parent,
                    "chain_id": chains[i],
                    "diff_id": layer.diff_id,
                    "source_digest": layer.digest,
                    "settings": options.settings(),
                }
                entry = cache.put(keys[i], built.path, meta)
                if cache.enabled:
                    # later layers are stacked on the cached copy (the work copy moved there)
                    builder.lowers[-1].close()
                    builder.lowers[-1] = _reopen(entry.path)
                conv = _layer(entry.path, built.digest, built.size, layer_type, layer, chains[i], uuids[i])
                conv.stats = built.stats
                converted.append(conv)
                log.info(
                    "layer %d: %d entries, %d bytes changed, blob %d bytes",
                    i,
                    built.stats.entries,
                    built.stats.changed_bytes,
                    built.size,
                )
    finally:
        builder.close()
    timings["convert"] = time.monotonic() - t0

    if not options.mkfs:
        path, digest, size = base_layer_blob(cache_root)
        base = ConvertedLayer(digest, size, layer_type, str(path), None, None, None, cached=True)
        converted.insert(0, base)
    tables = _digest_tables(converted, options.verify_block_size)
    manifest_bytes, config_bytes, manifest, config = build_manifest(source, converted, oci=options.oci)
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    t0 = time.monotonic()
    result = ConvertResult(
        source="",
        destination=str(dest),
        manifest_digest=manifest_digest,
        manifest=manifest,
        config=config,
        layers=converted,
        download_bytes=download_total,
        seconds=timings,
    )
    blob_list: list[tuple[str, str | bytes]] = [(c.digest, c.path) for c in converted]
    blob_list.append((manifest["config"]["digest"], config_bytes))
    blob_list += tables
    if dest.kind == "oci":
        platform = {"os": config.get("os", "linux"), "architecture": config.get("architecture", "amd64")}
        if config.get("variant"):
            platform["variant"] = config["variant"]
        write_layout(
            dest.location,
            manifest=manifest_bytes,
            media_type=manifest["mediaType"],
            blobs=blob_list,
            tag=dest.tag,
            platform=platform,
        )
    else:
        assert remote is not None
        mount_from = None
        if options.mount and source.registry is not None:
            dref = parse_reference(dest.location)
            if dref.registry == source.registry.registry and dref.repository != source.registry.repository:
                mount_from = source.registry.repository
        result.pushed = push_converted(
            remote,
            dest.location,
            blob_list,
            manifest_bytes,
            manifest["mediaType"],
            mount_from=mount_from,
            progress=bar,
            tables=[(c.table, c.digest) for c in converted if c.table is not None],
        )
    timings["write"] = time.monotonic() - t0
    return result


def _build_one(
    source: SourceImage,
    i: int,
    blob: str,
    work: str,
    builder: DeviceBuilder,
    limits: TarLimits,
    uuid: str,
    parent: str | None,
    p: Progress,
) -> BuiltLayer:
    """Read source layer ``i`` from ``blob``, check its diff_id, apply and commit it."""
    layer = source.layers[i]
    stats = LayerStats()
    spool_dir = os.path.join(work, f"spool-{i}")
    os.mkdir(spool_dir)
    spool = Spool.auto(spool_dir)
    base_done = p.done
    try:
        ts = time.monotonic()
        stream, raw, compression = open_stream(blob)
        try:
            parsed = read_layer(
                stream,
                spool,
                name=f"{source.name} layer {i} ({layer.digest})",
                compression=compression,
                limits=limits,
                progress=lambda: p.update(base_done + raw.tell()),
            )
        finally:
            stream.close()
            raw.close()
        stats.read_seconds = time.monotonic() - ts
        if parsed.diff_id != layer.diff_id:
            raise FormatError(
                f"layer {i} unpacks to {parsed.diff_id}, but the config says {layer.diff_id}",
                path=source.name,
                field=f"config.rootfs.diff_ids[{i}]",
            )
        if blob.startswith(work):
            os.unlink(blob)  # a download, no longer needed
        out = os.path.join(work, f"layer-{i}.commit")
        return builder.build(parsed, spool_dir, out, uuid=uuid, parent_uuid=parent, stats=stats)
    finally:
        spool.cleanup()
        shutil.rmtree(spool_dir, ignore_errors=True)


def _digest_tables(layers: list[ConvertedLayer], block_size: int) -> list[tuple[str, str | bytes]]:
    """Give each layer its digest table (``layer.table``); the tables as ``(digest, bytes)`` blobs."""
    if not block_size:
        return []
    out: list[tuple[str, str | bytes]] = []
    for layer in layers:
        data, pin, blob_digest = table_for_file(layer.path, block_size)
        if blob_digest != layer.digest:
            raise FormatError(f"layer file has digest {blob_digest}", path=layer.path, value=layer.digest)
        layer.table = pin
        out.append((pin.digest, data))
    return out


def _layer(
    path: str, digest: str, size: int, media_type: str, source: Any, chain: str, uuid: str
) -> ConvertedLayer:
    return ConvertedLayer(digest, size, media_type, path, source.digest, chain, uuid)


def _reopen(path: str) -> Any:
    return open_layer(path)


__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "ConvertedLayer",
    "build_manifest",
    "chain_ids",
    "chain_uuid",
    "convert_image",
]
