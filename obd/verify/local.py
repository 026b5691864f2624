"""The local digest-table store: tables obd built itself or fetched by a pin it trusts (docs/verify.md).

An image already in a registry has no table pinned by its manifest. ``obd index`` (and the first
lazy read of a plain image, which streams every layer once to build its file-system index) builds
one per layer blob while the blob is checked against its sha256, so the table is as trustworthy as
the blob digest the manifest pins; it is kept here, under the cache directory::

    <cache dir>/verify/tables/sha256/<table hex>    the table, content-addressed
    <cache dir>/verify/layers/sha256/<blob hex>     {"digest", "size", "blockSize"}: the blob's table

Only three writers put entries here: a table built from a digest-checked blob, a table fetched by
a pin the image manifest carries, and one from an index artifact the user allowed
(``--allow-referrers``). Every read re-checks the table's own digest, so a damaged file is
ignored (and rebuilt or refetched), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from obd.cache.store import default_cache_dir
from obd.errors import ObdError
from obd.io.publish import publish_bytes
from obd.verify.format import DEFAULT_BLOCK_SIZE, DigestTable, build_table_file
from obd.verify.pins import TablePin

log = logging.getLogger("obd.verify")

#: Sub-directory of the obd cache directory holding tables.
TABLES_DIR = "verify"


class LocalTables:
    """The table store under ``cache_dir`` (default: the obd cache directory)."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None):
        self.root = Path(cache_dir or default_cache_dir()) / TABLES_DIR

    def _table_path(self, table_digest: str) -> Path:
        alg, _, hexpart = table_digest.partition(":")
        return self.root / "tables" / alg / hexpart

    def _layer_path(self, blob_digest: str) -> Path:
        alg, _, hexpart = blob_digest.partition(":")
        return self.root / "layers" / alg / hexpart

    def put(self, blob_digest: str, data: bytes, block_size: int) -> TablePin:
        """Keep table ``data`` of blob ``blob_digest`` (validated first); its pin."""
        table = DigestTable(data, path=f"table of {blob_digest}")
        if table.blob_digest != blob_digest:
            raise ObdError(
                f"the table covers {table.blob_digest}", path=blob_digest, field="header.blob_sha256"
            )
        pin = TablePin("sha256:" + hashlib.sha256(data).hexdigest(), len(data), block_size)
        self.put_table(pin, data)
        layer = self._layer_path(blob_digest)
        layer.parent.mkdir(parents=True, exist_ok=True)
        publish_bytes(layer, json.dumps(pin.as_json()).encode(), durable=False)
        return pin

    def put_table(self, pin: TablePin, data: bytes) -> None:
        """Keep the table bytes a trusted pin names (their digest is the pin's: checked by the caller)."""
        path = self._table_path(pin.digest)
        if path.is_file() and path.stat().st_size == pin.size:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            publish_bytes(path, data, durable=False)
        except OSError as e:  # the store is an optimisation for manifest-pinned tables
            log.warning("cannot keep table %s: %s", pin.digest, e.strerror or e)

    def get_table(self, pin: TablePin) -> bytes | None:
        """The bytes of the table ``pin`` names, if kept here and intact."""
        try:
            data = self._table_path(pin.digest).read_bytes()
        except OSError:
            return None
        if len(data) != pin.size or "sha256:" + hashlib.sha256(data).hexdigest() != pin.digest:
            log.warning("kept table %s is damaged; ignoring it", pin.digest)
            return None
        return data

    def pin(self, blob_digest: str) -> TablePin | None:
        """The pin of the table kept for blob ``blob_digest`` (None if there is none, or it is damaged)."""
        try:
            obj = json.loads(self._layer_path(blob_digest).read_bytes())
            pin = TablePin.from_json(obj, path=self._layer_path(blob_digest), field="pin")
        except (OSError, ValueError, ObdError):
            return None
        return pin if self.get_table(pin) is not None else None

    def pins(self, blob_digests: Iterable[str]) -> dict[str, TablePin]:
        """``{blob digest: pin}`` of those of ``blob_digests`` that have a table kept here."""
        out = {}
        for d in blob_digests:
            pin = self.pin(d)
            if pin is not None:
                out[d] = pin
        return out

    def build_from_file(self, blob_digest: str, path: str, block_size: int = DEFAULT_BLOCK_SIZE) -> TablePin:
        """Build and keep the table of the local copy ``path`` of blob ``blob_digest``. The file is
        read once and must have that digest (ObdError otherwise), so the table is as good as the digest."""
        data, got = build_table_file(path, block_size)
        if got != blob_digest:
            raise ObdError(f"the blob has digest {got}", path=path, field="digest", value=blob_digest)
        return self.put(blob_digest, data, block_size)


def keep_table_of_file(cache_dir: str | os.PathLike[str] | None, blob_digest: str, path: str) -> None:
    """The hook for code that has just streamed a layer blob to ``path`` and checked its digest:
    build its digest table from that copy (no second download) and keep it. A failure is logged,
    never raised: the table only adds checks."""
    try:
        pin = LocalTables(cache_dir).build_from_file(blob_digest, path)
    except (OSError, ObdError) as e:
        log.warning("%s: no digest table kept: %s", blob_digest, e)
        return
    log.info("%s: digest table %s kept (%d bytes)", blob_digest, pin.digest, pin.size)


#: Beside a local file obd derived from a checked blob (a zstd layer's decompressed copy): the
#: digest table of the file itself, made when the file was written.
SIDECAR_SUFFIX = ".sha256-table"


def write_sidecar_table(path: str | os.PathLike[str]) -> None:
    """Write the digest table of the file at ``path`` beside it (:data:`SIDECAR_SUFFIX`)."""
    table, _ = build_table_file(os.fspath(path))
    publish_bytes(os.fspath(path) + SIDECAR_SUFFIX, table, durable=False)


def sidecar_table(path: str | os.PathLike[str]) -> DigestTable | None:
    """The digest table kept beside the file at ``path``, validated; None when there is none."""
    side = os.fspath(path) + SIDECAR_SUFFIX
    try:
        with open(side, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return DigestTable(data, path=side)


__all__ = [
    "SIDECAR_SUFFIX",
    "TABLES_DIR",
    "LocalTables",
    "keep_table_of_file",
    "sidecar_table",
    "write_sidecar_table",
]
