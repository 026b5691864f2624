"""Converting OCI/Docker images into overlaybd images (``obd convert``; docs/formats.md §7.1, §9).

- :mod:`~obd.convert.layertar`: reading layer tars (validated, hostile input refused, data spooled).
- :mod:`~obd.convert.debugfs` and :mod:`~obd.convert.ext4`: applying a tar to an ext4 image with
  e2fsprogs' debugfs, with overlaybd-apply's semantics (whiteouts, replacements, hard links).
- :mod:`~obd.convert.layer`: committing only the blocks a tar changed, as one layer per tar.
- the stock 64 GiB base layer every image is stacked on: :mod:`obd.layer.baselayer`.
- :mod:`~obd.convert.cache`: converted layers cached by chain id.
- :mod:`~obd.convert.source`, :mod:`~obd.convert.push`: ``docker://``, ``oci:``, ``docker-archive:``.
- :mod:`~obd.convert.image`: :func:`convert_image`, the whole conversion.

``docs/convert.md`` is the user's guide.
"""

from obd.convert.image import (
    ConvertedLayer,
    ConvertOptions,
    ConvertResult,
    build_manifest,
    chain_ids,
    chain_uuid,
    convert_image,
)
from obd.convert.layertar import HostileTarError, TarEntry, TarLimits, read_layer
from obd.convert.source import Transport, parse_transport

__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "ConvertedLayer",
    "HostileTarError",
    "TarEntry",
    "TarLimits",
    "Transport",
    "build_manifest",
    "chain_ids",
    "chain_uuid",
    "convert_image",
    "parse_transport",
    "read_layer",
]
