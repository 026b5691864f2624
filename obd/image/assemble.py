"""Assembling overlaybd images and pushing them: manifests and configs around layer blobs.

:mod:`obd.registry.push` moves bytes (blobs, manifests, whole layouts) without knowing what they
mean; this module knows what an overlaybd image is: the layer annotations overlaybd's convertor
writes (docs/formats.md §7.1), the config ``obd run`` starts from, and acceleration layers (a
prefetch trace as the top layer, as ``ctr record-trace`` adds it, §7.3).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from obd.errors import ConfigError
from obd.image.accel import trace_layer_tar
from obd.oci.layout import file_digest
from obd.oci.model import ACCELERATION_LAYER, BLOB_DIGEST, BLOB_SIZE, VERSION
from obd.registry.client import OCI_MANIFEST, RegistryClient
from obd.registry.push import OCI_CONFIG, OCI_LAYER_TAR, PushResult, push_blob, push_manifest
from obd.registry.reference import Reference, parse_reference

#: The value overlaybd's convertor writes for ``containerd.io/snapshot/overlaybd/version``.
OVERLAYBD_VERSION = "0.1.0"


async def push_trace_image(
    client: RegistryClient,
    source: Reference | str,
    trace: bytes,
    dest: Reference | str,
    *,
    platform: str | None = None,
) -> PushResult:
    """Push overlaybd image ``source`` again as ``dest`` (same repository, another tag) with an
    acceleration layer holding ``trace`` on top, as ``ctr record-trace`` does (docs/formats.md §7.3).

    An acceleration layer the source already has is replaced. The config gets the layer's
    ``diff_id`` (and a history entry when it keeps a history); every other byte of the source's
    config and manifest is kept. Clients that know acceleration layers (obd, the overlaybd
    snapshotter) replay the trace when they open the image.
    """
    src = source if isinstance(source, Reference) else parse_reference(source)
    dst = dest if isinstance(dest, Reference) else parse_reference(dest)
    if (src.registry, src.repository) != (dst.registry, dst.repository):
        raise ConfigError(
            f"the destination must be another tag of {src.registry}/{src.repository}",
            field="destination",
            value=str(dst),
        )
    image = await client.get_image(src, platform)
    layers = image.overlaybd_layers()  # refuses a plain image
    raw = await client.fetch_manifest(src, image.manifest_digest)
    manifest = raw.json()
    config = dict(image.config)
    rootfs = dict(config.get("rootfs") or {})
    diff_ids = list(rootfs.get("diff_ids") or [])
    descs = list(manifest["layers"])
    if layers and layers[-1].is_acceleration:
        descs.pop()
        if len(diff_ids) > len(descs):
            diff_ids.pop()
    blob = trace_layer_tar(trace)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    docker = raw.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    descs.append(
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar" if docker else OCI_LAYER_TAR,
            "digest": digest,
            "size": len(blob),
            "annotations": {
                ACCELERATION_LAYER: "yes",
                BLOB_DIGEST: digest,
                BLOB_SIZE: str(len(blob)),
                VERSION: OVERLAYBD_VERSION,
            },
        }
    )
    rootfs["diff_ids"] = [*diff_ids, digest]
    config["rootfs"] = rootfs
    if isinstance(config.get("history"), list):
        config["history"] = [
            *config["history"],
            {"created_by": "obd trace attach", "comment": "acceleration layer"},
        ]
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    manifest["config"] = {
        **manifest["config"],
        "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
        "size": len(config_bytes),
    }
    manifest["layers"] = descs
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    result = PushResult(str(dst), "", raw.media_type)
    for blob_digest, data in ((digest, blob), (manifest["config"]["digest"], config_bytes)):
        fate = await push_blob(client, dst, blob_digest, data)
        {"exists": result.existing, "mounted": result.mounted, "uploaded": result.uploaded}[fate].append(
            blob_digest
        )
    result.digest = await push_manifest(client, dst, manifest_bytes, raw.media_type)
    return result


def layers_image(
    layers: list[tuple[str, int]],
    *,
    overlaybd: bool = True,
    layer_media_type: str = OCI_LAYER_TAR,
    annotations: dict[str, str] | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
    config: dict[str, Any] | None = None,
) -> tuple[bytes, bytes]:
    """``(manifest, config)`` bytes of an OCI image around existing blobs ``(digest, size)``, lowest first.

    With ``overlaybd`` each layer carries the annotations overlaybd's convertor writes (blob-digest,
    blob-size, version; docs/formats.md §7.1) so the image is recognised as an overlaybd image; the layer
    media type says "uncompressed tar", so the config's ``diff_ids`` are the blob digests.
    ``config`` is the image config's ``config`` object (how to run it: ``Entrypoint``, ``Cmd``,
    ``Env``, ``WorkingDir``, ``User``...); empty by default.
    """
    image_config = {
        "architecture": platform[1],
        "os": platform[0],
        "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
        "config": dict(config or {}),
    }
    config_bytes = json.dumps(image_config, separators=(",", ":"), sort_keys=True).encode()
    descs = []
    for digest, size in layers:
        layer: dict[str, Any] = {"mediaType": layer_media_type, "digest": digest, "size": size}
        ann = dict(annotations or {})
        if overlaybd:
            ann.setdefault(BLOB_DIGEST, digest)
            ann.setdefault(BLOB_SIZE, str(size))
            ann.setdefault(VERSION, OVERLAYBD_VERSION)
        if ann:
            layer["annotations"] = ann
        descs.append(layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "size": len(config_bytes),
        },
        "layers": descs,
    }
    return json.dumps(manifest, separators=(",", ":")).encode(), config_bytes


def single_layer_image(layer_digest: str, layer_size: int, **kw: Any) -> tuple[bytes, bytes]:
    """:func:`layers_image` of one blob."""
    return layers_image([(layer_digest, layer_size)], **kw)


async def push_files_image(
    client: RegistryClient,
    paths: list[str | os.PathLike[str]],
    dest: Reference | str,
    *,
    overlaybd: bool = True,
    annotations: dict[str, str] | None = None,
    mount_from: str | None = None,
    config: dict[str, Any] | None = None,
) -> PushResult:
    """Push local layer files (overlaybd blobs, byte for byte; lowest first) as one image.

    ``config`` becomes the image config's ``config`` object (``Entrypoint``, ``Cmd``, ``Env``,
    ``WorkingDir``, ``User``): what ``obd run`` and container runtimes start by default.
    """
    files = [os.fspath(p) for p in paths]
    layers = [file_digest(p) for p in files]
    manifest, config_bytes = layers_image(layers, overlaybd=overlaybd, annotations=annotations, config=config)
    ref = dest if isinstance(dest, Reference) else parse_reference(dest)
    result = PushResult(str(ref), "", OCI_MANIFEST)
    blobs: list[tuple[str, bytes | str]] = [(d, p) for (d, _), p in zip(layers, files, strict=True)]
    blobs.append(("sha256:" + hashlib.sha256(config_bytes).hexdigest(), config_bytes))
    for blob_digest, data in blobs:
        fate = await push_blob(client, ref, blob_digest, data, mount_from=mount_from)
        {"exists": result.existing, "mounted": result.mounted, "uploaded": result.uploaded}[fate].append(
            blob_digest
        )
    result.digest = await client.put_manifest(ref, manifest, OCI_MANIFEST)
    result.manifests.append(result.digest)
    return result


async def push_file_image(
    client: RegistryClient, path: str | os.PathLike[str], dest: Reference | str, **kw: Any
) -> PushResult:
    """Push one local layer file as a one-layer image (see :func:`push_files_image`)."""
    return await push_files_image(client, [path], dest, **kw)
