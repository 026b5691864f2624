"""The one repair path for bad bytes of a registry blob: evict, refetch once from the origin, keep.

Two checkers find bad bytes: a :class:`~obd.verify.verifier.VerifiedSource` (a block whose sha256
is not its digest table's) and a ZFile reader (a block whose CRC32C fails). Both ask the
:class:`OriginRepair` of the blob for the range: its cached copy is dropped (``evict``), the range
is fetched once from the origin registry, past mirrors and the cache (``origin``), and the caller
checks that copy. A good copy is written back to the cache (:meth:`OriginRepair.keep`) so the next
read is a hit, not another refetch; a bad one ends in the caller's typed error.

A ZFile reader sits above windows of the blob (the tar envelope's payload); :func:`find_repair`
walks down to the source that carries the repair and returns the offset shift on the way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from obd.io.source import Source, WindowSource
from obd.observability.stats import Stats, default_stats

log = logging.getLogger("obd.verify")

#: Counters in the stats (verify_* are the digest-table checks; crc_* the ZFile CRC checks).
REFETCHES = "verify_refetches"
CRC_MISMATCHES = "crc_mismatches"
CRC_REFETCHES = "crc_refetches"


class OriginRepair:
    """Refetching ranges of blob ``digest`` from the origin.

    ``evict(offset, length)`` drops them from the cache below, ``origin(offset, length)`` fetches them
    from the origin registry and ``keep(offset, data)`` stores a checked copy in the cache; any may
    be None (nothing cached, no second chance, nowhere to keep). Refetches are widened to ``align``
    (the cache's page size) within the blob's ``size``: the cache keeps whole pages only.
    """

    def __init__(
        self,
        name: str,
        digest: str,
        *,
        evict: Callable[[int, int], None] | None = None,
        origin: Callable[[int, int], bytes] | None = None,
        keep: Callable[[int, bytes], None] | None = None,
        stats: Stats | None = None,
        size: int | None = None,
        align: int = 1,
    ):
        self.name = name
        self.digest = digest
        self.evict = evict
        self.origin = origin
        self.keep_fn = keep
        self.size = size
        self.align = max(1, align)
        self.stats = stats if stats is not None else default_stats()

    def refetch(self, offset: int, length: int, counter: str = REFETCHES) -> Refetched | None:
        """Drop ``[offset, offset + length)`` from the cache and fetch it from the origin (counted
        under ``counter``), widened to whole cache pages so that a good copy can be kept; None when
        there is no origin to ask."""
        if self.evict is not None:
            self.evict(offset, length)
        if self.origin is None:
            return None
        self.stats.incr(counter)
        a = self.align
        lo = offset // a * a
        hi = min(self.size, -(-(offset + length) // a) * a) if self.size is not None else offset + length
        whole = self.origin(lo, max(hi, offset + length) - lo)
        return Refetched(self, lo, whole, offset, length)


class Refetched:
    """A range fetched again from the origin: ``data`` is what was asked for; :meth:`keep` writes the
    whole fetch (whole cache pages) back to the cache once the caller has checked ``data``."""

    def __init__(self, repair: OriginRepair, start: int, whole: bytes, offset: int, length: int):
        self.repair = repair
        self.start = start
        self.whole = whole
        self.data = memoryview(whole)[offset - start : offset - start + length]

    def keep(self) -> None:
        """Write the refetched bytes back to the cache (failures only logged: it is an optimisation)."""
        if self.repair.keep_fn is None:
            return
        try:
            self.repair.keep_fn(self.start, self.whole)
        except OSError as e:
            log.warning("%s: cannot keep the refetched bytes at %d: %s", self.repair.name, self.start, e)


class RepairableSource(Source):
    """A registry blob Source (cache over registry) that also carries its :class:`OriginRepair`, for
    the checkers above it (a ZFile reader). Reads go straight to ``inner``; other attributes too."""

    def __init__(self, inner: Source, repair: OriginRepair):
        self.inner = inner
        self.repair = repair
        self.name = inner.name
        self.size = inner.size

    def readinto(self, buf: memoryview, offset: int) -> int:
        return self.inner.readinto(buf, offset)

    def readinto_nowait(self, buf: memoryview, offset: int) -> int | None:
        return self.inner.readinto_nowait(buf, offset)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # prefetch, evict, cached_bytes...: whatever the source below offers
        return getattr(self.__dict__["inner"], name)


def find_repair(source: Source) -> tuple[OriginRepair, int] | None:
    """The repair of the registry blob under ``source`` and the blob offset of ``source``'s byte 0,
    looking through windows (a tar envelope's payload); None for a source with no origin (a file)."""
    shift = 0
    while True:
        repair = getattr(source, "repair", None)
        if isinstance(repair, OriginRepair):
            return repair, shift
        if isinstance(source, WindowSource):
            shift += source.base
            source = source.parent
            continue
        return None


__all__ = [
    "CRC_MISMATCHES",
    "CRC_REFETCHES",
    "REFETCHES",
    "OriginRepair",
    "Refetched",
    "RepairableSource",
    "find_repair",
]
