"""Overlaybd images read lazily from registries: layer blobs as cached, ranged-GET sources.

A registry layer becomes ``RemoteBlob`` (ranged GETs, coalesced) → ``CachedSource`` (the persistent
page cache, shared by every process) → the usual blob peeling (tar envelope, ZFile, LSMT). Opening a
layer reads only what its readers need: the ZFile trailer and jump table and the LSMT trailer and
index; every later read fetches just the compressed blocks behind it.

:class:`RemoteOptions` carries everything remote reads need (credentials, plain-HTTP hosts, TLS,
the cache, the platform, the statistics) and owns the registry clients, one per setting, on the
process-wide event-loop thread.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from obd.cache import CachedSource, CacheStore
from obd.cache.store import default_cache_dir, parse_size
from obd.errors import ChecksumError, ConfigError, UnsupportedError
from obd.image.accel import META_KEY, trace_layer_ref
from obd.image.config import ImageConfig, LowerConfig
from obd.image.local import layer_from_blob, layer_from_source
from obd.io.publish import publishing
from obd.io.source import FileSource, Source
from obd.layer.baselayer import packaged_blob
from obd.layer.blob import open_source
from obd.lsmt.sealed import SealedLayer
from obd.observability.stats import TIME_OPEN, TIME_RESOLVE, Stats, default_stats
from obd.oci.layout import OCILayout, layout_blob_path, write_layout
from obd.oci.model import Image, config_platform, parse_descriptors
from obd.registry.auth import CredentialResolver, Credentials
from obd.registry.blob import READAHEAD_AUTO, RemoteBlob
from obd.registry.client import RegistryClient
from obd.registry.content import ContentCache
from obd.registry.dragonfly import P2PConfig, background_reads
from obd.registry.loop import AsyncRunner, default_runner
from obd.registry.reference import DOCKER_HUB_API, Reference, parse_reference
from obd.turbo import is_plain_image
from obd.verify.index import fetch_manifest_tables, image_table_pins
from obd.verify.pins import TablePin, lower_pin, pins_json, table_descriptors
from obd.verify.repair import RepairableSource
from obd.verify.signature import verify_image_signature
from obd.verify.table import open_verified, origin_repair

#: How long resolving a manifest and config may take, in seconds.
RESOLVE_TIMEOUT = 120.0


@dataclass
class RemoteOptions:
    """How to reach registries. ``insecure`` is True (every registry over plain HTTP) or docker's
    insecure registries: hosts tried over HTTPS without certificate checks, then plain HTTP."""

    credentials: Credentials | None = None
    insecure: bool | tuple[str, ...] = False
    tls_verify: bool = True
    ca_file: str | None = None
    cache_dir: str | None = None
    cache_limit: int | None = None
    no_cache: bool = False
    platform: str | None = None
    #: bytes read ahead of a registry read: :data:`READAHEAD_AUTO` (sequential reads, by the link's
    #: bandwidth-delay product), 0 (none) or a fixed size after every miss
    readahead: int = READAHEAD_AUTO
    #: containerd-style hosts.toml directories (mirrors, per-host TLS); None: the default ones
    hosts_dirs: tuple[str, ...] | None = None
    #: HTTP proxy for registry requests (else HTTP_PROXY/HTTPS_PROXY/NO_PROXY)
    proxy: str | None = None
    #: read a plain image's index artifact found through the referrers tag fallback (a weak link)
    allow_referrers: bool = False
    p2p: P2PConfig | None = None  # Dragonfly: dfdaemon's proxy or overlaybd's URL prefix (docs/fleet.md)
    #: registry layers opened at once (their header, index and table reads overlap); 1: one by one
    open_parallel: int = 16
    #: ``require``, ``auto`` or ``off``: check layer blocks against the image's digest tables (docs/verify.md)
    verify: str = "auto"
    #: a cosign public key (PEM): the manifest must carry a signature it verifies (docs/verify.md)
    verify_signature: str | None = None
    #: no progress bars or build messages (``--quiet``): the plain-image index build stays silent
    quiet: bool = False
    stats: Stats = field(default_factory=default_stats)
    _clients: dict[frozenset[str] | bool, RegistryClient] = field(default_factory=dict, repr=False)
    _store: CacheStore | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def runner(self) -> AsyncRunner:
        return default_runner()

    def client(self, http_host: str | None = None) -> RegistryClient:
        """The client for these options; ``http_host`` adds a host reached over plain HTTP (one an
        image config's ``http://`` blob URL names)."""
        key: frozenset[str] | bool = (
            True if self.insecure is True else frozenset([http_host.lower()] if http_host else ())
        )
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = RegistryClient(
                    credentials=CredentialResolver(self.credentials),
                    insecure=key,
                    tls_verify=self.tls_verify,
                    skip_verify=self.insecure if isinstance(self.insecure, tuple) else (),
                    ca_file=self.ca_file,
                    stats=self.stats,
                    hosts=self.hosts_dirs,
                    proxy=self.proxy,
                    p2p=self.p2p,
                    content_cache=None if self.no_cache else ContentCache(self._content_dir()),
                )
                self._clients[key] = client
                _live.append(self)
            return client

    def _content_dir(self) -> Path:
        return Path(self.cache_dir or default_cache_dir()) / "content"

    def store(self) -> CacheStore | None:
        """The persistent block cache (None with ``no_cache``)."""
        if self.no_cache:
            return None
        with self._lock:
            if self._store is None:
                self._store = CacheStore(self.cache_dir, limit_bytes=self.cache_limit, stats=self.stats)
            return self._store

    def is_http(self, host: str) -> bool:
        """Whether ``host`` is reached over plain HTTP: every host with ``insecure=True``; an insecure
        registry once its client found it does not speak TLS (docker's rule: HTTPS first)."""
        if self.insecure is True:
            return True
        if host.lower() not in {h.lower() for h in self.insecure or ()}:
            return False
        return self.client().is_insecure(host)

    def close(self) -> None:
        """Close the registry clients' HTTP sessions."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            try:
                self.runner.run(c.aclose(), 10)
            except Exception:
                pass


_live: list[RemoteOptions] = []
_default: RemoteOptions | None = None


def parse_readahead(text: str) -> int:
    """``--readahead`` / ``readahead=``: ``auto`` (:data:`~obd.registry.blob.READAHEAD_AUTO`), 0 or a size."""
    return READAHEAD_AUTO if text.strip().lower() == "auto" else parse_size(text)


def default_remote_options() -> RemoteOptions:
    """The process-wide options used wherever none are passed (set by the CLI or the nbd plugin)."""
    global _default
    if _default is None:
        _default = RemoteOptions()
    return _default


def set_default_remote_options(opts: RemoteOptions) -> None:
    """Make ``opts`` what :func:`default_remote_options` returns (e.g. ``--insecure-registry`` for a run)."""
    global _default
    _default = opts


@atexit.register
def _close_all() -> None:
    for opts in list(_live):
        opts.close()


def repo_blob_url(ref: Reference, opts: RemoteOptions) -> str:
    """overlaybd's ``repoBlobUrl``: ``https://<api host>/v2/<repository>/blobs``."""
    return f"{ref.base_url(opts.is_http(ref.api_host))}{ref.repository}/blobs"


def parse_repo_blob_url(url: str, *, path: object = None) -> tuple[Reference, bool]:
    """The repository a ``repoBlobUrl`` names, and whether it is plain HTTP."""
    parts = urlsplit(url)
    segs = [s for s in parts.path.split("/") if s]
    if parts.scheme not in ("http", "https") or not parts.netloc or len(segs) < 3 or segs[0] != "v2":
        raise ConfigError(
            "expected http(s)://HOST/v2/REPOSITORY/blobs", path=path, field="repoBlobUrl", value=url
        )
    if segs[-1] == "blobs":
        segs = segs[:-1]
    host = parts.netloc
    registry = "docker.io" if host == DOCKER_HUB_API else host
    return Reference(registry, "/".join(segs[1:]), "latest", None), parts.scheme == "http"


def resolve_image(reference: str, opts: RemoteOptions) -> tuple[Reference, Image]:
    """The manifest, config and layers of a registry image (platform-resolved, digest-verified).

    The layers' digest tables that the manifest pins are fetched while the config is (one round
    trip instead of two): :func:`image_to_config` then finds them in the process's table cache.
    """
    ref = parse_reference(reference)
    client = opts.client()
    started = time.monotonic()
    tables: list[Future[object]] = []

    def on_manifest(repo: Reference, manifest: dict[str, Any]) -> None:
        if opts.verify != "off":
            tables.append(_early_tables.submit(_prefetch_tables, repo, manifest, opts))

    try:
        got = client.get_image(ref, opts.platform, on_manifest=on_manifest)
        image = opts.runner.run(got, RESOLVE_TIMEOUT)
    finally:
        wait(tables)  # its errors, if any, are image_to_config's to report when it fetches again
    if opts.verify_signature:
        check = verify_image_signature(client, ref, image.manifest_digest, opts.verify_signature)
        opts.runner.run(check, RESOLVE_TIMEOUT)
    opts.stats.add_time(TIME_RESOLVE, time.monotonic() - started)
    return ref, image


#: Where :func:`resolve_image` fetches digest tables beside the config (one job per resolve).
_early_tables = ThreadPoolExecutor(max_workers=2, thread_name_prefix="obd-tables")


def _prefetch_tables(ref: Reference, manifest: dict[str, Any], opts: RemoteOptions) -> None:
    """:func:`fetch_manifest_tables` of ``manifest``'s layers. Any error is dropped: the same fetch
    is made again, and reported, by :func:`image_to_config`."""
    with contextlib.suppress(Exception):
        layers = parse_descriptors(manifest, "layers", str(ref))
        fetch_manifest_tables(ref, ((d.digest, d.annotations) for d in layers), opts)


def registry_config(reference: str, opts: RemoteOptions) -> ImageConfig:
    """The ``config.v1.json`` overlaybd's snapshotter would write for a registry image."""
    ref, image = resolve_image(reference, opts)
    started = time.monotonic()
    try:
        return image_to_config(ref, image, opts, label=reference)
    finally:
        opts.stats.add_time(TIME_RESOLVE, time.monotonic() - started)  # digest tables, plain-image index


def image_to_config(ref: Reference, image: Image, opts: RemoteOptions, *, label: str) -> ImageConfig:
    """The ``config.v1.json`` of a resolved registry image: its layers as ``digest`` lowers under a
    ``repoBlobUrl``, and in the ``obd`` metadata the image (``label``), its manifest digest and its
    acceleration layer, if any (:mod:`obd.image.accel`). A plain image (no overlaybd layers) becomes
    the base layer plus turboOCI-style meta layers over its original blobs (:mod:`obd.turbo.remote`)."""
    if is_plain_image(image):
        # lazy: the meta-layer builder pulls in the converter (debugfs, tar reader), which imports this
        from obd.turbo.artifact import image_metas
        from obd.turbo.remote import plain_lowers

        metas = image_metas(ref, image, opts)
        cfg = ImageConfig(lowers=plain_lowers(metas, opts.cache_dir), repoBlobUrl=repo_blob_url(ref, opts))
        cfg.extra["obd"] = {"image": label, "manifest": image.manifest_digest, "plain": True}
        # the layers' tables (built while indexing) and those of gzip indexes read by ranges
        blobs = [m.digest for m in metas] + [lw.gzipIndexDigest for lw in cfg.lowers if lw.gzipIndexDigest]
        kept = image_table_pins(ref, image, opts, blobs)
        if kept:
            cfg.extra["obd"]["verify"] = pins_json(kept)
        return cfg
    lowers = []
    accel = None
    for i, layer in enumerate(image.overlaybd_layers()):
        if layer.is_acceleration:
            accel = layer
            continue
        if layer.is_turbo:
            raise UnsupportedError(
                "turboOCI images are not read from registries yet", path=label, field=f"layers[{i}]"
            )
        lowers.append(LowerConfig(digest=layer.digest, size=layer.size))
    cfg = ImageConfig(lowers=lowers, repoBlobUrl=repo_blob_url(ref, opts))
    cfg.extra["obd"] = {"image": label, "manifest": image.manifest_digest}
    pins = image_table_pins(ref, image, opts, (lw.digest for lw in lowers))  # manifest's, obd index's
    if pins:
        cfg.extra["obd"]["verify"] = pins_json(pins)
    if accel is not None:
        cfg.extra["obd"][META_KEY] = trace_layer_ref(accel)
    return cfg


def open_remote_blob(
    url: str,
    digest: str,
    size: int | None,
    opts: RemoteOptions,
    *,
    path: object = None,
    table: TablePin | None = None,
) -> Source:
    """Blob ``digest`` under ``repoBlobUrl`` ``url``: ranged GETs through the persistent cache, and
    above the cache, with a digest ``table`` pin (and ``verify`` not off), every block checked."""
    ref, http = parse_repo_blob_url(url, path=path)
    client = opts.client(ref.api_host if http else None)
    remote = RemoteBlob(
        client,
        opts.runner,
        ref,
        digest,
        size or None,
        name=f"{ref.registry}/{ref.repository}@{digest}",
        readahead=opts.readahead,
        stats=opts.stats,
    )
    store = opts.store()
    src: Source = remote if store is None else CachedSource(remote, store, digest=digest, stats=opts.stats)
    if table is None or opts.verify == "off":
        return RepairableSource(src, origin_repair(src, opts, ref, digest, http=http))  # ZFile CRC refetch
    return open_verified(src, opts, ref, digest, table, http=http)


def open_registry_layers(
    cfg: ImageConfig, lowers: Sequence[tuple[int, LowerConfig]], opts: RemoteOptions
) -> dict[int, SealedLayer]:
    """The registry lowers ``(index, lower)`` of ``cfg`` opened as sealed layers, by index.

    Opening a layer is a chain of dependent reads (tar header, ZFile header and trailer, jump table,
    LSMT trailer and index, the digest table): a few round trips each. Layers do not depend on one
    another, so up to ``opts.open_parallel`` of them open at once and an image's disk is ready after
    about one layer's chain instead of the sum; and the blob's last bytes (the ZFile trailer, read
    second) are read beside its headers, which saves one more round trip. ``open_parallel=1`` opens
    them one by one, with neither (how obd did before; ``bench/bench_open.py`` compares). On failure
    every layer opened is closed and the error of the lowest failing index is raised.

    The stock base layer is not fetched at all: obd ships its bytes (:func:`packaged_blob`, checked
    against the layer's digest), except with ``no_cache``, which writes nothing to disk.
    """
    if not lowers:
        return {}
    started = time.monotonic()
    try:
        return _open_layers(cfg, lowers, opts)
    finally:
        opts.stats.add_time(TIME_OPEN, time.monotonic() - started)


def _open_layers(
    cfg: ImageConfig, lowers: Sequence[tuple[int, LowerConfig]], opts: RemoteOptions
) -> dict[int, SealedLayer]:
    """:func:`open_registry_layers`, untimed."""

    def source(lower: LowerConfig) -> Source:
        # the base layer's bytes ship with obd: read from disk, like a blob a content store holds
        local = None if opts.no_cache else packaged_blob(lower.digest, lower.size or None, opts.cache_dir)
        if local is not None:
            return FileSource(local, name=f"{lower.digest} (obd's packaged base layer)")
        pin = lower_pin(cfg, lower.digest, opts.verify)
        return open_remote_blob(cfg.repoBlobUrl, lower.digest, lower.size, opts, path=cfg.path, table=pin)

    workers = max(1, min(opts.open_parallel, len(lowers)))
    if workers == 1:
        opened: dict[int, SealedLayer] = {}
        try:
            for i, lower in lowers:
                src = source(lower)
                opened[i] = layer_from_source(src, src.name)
        except BaseException:
            for layer in opened.values():
                layer.close()
            raise
        return opened

    def one(lower: LowerConfig, tails: ThreadPoolExecutor) -> SealedLayer:
        src = source(lower)
        tail = tails.submit(src.pread, max(0, src.size - 1), 1)  # into the cache, beside the headers
        # the tail read's error, if any, is the open's to report (it reads the same bytes); the
        # source is closed only once that read is over
        try:
            blob = open_source(src, src.name)
        except BaseException:
            wait([tail])
            src.close()
            raise
        wait([tail])  # done already: the ZFile open read the trailer
        return layer_from_blob(blob)

    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="obd-open") as pool,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="obd-open-tail") as tails,
    ):
        futures = [(i, pool.submit(one, lower, tails)) for i, lower in lowers]
        wait([f for _, f in futures])
    failed = [f.exception() for _, f in futures if f.exception() is not None]
    if failed:
        for _, f in futures:
            if f.exception() is None:
                f.result().close()
        raise failed[0]  # type: ignore[misc]
    return {i: f.result() for i, f in futures}


@dataclass(frozen=True)
class PullResult:
    reference: str
    manifest_digest: str
    layers: int
    total_bytes: int
    fetched_bytes: int
    seconds: float


def pull_image(
    reference: str,
    opts: RemoteOptions,
    *,
    parallel: int = 4,
    piece: int = 4 << 20,
    max_rate: float | None = None,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> PullResult:
    """Download every layer blob of an image into the persistent cache.

    ``parallel`` ranged GETs of ``piece`` bytes are in flight at once; ``max_rate`` (bytes/s) caps
    the average rate; ``progress(done, total)`` is called as pieces land. Each blob, once complete,
    is read back from the cache and its SHA-256 checked against its digest.
    """
    ref, image = resolve_image(reference, opts)
    return _pull_layers(
        ref, image, opts, parallel=parallel, piece=piece, max_rate=max_rate, verify=verify, progress=progress
    )


def _pull_layers(
    ref: Reference,
    image: Image,
    opts: RemoteOptions,
    *,
    parallel: int,
    piece: int,
    max_rate: float | None,
    verify: bool,
    progress: Callable[[int, int], None] | None,
) -> PullResult:
    """:func:`pull_image` of an image already resolved."""
    if opts.store() is None:
        raise ConfigError("pull fills the cache; it cannot run with no_cache")
    url = repo_blob_url(ref, opts)
    layers = image.overlaybd_layers()
    sources = [open_remote_blob(url, layer.digest, layer.size, opts) for layer in layers]
    total = sum(layer.size for layer in layers)
    start = time.monotonic()
    done = 0
    fetched = 0
    lock = threading.Lock()
    jobs = [(src, off, min(piece, src.size - off)) for src in sources for off in range(0, src.size, piece)]

    @background_reads()  # a pull is prefetch to Dragonfly: lower priority than on-demand reads
    def one(job: tuple[Source, int, int]) -> None:
        nonlocal done, fetched
        src, off, n = job
        got = src.prefetch([(off, n)])  # type: ignore[attr-defined]
        with lock:
            done += n
            fetched += got
            now_done = done
        if progress:
            progress(now_done, total)
        if max_rate:
            ahead = now_done / max_rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)

    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            for f in [pool.submit(one, j) for j in jobs]:
                f.result()
        if verify:
            for src, layer in zip(sources, layers, strict=True):
                _verify_digest(src, layer.digest)
    finally:
        for src in sources:
            src.close()
    return PullResult(str(ref), image.manifest_digest, len(layers), total, fetched, time.monotonic() - start)


def pull_to_layout(
    reference: str,
    opts: RemoteOptions,
    layout: str,
    *,
    tag: str | None = None,
    parallel: int = 4,
    max_rate: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PullResult:
    """Pull an image (as :func:`pull_image`) and write it into the OCI layout ``layout``, unchanged.

    The manifest, config and layer blobs land byte for byte, so the layout's image has the
    registry's manifest digest and ``obd push oci:DIR:TAG`` gives back the same image. ``tag``
    (default: the reference's tag, else ``latest``) names it in ``index.json``; an entry with the
    same tag is replaced. Layers are copied out of the block cache, their digests checked on the way.
    """
    ref, image = resolve_image(reference, opts)
    result = _pull_layers(
        ref, image, opts, parallel=parallel, piece=4 << 20, max_rate=max_rate, verify=False, progress=progress
    )
    client = opts.client()
    raw = opts.runner.run(client.fetch_manifest(ref, image.manifest_digest), RESOLVE_TIMEOUT)
    config_digest = raw.json()["config"]["digest"]
    config = opts.runner.run(client.get_blob(ref, config_digest), RESOLVE_TIMEOUT)
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    url = repo_blob_url(ref, opts)
    blobs: list[tuple[str, str | bytes]] = [(config_digest, config)]
    for layer in image.overlaybd_layers():
        dest = layout_blob_path(layout, layer.digest)
        if not (os.path.isfile(dest) and os.path.getsize(dest) == layer.size):
            src = open_remote_blob(url, layer.digest, layer.size, opts)
            try:
                _copy_verified(src, layer.digest, dest)
            finally:
                src.close()
        blobs.append((layer.digest, dest))
    for table in table_descriptors(image.manifest.get("layers"), path=reference):  # docs/verify.md
        data = opts.runner.run(client.get_blob(ref, table.digest, max_bytes=table.size), RESOLVE_TIMEOUT)
        blobs.append((table.digest, data))
    platform = config_platform(image.config)
    write_layout(
        layout,
        manifest=raw.data,
        media_type=raw.media_type,
        blobs=blobs,
        tag=tag or (ref.tag if ref.tag else "latest"),
        platform=platform,
    )
    OCILayout(layout)  # what was written opens as a layout
    return result


def _copy_verified(src: Source, digest: str, dest: str) -> None:
    """Copy ``src`` to ``dest`` (published atomically and durably) if its content has ``digest``."""
    with publishing(dest) as out:
        _verify_digest(src, digest, out.write)


def _verify_digest(src: Source, digest: str, sink: Callable[[memoryview], object] | None = None) -> None:
    """Read all of ``src`` (passing each piece to ``sink``) and check it has ``digest``."""
    alg, _, want = digest.partition(":")
    h = hashlib.new(alg)
    buf = memoryview(bytearray(4 << 20))
    pos = 0
    while pos < src.size:
        n = src.readinto(buf, pos)
        if n <= 0:
            raise ChecksumError("blob ended early", path=src.name, field="size", value=pos)
        h.update(buf[:n])
        if sink is not None:
            sink(buf[:n])
        pos += n
    if h.hexdigest() != want:
        raise ChecksumError(
            f"downloaded blob has {alg}:{h.hexdigest()}", path=src.name, field="digest", value=digest
        )
