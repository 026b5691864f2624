"""Digest-table pins: the layer annotations naming each layer's table, as manifests and
``config.v1.json`` carry them, and the ``--verify`` policy (docs/verify.md).

Chain of trust: the manifest digest (asked for, or the tag's, resolved once and logged) pins the
manifest bytes; each layer descriptor in it carries the annotations below, naming the digest and
size of that layer's :mod:`digest table <obd.verify.format>`; the table pins every block of the
layer blob. The keys are outside containerd's ``containerd.io/snapshot/`` namespace, so containerd
never hands them to overlaybd's snapshotter, and overlaybd, which reads only the ``config.v1.json``
the snapshotter writes, reads the image as it would without them.

``--verify`` (:data:`MODES`): ``auto`` checks every layer that has a table, ``require`` refuses a
layer without one, ``off`` checks nothing. This module does no I/O (``obd inspect`` imports it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from obd.errors import ConfigError, FormatError, IntegrityError
from obd.oci.model import Descriptor
from obd.verify.format import MEDIA_TYPE, check_block_size

if TYPE_CHECKING:
    from obd.image.config import ImageConfig

#: Layer descriptor annotations: the table's digest, its size and its block size.
TABLE_DIGEST = "io.github.obd.verify.table.digest"
TABLE_SIZE = "io.github.obd.verify.table.size"
TABLE_BLOCK_SIZE = "io.github.obd.verify.table.block-size"
#: Where a ``config.v1.json`` keeps the pins, under its ``obd`` metadata: ``{layer digest: pin}``.
CONFIG_KEY = "verify"
MODES = ("require", "auto", "off")
#: Tables are addressed by sha256 (checked here, not with obd.registry, which imports this module).
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
#: Tables larger than this are refused before they are read (a 64 GiB layer in 64 KiB blocks: 32 MiB).
MAX_TABLE_BYTES = 64 << 20


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"verify must be one of {', '.join(MODES)}", field="verify", value=mode)
    return mode


@dataclass(frozen=True)
class TablePin:
    """The digest table of one layer blob, as its descriptor pins it."""

    digest: str
    size: int
    block_size: int

    def annotations(self) -> dict[str, str]:
        return {TABLE_DIGEST: self.digest, TABLE_SIZE: str(self.size), TABLE_BLOCK_SIZE: str(self.block_size)}

    def as_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "blockSize": self.block_size}

    @classmethod
    def from_annotations(cls, ann: Mapping[str, str], *, path: object, field: str) -> TablePin | None:
        """The pin in a layer's annotations; None if it has none, FormatError if it is malformed."""
        if TABLE_DIGEST not in ann:
            return None
        digest = ann[TABLE_DIGEST]
        try:
            if not _SHA256.fullmatch(digest):
                raise ValueError(digest)
            size = int(ann.get(TABLE_SIZE, ""))
            block = int(ann.get(TABLE_BLOCK_SIZE, ""))
        except ValueError:
            raise FormatError(
                "malformed digest-table annotations", path=path, field=f"{field}.annotations", value=digest
            ) from None
        if not 0 < size <= MAX_TABLE_BYTES:
            raise FormatError(
                "unusable digest-table pin", path=path, field=f"{field}.annotations", value=size
            )
        return cls(digest, size, check_block_size(block, path=path))

    @classmethod
    def from_json(cls, obj: Any, *, path: object, field: str) -> TablePin:
        if not isinstance(obj, dict):
            raise ConfigError("a digest-table pin must be an object", path=path, field=field)
        ann = {
            TABLE_DIGEST: obj.get("digest"),
            TABLE_SIZE: obj.get("size"),
            TABLE_BLOCK_SIZE: obj.get("blockSize"),
        }
        pin = cls.from_annotations({k: str(v) for k, v in ann.items()}, path=path, field=field)
        assert pin is not None
        return pin


def layer_pins(layers: Iterable[tuple[str, Mapping[str, str]]], *, path: object) -> dict[str, TablePin]:
    """``{layer digest: pin}`` of the ``(digest, annotations)`` of an image's layers that have one."""
    pins = {}
    for i, (digest, ann) in enumerate(layers):
        pin = TablePin.from_annotations(ann, path=path, field=f"layers[{i}]")
        if pin is not None:
            pins[digest] = pin
    return pins


def pins_json(pins: Mapping[str, TablePin]) -> dict[str, Any]:
    """The pins as a ``config.v1.json`` keeps them (``obd.verify``)."""
    return {digest: pin.as_json() for digest, pin in pins.items()}


def lower_pin(cfg: ImageConfig, digest: str, mode: str) -> TablePin | None:
    """The pin of lower ``digest`` of ``cfg`` to verify it with under ``mode``; IntegrityError when
    ``mode`` is ``require`` and the image has no table for it."""
    if check_mode(mode) == "off":
        return None
    meta = cfg.extra.get("obd")
    pins = meta.get(CONFIG_KEY) if isinstance(meta, dict) else None
    entry = pins.get(digest) if isinstance(pins, dict) else None
    if entry is not None:
        return TablePin.from_json(entry, path=cfg.path, field=f"obd.{CONFIG_KEY}.{digest}")
    if mode == "require":
        image = meta.get("image") if isinstance(meta, dict) else None
        raise IntegrityError(
            "no digest table pins this layer, and --verify=require refuses unverified reads "
            "(give it tables with `obd index REF`, or convert it with `obd convert`)",
            path=image or cfg.path,
            field="layer",
            value=digest,
        )
    return None


def table_descriptors(layers: Any, *, path: object) -> list[Descriptor]:
    """Descriptors of the digest tables a manifest's ``layers`` pin: blobs to copy with the image
    wherever its layers go (push, pull to a layout)."""
    out = []
    for i, layer in enumerate(layers if isinstance(layers, list) else []):
        ann = layer.get("annotations") if isinstance(layer, dict) else None
        pin = TablePin.from_annotations(ann or {}, path=path, field=f"layers[{i}]")
        if pin is not None:
            out.append(Descriptor(MEDIA_TYPE, pin.digest, pin.size))
    return out


def config_pins(cfg: ImageConfig) -> dict[str, TablePin]:
    """The pins a ``config.v1.json`` (``obd.verify``) carries, by layer digest."""
    meta = cfg.extra.get("obd")
    pins = meta.get(CONFIG_KEY) if isinstance(meta, dict) else None
    if not isinstance(pins, dict):
        return {}
    return {d: TablePin.from_json(p, path=cfg.path, field=f"obd.{CONFIG_KEY}.{d}") for d, p in pins.items()}


def describe(pins: Mapping[str, TablePin], layers: int) -> str:
    """The ``verification`` line of ``obd inspect``."""
    if not pins:
        return "none: no digest tables (reads are checked only by ZFile CRCs; --verify=require refuses it)"
    sizes = sorted({p.block_size for p in pins.values()})
    blocks = ", ".join(f"{s >> 10} KiB" for s in sizes)
    return (
        f"digest tables on {len(pins)} of {layers} layers, {blocks} blocks "
        "(sha256; pinned by the manifest, or kept by obd from digest-checked blobs)"
    )


__all__ = [
    "CONFIG_KEY",
    "MAX_TABLE_BYTES",
    "MODES",
    "TABLE_BLOCK_SIZE",
    "TABLE_DIGEST",
    "TABLE_SIZE",
    "TablePin",
    "check_mode",
    "config_pins",
    "describe",
    "layer_pins",
    "lower_pin",
    "pins_json",
    "table_descriptors",
]
