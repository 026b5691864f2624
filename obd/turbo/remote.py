"""Plain OCI images from registries, read lazily through turboOCI-style meta layers (docs/index.md).

A plain image (gzip, zstd or uncompressed tar layers, no overlaybd annotations) becomes the stack
``base layer + one meta layer per image layer``; each meta layer's file data is read with Range
requests from the *original* layer blob (through its gzip index for a gzip layer, its frame index
for a multi-frame zstd layer), via the persistent block cache like any registry layer. A zstd layer
of one frame has no seek point: it is decompressed once into the meta directory and read locally.

The meta layers come from the local meta cache (``<cache dir>/turbo/<chain key>/``), or are built on
first use by streaming each missing layer once (progress on stderr) and then cached. The chain key
of layer *i* hashes the digests of layers 0..i: a meta layer's ext4 is built on the ones below it.
Each directory's record lists its files' sizes and sha256 digests; a cached meta layer is trusted
only while they match (else it is removed and rebuilt, with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from obd.cache.store import default_cache_dir
from obd.errors import ChecksumError, ConfigError, UnsupportedError
from obd.image.config import LowerConfig
from obd.io.publish import publish_bytes, publish_path
from obd.layer.baselayer import base_layer_path
from obd.observability.progress import Progress
from obd.oci.model import Image
from obd.registry.blob import RemoteBlob
from obd.registry.reference import Reference
from obd.turbo.build import (
    GZIP_INDEX_NAME,
    LOCAL_COPY_NAME,
    META_NAME,
    ZSTD_INDEX_NAME,
    TurboBuilder,
    TurboLayer,
    chain_key,
)
from obd.turbo.zstd import decompress_file
from obd.verify.local import SIDECAR_SUFFIX, keep_table_of_file

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
GZIP_LAYER_TYPES = {t for t in PLAIN_LAYER_TYPES if t.endswith("gzip")}
#: Files of a meta directory whose sha256 the record keeps (the local copy: its size only, it is
#: big; its blocks are checked on every read against its digest table, which is hashed here).
HASHED_FILES = (META_NAME, GZIP_INDEX_NAME, ZSTD_INDEX_NAME, LOCAL_COPY_NAME + SIDECAR_SUFFIX)
#: The record's entry naming a ``gzip.meta`` read from the registry (:attr:`MetaLayer.remote_index`).
REMOTE_INDEX = "gzipIndexBlob"
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
        """The seek-point index of the layer blob: ``gzip.meta``, or ``zstd.meta`` for zstd."""
        for name in (GZIP_INDEX_NAME, ZSTD_INDEX_NAME):
            p = self.directory / name
            if p.is_file():
                return p
        return None

    @property
    def remote_index(self) -> tuple[str, int] | None:
        """``(digest, size)`` of the layer's ``gzip.meta`` when it is read from the registry by
        ranges instead of kept here (its meta came from an artifact with :mod:`obd.turbo.parts`)."""
        try:
            found = json.loads((self.directory / RECORD_NAME).read_text(encoding="utf-8")).get(REMOTE_INDEX)
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(found, dict):
            return None
        digest, size = found.get("digest"), found.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            return None
        return digest, size

    @property
    def local_copy(self) -> Path | None:
        """The decompressed tar of a zstd layer without seek points."""
        p = self.directory / LOCAL_COPY_NAME
        return p if p.is_file() else None

    @property
    def complete(self) -> bool:
        return (self.directory / RECORD_NAME).is_file() and self.meta.is_file()

    def mismatch(self) -> str | None:
        """Why the cached directory cannot be trusted (a file differs from its record), or None."""
        try:
            record = json.loads((self.directory / RECORD_NAME).read_text(encoding="utf-8"))
            files = record["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "no readable record of its files"
        if not isinstance(files, dict) or META_NAME not in files:
            return "no readable record of its files"
        if record.get("layer", {}).get("digest") != self.digest:
            return "recorded for another layer"
        for name, want in files.items():
            p = self.directory / name
            if not isinstance(want, dict) or name not in (*HASHED_FILES, LOCAL_COPY_NAME):
                return f"the record of {name} is not readable"
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != want.get("size"):
                return f"{name} is {p.stat().st_size} bytes, the record says {want.get('size')}"
            if name in HASHED_FILES and _sha256(p) != want.get("sha256"):
                return f"{name} does not have its recorded sha256"
        return None

    def valid(self) -> bool:
        """Whether the cached meta layer can be used; a complete but damaged one is removed (logged)."""
        if not self.complete:
            return False
        why = self.mismatch()
        if why is None:
            return True
        log.warning("cached meta layer %s of %s: %s; rebuilding it", self.directory, self.digest, why)
        shutil.rmtree(self.directory, ignore_errors=True)
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write_record(directory: str | os.PathLike[str], record: Mapping[str, object]) -> None:
    """Write a meta directory's ``turbo.json``: ``record`` plus the size (and sha256) of its files."""
    files: dict[str, dict[str, object]] = {}
    for name in (*HASHED_FILES, LOCAL_COPY_NAME):
        p = Path(directory) / name
        if p.is_file():
            files[name] = {"size": p.stat().st_size}
            if name in HASHED_FILES:
                files[name]["sha256"] = _sha256(p)
    publish_bytes(Path(directory) / RECORD_NAME, json.dumps({**record, "files": files}, indent=1).encode())


def plan_meta(image: Image, cache_dir: str | os.PathLike[str] | None) -> list[MetaLayer]:
    """The meta layers of a plain image, cached or not; unsupported layer types are refused here."""
    root = meta_root(cache_dir)
    out = []
    digests: list[str] = []
    for i, d in enumerate(image.layers):
        if d.media_type not in PLAIN_LAYER_TYPES | ZSTD_LAYER_TYPES:
            raise UnsupportedError(
                "not a tar layer; only tar, tar+gzip and tar+zstd layers can be read lazily",
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


#: Puts layer ``i``'s blob (digest checked) at the given path, or returns the path of a local one.
BlobGetter = Callable[[int, "MetaLayer", str], str]


def ensure_meta(
    ref: Reference,
    image: Image,
    opts: RemoteOptions,
    *,
    quiet: bool = False,
    note: Callable[[str], None] | None = None,
) -> list[MetaLayer]:
    """The meta layers of plain registry image ``image``, building (and caching) the missing ones.

    Layers below the first missing one are taken from the cache; from there up each layer blob is
    streamed once from the registry (bypassing the block cache: later reads fetch only what is
    read), indexed, applied and committed. ``note`` (default: a line on stderr unless ``quiet``)
    hears what is happening.
    """
    quiet = quiet or opts.quiet
    client = client_for(ref, opts)

    def fetch(i: int, m: MetaLayer, dest: str) -> str:
        remote = RemoteBlob(client, opts.runner, ref, m.digest, m.size, name=f"{ref.name}@{m.digest}")
        try:
            _download(remote, dest, f"layer {i + 1}/{len(image.layers)} {_short(m)}", quiet=quiet)
        finally:
            remote.close()
        keep_table_of_file(opts.cache_dir, m.digest, dest)  # digest checked: docs/verify.md
        return dest

    return build_meta(image, opts.cache_dir, fetch, quiet=quiet, note=note)


def ensure_layout_meta(
    image: Image,
    blob_path: Callable[[str], str],
    cache_dir: str | os.PathLike[str] | None,
    *,
    quiet: bool = False,
) -> list[MetaLayer]:
    """The meta layers of a plain image stored in an OCI layout (``blob_path(digest)`` is a blob's
    file), built from its blobs where missing and cached exactly as for a registry image."""

    def local(i: int, m: MetaLayer, _dest: str) -> str:
        path = blob_path(m.digest)
        _check_file(path, m)
        return path

    return build_meta(image, cache_dir, local, quiet=quiet)


def _check_file(path: str, m: MetaLayer) -> None:
    """A layout blob must be what the manifest says: size and digest (checked before it is indexed)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ConfigError(
            "layer blob missing from the layout", path=path, field="digest", value=m.digest
        ) from None
    if size != m.size:
        raise ChecksumError(f"blob is {size} bytes, the manifest says {m.size}", path=path, field="size")
    alg, _, want = m.digest.partition(":")
    h = hashlib.new(alg)
    with open(path, "rb") as f:
        while chunk := f.read(PIECE):
            h.update(chunk)
    if h.hexdigest() != want:
        raise ChecksumError(f"layer blob has {alg}:{h.hexdigest()}", path=path, field="digest")


def _short(m: MetaLayer) -> str:
    return m.digest.split(":")[-1][:12]


def build_meta(
    image: Image,
    cache_dir: str | os.PathLike[str] | None,
    get_blob: BlobGetter,
    *,
    quiet: bool = False,
    note: Callable[[str], None] | None = None,
) -> list[MetaLayer]:
    """Build (and cache) the missing meta layers of ``image`` from the blobs ``get_blob`` gives."""
    metas = plan_meta(image, cache_dir)
    first = next((i for i, m in enumerate(metas) if not m.valid()), None)
    if first is None:
        return metas
    say = note or (lambda m: None if quiet else print(f"obd: {m}", file=sys.stderr, flush=True))
    root = meta_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    say(
        f"{image.reference}: plain image; building the file-system index of "
        f"{len(metas) - first} of {len(metas)} layers (each layer is read once)"
    )
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as work:
        builder = TurboBuilder(work, str(base_layer_path(cache_dir)))
        try:
            for i, m in enumerate(metas):
                if i < first:
                    builder.add_existing(str(m.meta))
                    continue
                tmp_blob = os.path.join(work, "layer.blob")
                blob_path = get_blob(i, m, tmp_blob)
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
                    write_record(out, record)
                    if m.directory.exists():
                        shutil.rmtree(out)  # another process built it meanwhile: same bytes
                    else:
                        publish_path(out, m.directory)
                except BaseException:
                    shutil.rmtree(out, ignore_errors=True)
                    raise
                finally:
                    if os.path.exists(tmp_blob):
                        os.unlink(tmp_blob)
                _say_built(say, i, len(metas), m, built)
        finally:
            builder.close()
    return metas


def _say_built(say: Callable[[str], None], i: int, n: int, m: MetaLayer, built: TurboLayer) -> None:
    s = built.stats
    kind = _index_kind(built.compression)
    say(
        f"layer {i + 1}/{n} {_short(m)}: {s.entries} entries, {s.files} files; meta {s.meta_file_bytes} bytes"
        + (f", {kind} {s.gzip_index_bytes} bytes" if built.gzip_index else "")
        + f" ({s.seconds:.1f} s)"
    )
    if built.local_copy:
        say(
            f"layer {i + 1}/{n} {_short(m)}: zstd blob of {s.zstd_frames} frame(s), no seek points small "
            f"enough for lazy reads: keeping it decompressed in the cache ({s.local_copy_bytes} bytes, "
            "read locally, not lazily)"
        )


def ensure_local_copies(ref: Reference, metas: list[MetaLayer], opts: RemoteOptions) -> None:
    """Give every zstd layer without a frame index (one read from an index artifact: the artifact
    carries no layer data) its decompressed copy, fetching the blob once; a line on stderr says why."""
    for i, m in enumerate(metas):
        if m.media_type not in ZSTD_LAYER_TYPES or m.gzip_index is not None or m.local_copy is not None:
            continue
        if not opts.quiet:
            print(
                f"obd: layer {i + 1}/{len(metas)} {m.digest.split(':')[-1][:12]}: zstd blob without seek "
                "points small enough for lazy reads: fetching it once and keeping it decompressed",
                file=sys.stderr,
                flush=True,
            )
        with tempfile.TemporaryDirectory(prefix="copy-", dir=m.directory.parent) as work:
            blob_path = os.path.join(work, "layer.blob")
            remote = RemoteBlob(
                client_for(ref, opts), opts.runner, ref, m.digest, m.size, name=f"{ref.name}@{m.digest}"
            )
            try:
                _download(remote, blob_path, f"layer {i + 1}/{len(metas)}", quiet=opts.quiet)
            finally:
                remote.close()
            decompress_file(blob_path, m.directory / LOCAL_COPY_NAME)
        record = json.loads((m.directory / RECORD_NAME).read_text(encoding="utf-8"))
        record.pop("files", None)
        write_record(m.directory, record)


def client_for(ref: Reference, opts: RemoteOptions) -> Any:
    """The registry client for ``ref``'s host under ``opts``."""
    return opts.client(ref.api_host if opts.is_http(ref.api_host) else None)


def _index_kind(compression: str) -> str:
    return "zstd frame index" if compression == "zstd" else "gzip index"


def plain_lowers(metas: list[MetaLayer], cache_dir: str | os.PathLike[str] | None) -> list[LowerConfig]:
    """The lowers of the lazy stack: the base layer, then each meta layer with its target blob (or,
    for a zstd layer without seek points, its local decompressed copy)."""
    lowers = [LowerConfig(file=str(base_layer_path(cache_dir)))]
    for m in metas:
        copy = m.local_copy
        if copy is not None:
            lowers.append(LowerConfig(file=str(m.meta), targetFile=str(copy)))
            continue
        gz = m.gzip_index
        remote = m.remote_index if gz is None else None
        if remote is not None:  # gzip.meta by ranges from the registry, like the layer blob
            lowers.append(
                LowerConfig(
                    file=str(m.meta),
                    targetDigest=m.digest,
                    size=m.size,
                    gzipIndexDigest=remote[0],
                    gzipIndexSize=remote[1],
                )
            )
            continue
        if gz is None and m.media_type not in PLAIN_LAYER_TYPES - GZIP_LAYER_TYPES:
            raise ConfigError(
                "meta layer has neither a seek-point index nor a local copy of its compressed layer",
                path=str(m.directory),
                field="gzipIndex",
                value=m.media_type,
            )
        # the target's size spares a HEAD request per layer when the device opens
        index = str(gz) if gz else ""
        lowers.append(LowerConfig(file=str(m.meta), targetDigest=m.digest, size=m.size, gzipIndex=index))
    return lowers


__all__ = [
    "META_DIR",
    "MetaLayer",
    "build_meta",
    "client_for",
    "ensure_layout_meta",
    "ensure_local_copies",
    "ensure_meta",
    "meta_root",
    "plain_lowers",
    "plan_meta",
    "write_record",
]
