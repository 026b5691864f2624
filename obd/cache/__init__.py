"""The persistent block cache in front of remote blobs.

:class:`CacheStore` is the directory (one sparse data file and one page table per blob, a size
limit, LRU eviction by blob, safe for many processes and against crashes); :class:`CachedSource`
reads a blob through it, fetching only missing pages from an upstream's ``fetch_many`` (which
merges, reads ahead and shares fetches: :class:`obd.registry.blob.RemoteBlob`).
docs/cache.md describes the on-disk format and the guarantees.
"""

from obd.cache.source import CachedSource, Upstream
from obd.cache.store import (
    DEFAULT_LIMIT,
    DEFAULT_PAGE_SIZE,
    BlobEntry,
    CacheStore,
    check_digest,
    default_cache_dir,
    parse_size,
)

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_PAGE_SIZE",
    "BlobEntry",
    "CacheStore",
    "CachedSource",
    "Upstream",
    "check_digest",
    "default_cache_dir",
    "parse_size",
]
