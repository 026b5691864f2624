"""Turning an image name into the overlaybd config that describes it.

An image is given as layer files (lowest first), a ``config.v1.json``, an OCI layout
(``oci:DIR[:TAG]``) or a registry reference (``python:3.12``, ``host:port/repo@sha256:…``).
:func:`image_config` returns an :class:`~obd.image.config.ImageConfig` with every path absolute:
local layers as ``file`` lowers, registry layers as ``digest``/``size`` lowers under a
``repoBlobUrl``, exactly as overlaybd's snapshotter writes them. :func:`obd.image.local.open_config`
then opens either kind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from obd.errors import ConfigError, FormatError, ObdError, UnsupportedError
from obd.image.config import ImageConfig, LowerConfig, UpperConfig

if TYPE_CHECKING:
    pass


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


def image_config(image: str | Sequence[str], *, platform: str | None = None) -> ImageConfig:
    """The config of a local image, every path in it absolute.

    ``image`` is one of: layer files, lowest first (a list, or one path); a ``config.v1.json`` (its
    upper, if any, is kept); ``oci:DIR[:TAG]``. This is the one place an image name is turned into
    files: registry references (``image=REF``) plug in here.
    """
    specs = [image] if isinstance(image, str) else list(image)
    if not specs:
        raise ConfigError("no image given (layer files, a config.v1.json or oci:DIR[:TAG])")
    if len(specs) == 1 and specs[0].startswith("oci:"):
        return _oci_config(specs[0], platform)
    if len(specs) == 1 and os.path.isfile(specs[0]) and _is_config_file(specs[0]):
        return _resolved_config(specs[0])
    lowers = []
    for i, spec in enumerate(specs):
        if spec.startswith("oci:"):
            raise ConfigError("an oci:DIR[:TAG] image is a whole stack; give it alone", field=f"image[{i}]")
        if not os.path.exists(spec):
            if _looks_like_registry_reference(spec):
                raise UnsupportedError(
                    "registry images are not served yet: give local layer files, a config.v1.json or "
                    "oci:DIR[:TAG]",
                    path=spec,
                    field="image",
                )
            raise ConfigError("no such file", path=spec, field="image")
        lowers.append(LowerConfig(file=abs_path(spec)))
    return ImageConfig(lowers=lowers, path=None)


def _looks_like_registry_reference(spec: str) -> bool:
    try:
        from obd.registry.reference import parse_reference
    except ImportError:  # pragma: no cover - the registry package is optional here
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


def _oci_config(reference: str, platform: str | None) -> ImageConfig:
    from obd.image.oci import OCILayout, parse_oci_reference

    root, tag = parse_oci_reference(reference)
    layout = OCILayout(root)
    image = layout.resolve(tag, platform=platform)
    lowers = []
    for i, layer in enumerate(image.overlaybd_layers()):
        if layer.is_acceleration:
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
    return ImageConfig(lowers=lowers, path=None)


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
