"""The index artifact's obd parts: a meta layer's ``ext4.fs.meta`` and ``gzip.meta`` as blobs of their own.

turboOCI packs both files of a gzip layer's meta in one ``turboOCIv1.tar.gz``, which a reader must
fetch whole before its first read. Most of it is ``gzip.meta``'s 32 KiB windows (zlib-compressed,
one per seek point: about 90 % of a Debian python image's 2.06 MB artifact), and a cold start needs
only the windows of the seek points it reads from. So ``obd index --push`` also pushes, per gzip
layer, beside the turboOCI tar (which overlaybd reads and obd falls back to):

* ``ext4.fs.meta`` gzip-compressed (fetched whole, checked against its digest);
* ``gzip.meta`` byte for byte as it is in the tar, read with Range requests through the block cache
  like any layer blob, every block checked against a digest table of :data:`BLOCK_SIZE` blocks
  (about one window each): its header and entry table when the layer opens, a window when a read
  first starts at its seek point;

and names them in annotations of the layer's descriptor (:data:`META_DIGEST` and the rest). The
annotations are in the artifact manifest, so whatever pins the artifact pins them. As with digest
tables, nothing but those annotations refers to the blobs: a registry's garbage collector that
honours only ``layers`` could delete them, and obd then falls back to the turboOCI tar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from obd.errors import FormatError
from obd.verify.format import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from obd.verify.pins import MAX_TABLE_BYTES, TablePin

#: Annotations on an artifact layer descriptor (obd's, beside turboOCI's own).
META_DIGEST = "io.github.obd.turbo.meta.digest"
META_SIZE = "io.github.obd.turbo.meta.size"
INDEX_DIGEST = "io.github.obd.turbo.gzip-index.digest"
INDEX_SIZE = "io.github.obd.turbo.gzip-index.size"
INDEX_TABLE_DIGEST = "io.github.obd.turbo.gzip-index.table.digest"
INDEX_TABLE_SIZE = "io.github.obd.turbo.gzip-index.table.size"
INDEX_TABLE_BLOCK_SIZE = "io.github.obd.turbo.gzip-index.table.block-size"
#: Media types of the two blobs.
META_MEDIA_TYPE = "application/vnd.obd.turbo.ext4-meta.v1+gzip"
INDEX_MEDIA_TYPE = "application/vnd.obd.turbo.gzip-index.v1"
#: Verified block size of ``gzip.meta`` reads: a compressed window is 8–16 KiB, so one or two
#: blocks fetch it, and the header (333 bytes) and the entry table sit in the first and last.
BLOCK_SIZE = 16 << 10
#: Largest part accepted from a registry.
MAX_PART = 1 << 30
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class IndexParts:
    """Where a meta layer's two files are as blobs of their own: ``meta`` (ext4.fs.meta, gzip) and
    ``index`` (gzip.meta, raw), each ``(digest, size)``, and ``table``, the pin of ``index``'s
    digest table."""

    meta: tuple[str, int]
    index: tuple[str, int]
    table: TablePin

    def annotations(self) -> dict[str, str]:
        return {
            META_DIGEST: self.meta[0],
            META_SIZE: str(self.meta[1]),
            INDEX_DIGEST: self.index[0],
            INDEX_SIZE: str(self.index[1]),
            INDEX_TABLE_DIGEST: self.table.digest,
            INDEX_TABLE_SIZE: str(self.table.size),
            INDEX_TABLE_BLOCK_SIZE: str(self.table.block_size),
        }

    @classmethod
    def from_annotations(cls, ann: Mapping[str, Any], *, path: object, field: str) -> IndexParts | None:
        """The parts a descriptor's annotations name; None if it names none (a turboOCI-made or older
        artifact), FormatError if they are incomplete or malformed."""
        keys = (META_DIGEST, META_SIZE, INDEX_DIGEST, INDEX_SIZE)
        if not any(k in ann for k in keys):
            return None

        def bad(key: str, message: str, value: object) -> FormatError:
            return FormatError(message, path=path, field=f"{field}.annotations.{key}", value=value)

        def digest(key: str) -> str:
            value = ann.get(key)
            if not isinstance(value, str) or not _SHA256.fullmatch(value):
                raise bad(key, "not a sha256 digest", value)
            return value

        def size(key: str, limit: int) -> int:
            value = ann.get(key)
            n = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else -1
            if not 0 < n <= limit:
                raise bad(key, f"size must be in [1, {limit}]", value)
            return n

        block = size(INDEX_TABLE_BLOCK_SIZE, MAX_BLOCK_SIZE)
        if block & (block - 1) or block < MIN_BLOCK_SIZE:
            raise bad(INDEX_TABLE_BLOCK_SIZE, "block size must be a power of two from 4 KiB", block)
        table = TablePin(digest(INDEX_TABLE_DIGEST), size(INDEX_TABLE_SIZE, MAX_TABLE_BYTES), block)
        return cls(
            (digest(META_DIGEST), size(META_SIZE, MAX_PART)),
            (digest(INDEX_DIGEST), size(INDEX_SIZE, MAX_PART)),
            table,
        )


__all__ = [
    "BLOCK_SIZE",
    "INDEX_MEDIA_TYPE",
    "META_MEDIA_TYPE",
    "IndexParts",
]
