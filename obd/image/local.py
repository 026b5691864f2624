"""Assembling stacks from local files: a list of layer blobs, or a ``config.v1.json``.

A *layer* here is what overlaybd accepts as a lower: a sealed LSMT blob, possibly ZFile-compressed,
possibly in the tar envelope; or a turboOCI (warp) meta layer plus its target. An RW layer (the
upper of a config) is opened writable unless ``readonly`` is asked for; an upper with ``target``
is a turboOCI conversion layer (:class:`~obd.lsmt.warp.WarpRWLayer`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from obd.errors import ConfigError, FormatError, UnsupportedError
from obd.image.config import ImageConfig, LowerConfig
from obd.io.source import FileSource, Source
from obd.layer.blob import GZIP_MAGIC, Blob, open_blob, open_source
from obd.lsmt.rw import RWLayer, open_rw
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack
from obd.lsmt.warp import WarpRWLayer, open_warp_rw
from obd.verify.local import sidecar_table
from obd.verify.verifier import VerifiedSource

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions


def open_target(path: str, gzip_index: str | None = None) -> Source:
    """The uncompressed tar stream a warp layer's tag-1 mappings point into. A local file with a
    digest table beside it (a zstd layer's decompressed copy, :func:`obd.verify.local.sidecar_table`)
    is read with every block checked against that table."""
    src: Source = FileSource(path)
    table = sidecar_table(path)
    if table is not None:
        src = VerifiedSource(src, table, digest=table.blob_digest, name=path)
    if gzip_index:
        # lazy: the index readers cost ~6 ms at start-up and only compressed targets need them
        from obd.turbo.zstd import open_seekable

        return open_seekable(src, gzip_index)  # a gzip index, or obd's zstd frame index
    if src.pread(0, 2) == GZIP_MAGIC:
        src.close()
        raise FormatError(
            "turboOCI target is gzip-compressed but no gzip index (gzipIndex) was given",
            path=path,
            field="gzipIndex",
        )
    return src


def open_layer(
    path: str | os.PathLike[str], *, target: str | None = None, gzip_index: str | None = None
) -> SealedLayer:
    """Open one read-only layer blob; with ``target`` it is a turboOCI warp layer."""
    return layer_from_blob(open_blob(path), target=target, gzip_index=gzip_index)


def layer_from_source(source: Source, name: str | None = None) -> SealedLayer:
    """A read-only layer from an already-open source (a remote blob, say): wrappers peeled as usual."""
    try:
        blob = open_source(source, name)
    except BaseException:
        source.close()
        raise
    return layer_from_blob(blob)


def layer_from_blob(blob: Blob, *, target: str | None = None, gzip_index: str | None = None) -> SealedLayer:
    """The sealed layer inside a peeled blob; closes the blob on failure."""
    try:
        if "lsmt" not in blob.kinds:
            raise FormatError(
                f"not an overlaybd layer: found {blob.kind}, expected an LSMT blob "
                "(optionally ZFile-compressed and/or tar-wrapped)",
                path=blob.path,
                field="magic",
            )
        tgt = open_target(target, gzip_index) if target else None
        return SealedLayer(blob.source, warp=tgt is not None, target=tgt, name=blob.path, blob=blob)
    except BaseException:
        blob.close()
        raise


def open_layers(paths: Sequence[str | os.PathLike[str]], *, upper: RWLayer | None = None) -> Stack:
    """A stack of layer files given lowest first."""
    layers: list[SealedLayer] = []
    try:
        for p in paths:
            layers.append(open_layer(p))
        return Stack(layers, upper)
    except BaseException:
        for ly in layers:
            ly.close()
        raise


def _lower_path(cfg: ImageConfig, lower: LowerConfig, i: int) -> str | None:
    """The local file of a lower, or None when it is to be read from the registry."""
    tried = lower.local_candidates()
    for name in tried:
        found = cfg.resolve(name)
        if found:
            return found
    if lower.digest:
        if cfg.repoBlobUrl:
            return None
        raise ConfigError(
            f"no local file for this layer and no repoBlobUrl to fetch registry blob {lower.digest} from",
            path=cfg.path,
            field=f"lowers[{i}]",
        )
    raise ConfigError(
        f"layer file not found (tried {', '.join(tried) or 'nothing: no file or dir given'})",
        path=cfg.path,
        field=f"lowers[{i}].file",
    )


def _open_warp_upper(cfg: ImageConfig, data: str, index: str | None, *, readonly: bool) -> WarpRWLayer:
    """A turboOCI conversion upper: ``data`` is the fs-meta file, ``target`` the layer being converted."""
    if not index:
        raise ConfigError(
            "upper index file not found", path=cfg.path, field="upper.index", value=cfg.upper.index
        )
    target = cfg.resolve(cfg.upper.target)
    if not target:
        raise ConfigError(
            "turboOCI target file not found", path=cfg.path, field="upper.target", value=cfg.upper.target
        )
    gz = None
    if cfg.upper.gzipIndex:
        gz = cfg.resolve(cfg.upper.gzipIndex)
        if not gz:
            raise ConfigError(
                "gzip index not found", path=cfg.path, field="upper.gzipIndex", value=cfg.upper.gzipIndex
            )
    return open_warp_rw(index, data, target=open_target(target, gz), readonly=readonly)


def _remote_target_layer(
    cfg: ImageConfig, lower: LowerConfig, path: str, i: int, remote: RemoteOptions | None
) -> SealedLayer:
    """A local turboOCI meta layer whose target is a registry blob (``targetDigest``, a plain image's
    layer): file data is read with Range requests, through ``gzipIndex`` for a gzip layer."""
    if not cfg.repoBlobUrl:
        raise ConfigError(
            "turboOCI target is a registry blob but the config has no repoBlobUrl",
            path=cfg.path,
            field=f"lowers[{i}].targetDigest",
            value=lower.targetDigest,
        )
    gz = None
    if lower.gzipIndex:
        gz = cfg.resolve(lower.gzipIndex)
        if not gz:
            raise ConfigError(
                "gzip index not found", path=cfg.path, field=f"lowers[{i}].gzipIndex", value=lower.gzipIndex
            )
    # lazy: obd.image.remote costs ~80 ms to import, the index readers ~6 ms
    from obd.image.remote import default_remote_options, open_remote_blob
    from obd.turbo.zstd import open_seekable
    from obd.verify.pins import lower_pin

    remote = remote or default_remote_options()
    pin = lower_pin(cfg, lower.targetDigest, remote.verify)
    size = lower.size or None  # known: no HEAD request
    src = open_remote_blob(cfg.repoBlobUrl, lower.targetDigest, size, remote, path=cfg.path, table=pin)
    target: Source
    if lower.gzipIndexDigest and not gz:
        target = _remote_gzip_index(cfg, lower, src, remote)
    else:
        target = open_seekable(src, gz) if gz else src  # gzip or zstd frame index; closes src on failure
    try:
        blob = open_blob(path)
    except BaseException:
        target.close()
        raise
    try:
        return SealedLayer(blob.source, warp=True, target=target, name=blob.path, blob=blob)
    except BaseException:
        target.close()
        blob.close()
        raise


def _remote_gzip_index(cfg: ImageConfig, lower: LowerConfig, src: Source, remote: RemoteOptions) -> Source:
    """The tar stream of gzip blob ``src`` through a ``gzip.meta`` that is itself a registry blob,
    read by ranges (header and entries now, windows when first needed) and verified like a layer
    (:mod:`obd.turbo.parts`). ``src`` is closed on failure."""
    from obd.formats.gzindex import GzipIndexedSource
    from obd.image.remote import open_remote_blob
    from obd.verify.pins import lower_pin

    try:
        pin = lower_pin(cfg, lower.gzipIndexDigest, remote.verify)
        digest, size = lower.gzipIndexDigest, lower.gzipIndexSize or None
        index = open_remote_blob(cfg.repoBlobUrl, digest, size, remote, path=cfg.path, table=pin)
    except BaseException:
        src.close()
        raise
    try:
        return GzipIndexedSource(src, index)
    except BaseException:
        index.close()
        src.close()
        raise


def open_config(
    config: str | os.PathLike[str] | ImageConfig,
    *,
    readonly: bool = False,
    remote: RemoteOptions | None = None,
) -> Stack:
    """The device a ``config.v1.json`` describes: its lowers, plus its upper unless ``readonly``.

    Lowers with no local file but a ``digest`` are read lazily from ``repoBlobUrl`` through the
    persistent cache, with ``remote`` (default: :func:`~obd.image.remote.default_remote_options`).
    """
    cfg = config if isinstance(config, ImageConfig) else ImageConfig.load(config)
    lowers = list(cfg.lowers)
    if cfg.accelerationLayer and lowers:
        lowers = lowers[:-1]  # the last lower is a trace layer, not part of the device
    layers: list[SealedLayer] = []
    upper: RWLayer | None = None
    fetched: dict[int, SealedLayer] = {}
    try:
        registry = [(i, lw) for i, lw in enumerate(lowers) if _lower_path(cfg, lw, i) is None]
        for i, lower in registry:
            if lower.is_warp:
                raise UnsupportedError(
                    "turboOCI layers are not read from registries yet", path=cfg.path, field=f"lowers[{i}]"
                )
        if registry:
            # lazy: obd.image.remote costs ~80 ms to import, needed only for registry layers
            from obd.image.remote import default_remote_options, open_registry_layers

            fetched = open_registry_layers(cfg, registry, remote or default_remote_options())  # concurrently
        for i, lower in enumerate(lowers):
            if i in fetched:
                layers.append(fetched.pop(i))
                continue
            path = _lower_path(cfg, lower, i)
            assert path is not None
            target = None
            gz = None
            if lower.targetFile:
                target = cfg.resolve(lower.targetFile)
                if not target:
                    raise ConfigError(
                        "turboOCI target file not found",
                        path=cfg.path,
                        field=f"lowers[{i}].targetFile",
                        value=lower.targetFile,
                    )
                if lower.gzipIndex:
                    gz = cfg.resolve(lower.gzipIndex)
                    if not gz:
                        raise ConfigError(
                            "gzip index not found",
                            path=cfg.path,
                            field=f"lowers[{i}].gzipIndex",
                            value=lower.gzipIndex,
                        )
            elif lower.targetDigest:
                layers.append(_remote_target_layer(cfg, lower, path, i, remote))
                continue
            layers.append(open_layer(path, target=target, gzip_index=gz))
        if cfg.upper.enabled:
            data = cfg.resolve(cfg.upper.data)
            index = cfg.resolve(cfg.upper.index)
            if not data:
                raise ConfigError(
                    "upper data file not found", path=cfg.path, field="upper.data", value=cfg.upper.data
                )
            if cfg.upper.target:
                upper = _open_warp_upper(cfg, data, index, readonly=readonly)
            else:
                upper = open_rw(data, index, readonly=readonly)
        return Stack(layers, upper, name=cfg.path)
    except BaseException:
        for ly in [*layers, *fetched.values()]:
            ly.close()
        if upper is not None:
            upper.close()
        raise
