"""The conversion cache: converted layers keyed by the chain id of the source layers below them.

Two images that share their first *k* layers (same ``diff_id`` s in the same order, so the same
chain ids) share their first *k* converted layers: the second conversion stacks the cached blobs
and only applies what is new, as accelerated-container-image's convertor does with its layer
database. The key also covers every setting that changes the output bytes (base layer or mkfs,
virtual size, algorithm, block size, converter version), so a cached blob is always exactly what a
fresh conversion would write.

Layout, under ``<obd cache dir>/convert/v1/`` (the block cache never touches it)::

    <key[:2]>/<key>/overlaybd.commit    the committed layer (tar-wrapped ZFile)
    <key[:2]>/<key>/meta.json           digest, size, uuid, chain id, settings

Entries are published by renaming a complete directory into place, so readers never see half an
entry and two converters racing on the same layer keep whichever finished first. Nothing is ever
evicted automatically; ``rm -rf ~/.cache/obd/convert`` is always safe between conversions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obd.io.publish import publish_path

#: Bumped whenever the converter's output bytes change for the same input.
CONVERTER_VERSION = 1
LAYER_FILE = "overlaybd.commit"


@dataclass(frozen=True)
class CachedLayer:
    path: str
    digest: str
    size: int
    meta: dict[str, Any]


def cache_key(chain_id: str, settings: dict[str, Any]) -> str:
    """The hex key of a converted layer: chain id plus every output-changing setting."""
    doc = json.dumps({"v": CONVERTER_VERSION, "chain": chain_id, **settings}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


class ConvertCache:
    """``root`` is the obd cache directory (the ``convert/`` folder is made under it); None disables."""

    def __init__(self, root: str | os.PathLike[str] | None):
        self.root = Path(root) / "convert" / "v1" if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _dir(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / key

    def get(self, key: str) -> CachedLayer | None:
        """The entry for ``key``, if present and whole."""
        if self.root is None:
            return None
        d = self._dir(key)
        try:
            meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
            path = d / LAYER_FILE
            size = path.stat().st_size
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("size") != size or not isinstance(meta.get("digest"), str):
            return None
        return CachedLayer(str(path), meta["digest"], size, meta)

    def put(self, key: str, layer_file: str, meta: dict[str, Any]) -> CachedLayer:
        """Move ``layer_file`` into the cache under ``key`` (or keep the entry already there)."""
        if self.root is None:
            return CachedLayer(layer_file, meta["digest"], meta["size"], meta)
        final = self._dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".part-"))
        try:
            shutil.move(layer_file, tmp / LAYER_FILE)
            (tmp / "meta.json").write_text(
                json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8"
            )
            try:
                publish_path(tmp, final)  # fails on an existing entry: someone else converted it too
            except OSError:
                if self.get(key) is None:  # not a lost race: a broken entry; replace it
                    shutil.rmtree(final, ignore_errors=True)
                    publish_path(tmp, final)
        finally:
            if tmp.exists():
                with contextlib.suppress(OSError):
                    shutil.rmtree(tmp)
        entry = self.get(key)
        if entry is None:
            raise OSError(f"conversion cache entry {final} vanished right after it was written")
        return entry


__all__ = ["CONVERTER_VERSION", "CachedLayer", "ConvertCache", "cache_key"]
