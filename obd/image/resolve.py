"""Turning an image name into the overlaybd config that describes it.

An image is given as layer files (lowest first), a ``config.v1.json``, an OCI layout
(``oci:DIR[:TAG]``) or a registry reference (``python:3.12``, ``host:port/repo@sha256:…``).
:func:`image_config` returns an :class:`~obd.image.config.ImageConfig` with every path absolute:
local layers as ``file`` lowers, registry layers as ``digest``/``size`` lowers under a
``repoBlobUrl``, exactly as overlaybd's snapshotter writes them. :func:`obd.image.local.open_config`
then opens either kind; :func:`open_image` and :func:`open_oci_layout` do both steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from obd.errors import ConfigError, FormatError, ObdError, UnsupportedError
from obd.image.accel import META_KEY, trace_layer_ref
from obd.image.config import ImageConfig, LowerConfig, UpperConfig
from obd.image.local import open_config
from obd.lsmt.stack import Stack
from obd.oci.layout import OCILayout, parse_oci_reference
from obd.turbo import is_plain_image

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions
    from obd.lsmt.rw import RWLayer
    from obd.oci.model import Image


def abs_path(path: str) -> str:
    """``path`` absolute, ``~`` expanded."""
    return os.path.abspath(os.path.expanduser(path))


def _is_config_file(path: str) -> bool:
    if path.endswith(".json"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


def image_config(
    image: str | Sequence[str], *, platform: str | None = None, remote: RemoteOptions | None = None
) -> ImageConfig:
    """The config of an image, every local path in it absolute.

    ``image`` is one of: layer files, lowest first (a list, or one path); a ``config.v1.json`` (its
    upper, if any, is kept); ``oci:DIR[:TAG]``; a registry reference (resolved with ``remote``,
    default :func:`~obd.image.remote.default_remote_options`, into ``digest`` lowers under a
    ``repoBlobUrl``). This is the one place an image name is turned into a config.
    """
    specs = [image] if isinstance(image, str) else list(image)
    if not specs:
        raise ConfigError("no image given (layer files, a config.v1.json or oci:DIR[:TAG])")
    if len(specs) == 1 and specs[0].startswith("oci:"):
        return _oci_config(specs[0], platform, remote)
    if len(specs) == 1 and os.path.isfile(specs[0]) and _is_config_file(specs[0]):
        return _resolved_config(specs[0])
    lowers = []
    for i, spec in enumerate(specs):
        if spec.startswith("oci:"):
            raise ConfigError("an oci:DIR[:TAG] image is a whole stack; give it alone", field=f"image[{i}]")
        if not os.path.exists(spec):
            if looks_like_reference(spec):
                if len(specs) != 1:
                    raise ConfigError(
                        "a registry image is a whole stack; give it alone", path=spec, field="image"
                    )
                # lazy: obd.image.remote costs ~80 ms to import, needed only for registry images
                from obd.image.remote import default_remote_options, registry_config

                remote = remote or default_remote_options()
                if platform and platform != remote.platform:
                    remote = replace(remote, platform=platform)
                return registry_config(spec, remote)
            raise ConfigError("no such file (nor a registry reference)", path=spec, field="image")
        lowers.append(LowerConfig(file=abs_path(spec)))
    return ImageConfig(lowers=lowers, path=None)


def open_image(
    image: str | Sequence[str],
    *,
    readonly: bool = True,
    platform: str | None = None,
    remote: RemoteOptions | None = None,
) -> Stack:
    """The device of any image :func:`image_config` understands (read-only unless asked otherwise)."""
    cfg = image_config(image, platform=platform, remote=remote)
    return open_config(cfg, readonly=readonly, remote=remote)


def open_oci_layout(reference: str, *, platform: str | None = None, upper: RWLayer | None = None) -> Stack:
    """The device of an overlaybd image stored in an OCI layout, ``oci:DIR[:TAG]``, on top of ``upper``."""
    stack = open_config(image_config(reference, platform=platform), readonly=True)
    return Stack(stack.lowers, upper, name=reference)


def looks_like_reference(spec: str) -> bool:
    """A name that parses as an image reference and does not look like a file path."""
    # lazy: the obd.registry package costs ~80 ms (asyncio, yarl), which local images never need
    from obd.registry.reference import parse_reference

    if spec.startswith(("/", "./", "../", "~")) or spec.endswith((".commit", ".json", ".sealed", ".zfile")):
        return False
    try:
        parse_reference(spec)
    except ObdError:
        return False
    return True


def _resolved_config(path: str) -> ImageConfig:
    cfg = ImageConfig.load(path)
    out = replace(cfg, lowers=[], path=abs_path(path), extra=dict(cfg.extra))
    for i, lower in enumerate(cfg.lowers):
        new = replace(lower)
        found = next((f for f in (cfg.resolve(n) for n in lower.local_candidates()) if f), None)
        if found:
            new.file, new.dir = abs_path(found), ""
        elif not lower.digest:
            raise ConfigError(
                f"layer file not found (tried {', '.join(lower.local_candidates()) or 'nothing'})",
                path=path,
                field=f"lowers[{i}].file",
            )
        for key in ("targetFile", "gzipIndex"):
            name = getattr(lower, key)
            if name:
                hit = cfg.resolve(name)
                if not hit:
                    raise ConfigError("file not found", path=path, field=f"lowers[{i}].{key}", value=name)
                setattr(new, key, abs_path(hit))
        out.lowers.append(new)
    up = cfg.upper
    if up.enabled:
        fields = {}
        for key in ("data", "index", "target", "gzipIndex"):
            name = getattr(up, key)
            hit = cfg.resolve(name) if name else None
            fields[key] = abs_path(hit) if hit else name
        out.upper = UpperConfig(**fields)
    return out


def _oci_config(reference: str, platform: str | None, remote: RemoteOptions | None = None) -> ImageConfig:
    root, tag = parse_oci_reference(reference)
    layout = OCILayout(root)
    image = layout.resolve(tag, platform=platform)
    if is_plain_image(image):
        return _plain_oci_config(layout, image, remote)
    lowers = []
    accel = None
    for i, layer in enumerate(image.overlaybd_layers()):
        if layer.is_acceleration:
            accel = layer
            continue
        if layer.is_turbo:
            raise UnsupportedError(
                "turboOCI images are not supported from OCI layouts yet", path=reference, field=f"layers[{i}]"
            )
        path = layout.blob_path(layer.digest)
        if not os.path.exists(path):
            raise ConfigError("layer blob missing from the layout", path=path, field=f"layers[{i}]")
        size = os.path.getsize(path)
        if size != layer.size:
            raise FormatError(
                f"blob is {size} bytes, the manifest says {layer.size}",
                path=path,
                field=f"layers[{i}].size",
                value=layer.size,
            )
        lowers.append(LowerConfig(file=abs_path(path), digest=layer.digest, size=layer.size))
    cfg = ImageConfig(lowers=lowers, path=None)
    if accel is not None:
        cfg.extra["obd"] = {META_KEY: trace_layer_ref(accel, file=abs_path(layout.blob_path(accel.digest)))}
    return cfg


def _plain_oci_config(layout: OCILayout, image: Image, remote: RemoteOptions | None) -> ImageConfig:
    """A plain image in a layout, read like a plain registry image: meta layers built from the
    layout's blobs (cached under the same chain keys), file data read from the blobs themselves."""
    # lazy: the meta-layer builder pulls in the converter (debugfs, tar reader) and the registry code
    from obd.turbo.remote import ensure_layout_meta, plain_lowers

    cache_dir = remote.cache_dir if remote else None
    metas = ensure_layout_meta(image, layout.blob_path, cache_dir, quiet=bool(remote and remote.quiet))
    lowers = plain_lowers(metas, cache_dir)
    for lower, m in zip(lowers[1:], metas, strict=True):
        if lower.targetDigest:  # the target is the layout's blob, not a registry one
            lower.targetFile, lower.targetDigest, lower.size = abs_path(layout.blob_path(m.digest)), "", 0
    cfg = ImageConfig(lowers=lowers, path=None)
    cfg.extra["obd"] = {"image": image.reference, "manifest": image.manifest_digest, "plain": True}
    return cfg


def image_label(image: str | Sequence[str]) -> list[str]:
    """How an image is recorded in an upper directory: paths made absolute, ``oci:`` kept."""
    specs = [image] if isinstance(image, str) else list(image)
    out = []
    for s in specs:
        if s.startswith("oci:"):
            out.append("oci:" + abs_path(s[4:]))
        elif os.path.exists(s):
            out.append(abs_path(s))
        else:
            out.append(s)
    return out
