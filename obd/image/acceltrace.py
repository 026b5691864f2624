"""Reading the trace of an image's acceleration layer, wherever the layer lives.

Resolving an image records where its acceleration layer is (:func:`obd.image.accel.trace_layer_ref`);
this module follows that record to a local file (``oci:`` images) or to the registry, through the
block cache, and checks the whole layer against the digest the manifest pins before its trace is
used. It sits apart from :mod:`obd.image.accel`, which knows only the layer's format, because
:mod:`obd.image.remote` uses that format module while this one reads through :mod:`obd.image.remote`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from obd.errors import ChecksumError, FormatError
from obd.image.accel import MAX_LAYER_BYTES, META_KEY, trace_from_layer
from obd.image.config import ImageConfig
from obd.prefetch.trace import Record


def load_image_trace(config: ImageConfig, remote: Any = None) -> list[Record] | None:
    """The trace of the acceleration layer ``config`` names in its ``obd`` metadata, or None.

    A registry image's layer is read through ``remote`` (the block cache; a few KiB to a few MiB);
    a local one from its file.
    """
    ref = (config.extra.get("obd") or {}).get(META_KEY)
    if not ref:
        return None
    digest, size = ref["digest"], int(ref["size"])
    if size > MAX_LAYER_BYTES:
        raise FormatError(f"{size} bytes is too large for an acceleration layer", path=digest, field="size")
    if ref.get("file"):
        with open(ref["file"], "rb") as f:
            blob = f.read(MAX_LAYER_BYTES + 1)
        _check_digest(blob, digest, ref["file"])  # a layout's blob is as untrusted as a registry's
        return trace_from_layer(blob, path=ref["file"])
    # lazy: obd.image.remote costs ~80 ms to import; devices of local images never need it
    from obd.image.remote import open_remote_blob

    src = open_remote_blob(config.repoBlobUrl, digest, size, remote)
    try:
        buf = bytearray(size)
        view = memoryview(buf)
        pos = 0
        while pos < size:
            n = src.readinto(view[pos:], pos)
            if n <= 0:
                raise FormatError("acceleration layer ended early", path=digest, field="size", value=pos)
            pos += n
    finally:
        src.close()
    _check_digest(buf, digest, f"{config.repoBlobUrl}/{digest}")
    return trace_from_layer(bytes(buf), path=digest)


def _check_digest(blob: bytes | bytearray, digest: str, where: str) -> None:
    """The whole layer must have the digest the manifest pins: the acceleration layer has no digest
    table, it is small and always read whole, so its blob digest is its check (docs/verify.md)."""
    alg, _, want = digest.partition(":")
    got = hashlib.new(alg, blob).hexdigest()
    if got != want:
        raise ChecksumError(
            f"acceleration layer has {alg}:{got}, the manifest pins {digest}", path=where, field="digest"
        )


__all__ = ["load_image_trace"]
