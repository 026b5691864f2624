"""Lazy plain OCI images: turboOCI-style meta layers built from plain layer tars (docs/index.md).

:mod:`.build` makes a meta layer (``ext4.fs.meta``, plus ``gzip.meta`` for a gzip layer) from a
layer blob (for zstd, :mod:`.zstd`: a frame index or a decompressed copy); :mod:`.remote` keeps
them in the cache and turns a plain registry image (or OCI layout) into a lazy stack over its
original blobs; :mod:`.artifact` pushes them as an index artifact, links it strongly from an image
index, and finds them again. This module is kept light: registry code asks
:func:`is_plain_image` on every image.
"""

from __future__ import annotations

from obd.oci.model import BLOB_DIGEST, Image


def is_plain_image(image: Image) -> bool:
    """True for an image none of whose layers carries overlaybd's blob-digest annotation."""
    return bool(image.layers) and all(BLOB_DIGEST not in d.annotations for d in image.layers)


__all__ = ["is_plain_image"]
