"""Plain OCI images from registries, read lazily through turboOCI-style meta layers (docs/index.md).

A plain image (gzip or uncompressed tar layers, no overlaybd annotations) becomes the stack
``base layer + one meta layer per image layer``; each meta layer's file data is read with Range
requests from the *original* layer blob (through its gzip index for a gzip layer), via the
persistent block cache like any registry layer.

The meta layers come from the local meta cache (``<cache dir>/turbo/<chain key>/``), or are built on
first use by streaming each missing layer once (progress on stderr) and then cached. The chain key
of layer *i* hashes the digests of layers 0..i: a meta layer's ext4 is built on the ones below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from obd.cache.store import default_cache_dir
from obd.convert.baselayer import base_layer_path
from obd.errors import ChecksumError, UnsupportedError
from obd.image.config import LowerConfig
from obd.io.publish import publish_path
from obd.observability.progress import Progress
from obd.oci.model import Image
from obd.registry.blob import RemoteBlob
from obd.registry.reference import Reference
from obd.turbo.build import GZIP_INDEX_NAME, META_NAME, TurboBuilder, chain_key

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions

log = logging.getLogger(__name__)

#: Sub-directory of the obd cache directory holding meta layers.
META_DIR = "turbo"
#: What each meta directory records about itself.
RECORD_NAME = "turbo.json"
#: Layer media types a meta layer can be built for (gzip or uncompressed tar, OCI or Docker).
PLAIN_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
ZSTD_LAYER_TYPES = {"application/vnd.oci.image.layer.v1.tar+zstd"}
#: Bytes per ranged GET while a layer is streamed for building.
PIECE = 8 << 20


def meta_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where meta layers are cached: ``<cache dir>/turbo``."""
    return Path(cache_dir or default_cache_dir()) / META_DIR


@dataclass(frozen=True)
class MetaLayer:
    """The meta of one image layer: where it is cached and the blob its data lives in."""

    key: str
    digest: str
    size: int
    media_type: str
    directory: Path

    @property
    def meta(self) -> Path:
        return self.directory / META_NAME

    @property
    def gzip_index(self) -> Path | None:
        p = self.directory / GZIP_INDEX_NAME
        return p if p.is_file() else None

    @property
    def complete(self) -> bool:
        return (self.directory / RECORD_NAME).is_file() and self.meta.is_file()


def plan_meta(image: Image, cache_dir: str | os.PathLike[str] | None) -> list[MetaLayer]:
    """The meta layers of a plain image, cached or not; unsupported layer types are refused here."""
    root = meta_root(cache_dir)
    out = []
    digests: list[str] = []
    for i, d in enumerate(image.layers):
        if d.media_type in ZSTD_LAYER_TYPES:
            raise UnsupportedError(
                "zstd layers cannot be read lazily: a zstd stream has no seek points (turboOCI accepts "
                "only gzip and uncompressed layers); pull it, or convert it with `obd convert`",
                path=image.reference,
                field=f"layers[{i}].mediaType",
                value=d.media_type,
            )
        if d.media_type not in PLAIN_LAYER_TYPES:
            raise UnsupportedError(
                "not a tar layer; only tar and tar+gzip layers can be read lazily",
                path=image.reference,
                field=f"layers[{i}].mediaType",
                value=d.media_type,
            )
        digests.append(d.digest)
        key = chain_key(digests)
        out.append(MetaLayer(key, d.digest, d.size, d.media_type, root / key))
    return out


def _download(blob: RemoteBlob, dest: str, label: str, *, quiet: bool) -> None:
    """Stream ``blob`` into ``dest`` once, checking its digest on the way."""
    alg, _, want = blob.digest.partition(":")
    h = hashlib.new(alg)
    buf = memoryview(bytearray(PIECE))
    pos = 0
    with open(dest, "wb") as out, Progress(f"fetch {label}", blob.size, quiet=quiet) as p:
        while pos < blob.size:
            n = blob.readinto(buf[: min(PIECE, blob.size - pos)], pos)
            if n <= 0:
                raise ChecksumError("blob ended early", path=blob.name, field="size", value=pos)
            h.update(buf[:n])
            out.write(buf[:n])
            pos += n
            p.update(pos)
    if h.hexdigest() != want:
        raise ChecksumError(f"layer blob has {alg}:{h.hexdigest()}", path=blob.name, field="digest")


def ensure_meta(
    ref: Reference,
    image: Image,
    opts: RemoteOptions,
    *,
    quiet: bool = False,
    note: Callable[[str], None] | None = None,
) -> list[MetaLayer]:
    """The meta layers of plain image ``image``, building (and caching) the missing ones.

    Layers below the first missing one are taken from the cache; from there up each layer blob is
    streamed once from the registry (bypassing the block cache: later reads fetch only what is
    read), indexed, applied and committed. ``note`` (default: a line on stderr unless ``quiet``)
    hears what is happening.
    """
    metas = plan_meta(image, opts.cache_dir)
    first = next((i for i, m in enumerate(metas) if not m.complete), None)
    if first is None:
        return metas
    say = note or (lambda m: None if quiet else print(f"obd: {m}", file=sys.stderr, flush=True))
    root = meta_root(opts.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    say(
        f"{image.reference}: plain image; building the file-system index of "
        f"{len(metas) - first} of {len(metas)} layers (each layer is read once)"
    )
    client = opts.client(ref.api_host if opts.is_http(ref.api_host) else None)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as work:
        builder = TurboBuilder(work, str(base_layer_path(opts.cache_dir)))
        try:
            for i, m in enumerate(metas):
                if i < first:
                    builder.add_existing(str(m.meta))
                    continue
                short = m.digest.split(":")[-1][:12]
                blob_path = os.path.join(work, "layer.blob")
                remote = RemoteBlob(
                    client,
                    opts.runner,
                    ref,
                    m.digest,
                    m.size,
                    name=f"{ref.registry}/{ref.repository}@{m.digest}",
                )
                try:
                    _download(remote, blob_path, f"layer {i + 1}/{len(metas)} {short}", quiet=quiet)
                finally:
                    remote.close()
                out = tempfile.mkdtemp(prefix="layer-", dir=root)
                try:
                    built = builder.build(
                        blob_path, out, name=f"{image.reference} layers[{i}]", progress=lambda _p: None
                    )
                    record = {
                        "layer": {"digest": m.digest, "size": m.size, "mediaType": m.media_type},
                        "chain": [x.digest for x in metas[: i + 1]],
                        "diffID": built.diff_id,
                        "compression": built.compression,
                        "stats": vars(built.stats),
                    }
                    with open(os.path.join(out, RECORD_NAME), "w", encoding="utf-8") as f:
                        json.dump(record, f, indent=1)
                    if m.directory.exists():
                        shutil.rmtree(out)  # another process built it meanwhile: same bytes
                    else:
                        publish_path(out, m.directory)
                except BaseException:
                    shutil.rmtree(out, ignore_errors=True)
                    raise
                finally:
                    os.unlink(blob_path)
                s = built.stats
                say(
                    f"layer {i + 1}/{len(metas)} {short}: {s.entries} entries, {s.files} files; meta "
                    f"{s.meta_file_bytes} bytes"
                    + (f", gzip index {s.gzip_index_bytes} bytes" if built.gzip_index else "")
                    + f" ({s.seconds:.1f} s)"
                )
        finally:
            builder.close()
    return metas


def plain_lowers(metas: list[MetaLayer], cache_dir: str | os.PathLike[str] | None) -> list[LowerConfig]:
    """The lowers of the lazy stack: the base layer, then each meta layer with its target blob."""
    lowers = [LowerConfig(file=str(base_layer_path(cache_dir)))]
    for m in metas:
        gz = m.gzip_index
        lowers.append(LowerConfig(file=str(m.meta), targetDigest=m.digest, gzipIndex=str(gz) if gz else ""))
    return lowers


__all__ = [
    "META_DIR",
    "MetaLayer",
    "ensure_meta",
    "meta_root",
    "plain_lowers",
    "plan_meta",
]
