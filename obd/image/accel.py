"""Acceleration layers: a prefetch trace shipped inside an overlaybd image (docs/formats.md §7.3).

accelerated-container-image's ``ctr record-trace`` appends one more layer **on top** of an
overlaybd image: a plain tar holding a single file ``trace`` (overlaybd's binary trace, see
:mod:`obd.prefetch.trace`), annotated ``containerd.io/snapshot/overlaybd/acceleration-layer: yes`` besides
the usual blob-digest/blob-size/version. It is not part of the device: the snapshotter drops it
from the stack and replays the trace when the device opens, so every machine that runs the image
prefetches what its start-up reads, without anyone handing trace files around.

obd does the same: resolving an image leaves the layer out of the device and keeps its reference
(:func:`trace_layer_ref`) in the image config's ``obd`` metadata; the frontends call
:func:`obd.image.acceltrace.load_image_trace` and replay it in the background unless a trace was
given explicitly; and :func:`trace_layer_tar` makes such a layer (``obd trace attach``,
:func:`obd.image.assemble.push_trace_image`).
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

from obd.errors import FormatError
from obd.oci.model import OverlaybdLayer
from obd.prefetch.trace import MAX_TRACE_BYTES, Record, decode

#: The one member of an acceleration layer's tar.
TRACE_MEMBER = "trace"
#: An acceleration layer blob larger than this is refused: a trace of at most MAX_TRACE_BYTES plus
#: tar headers and padding.
MAX_LAYER_BYTES = MAX_TRACE_BYTES + (64 << 10)
#: Key of the acceleration layer in the image config's ``obd`` metadata.
META_KEY = "trace_layer"


def trace_layer_ref(layer: OverlaybdLayer, *, file: str | None = None) -> dict[str, Any]:
    """What :func:`~obd.image.acceltrace.load_image_trace` needs to find the layer later: its digest
    and size, and the file holding it for a local (``oci:``) image."""
    ref: dict[str, Any] = {"digest": layer.digest, "size": layer.size}
    if file is not None:
        ref["file"] = file
    return ref


def trace_layer_tar(trace: bytes) -> bytes:
    """An acceleration layer blob: an uncompressed tar of one read-only file ``trace``.

    Deterministic (mtime 0, root-owned) so the same trace always gives the same digest.
    """
    decode(trace, path="trace")  # only a valid trace goes into an image
    info = tarfile.TarInfo(TRACE_MEMBER)
    info.size = len(trace)
    info.mode = 0o444
    info.mtime = 0
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(trace))
    return buf.getvalue()


def trace_from_layer(blob: bytes, *, path: object = None) -> list[Record]:
    """The trace records inside an acceleration layer blob (a tar holding ``trace``), validated."""
    if len(blob) > MAX_LAYER_BYTES:
        raise FormatError(
            f"{len(blob)} bytes is too large for an acceleration layer", path=path, field="size"
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar:
                if member.name.lstrip("./") != TRACE_MEMBER:
                    continue
                if not member.isfile():
                    raise FormatError("trace is not a regular file", path=path, field="trace")
                if member.size > MAX_TRACE_BYTES:
                    raise FormatError(
                        f"{member.size} bytes is too large for a trace", path=path, field="trace.size"
                    )
                f = tar.extractfile(member)
                assert f is not None  # a regular file
                return decode(f.read(), path=f"{path}:trace" if path else "trace")
    except tarfile.TarError as e:
        raise FormatError(f"acceleration layer is not a tar: {e}", path=path) from None
    raise FormatError("acceleration layer holds no trace file", path=path, field="trace")


__all__ = [
    "META_KEY",
    "trace_from_layer",
    "trace_layer_ref",
    "trace_layer_tar",
]
