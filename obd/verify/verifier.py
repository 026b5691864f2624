"""``VerifiedSource``: a layer blob whose every block is checked against its digest table.

It sits above the block cache, so bytes from the registry, a mirror and the cache are all checked
the same way: a read becomes whole aligned blocks read through the layer's blob Source, each
hashed with SHA-256 (``hashlib`` over memoryviews: C speed, one digest compare per block) and
compared with the table before any byte is handed out. Verified blocks are kept in a small
in-memory LRU, so the many small reads a ZFile makes inside one block hash it once.

A block that fails is counted and logged; its cached copy is evicted (``evict``) and it is fetched
once more from the origin registry, past mirrors and the cache (``origin``). If that copy fails
too, :class:`~obd.errors.IntegrityError` names the blob, the offset and both digests. Wrong bytes
are never returned.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from obd.errors import IntegrityError
from obd.io.source import Source
from obd.observability.stats import Stats, default_stats
from obd.verify.format import DigestTable
from obd.verify.repair import REFETCHES, OriginRepair

log = logging.getLogger("obd.verify")

#: Counters in the stats.
VERIFIED_BLOCKS = "verify_blocks"
VERIFIED_BYTES = "verify_bytes"
MISMATCHES = "verify_mismatches"
#: Bytes of verified blocks kept in memory per source.
DEFAULT_KEEP_BYTES = 8 << 20


class VerifiedSource(Source):
    """``inner`` (the layer blob: cache over registry) with every block checked against ``table``.

    ``evict(offset, length)`` drops a bad block from the cache below; ``origin(offset, length)``
    fetches it from the origin registry. Either may be None (nothing to evict, no second chance).
    ``repair`` (an :class:`~obd.verify.repair.OriginRepair`) replaces both, and also writes a good
    refetched block back to the cache.
    """

    def __init__(
        self,
        inner: Source,
        table: DigestTable,
        *,
        digest: str,
        name: str | None = None,
        stats: Stats | None = None,
        evict: Callable[[int, int], None] | None = None,
        origin: Callable[[int, int], bytes] | None = None,
        repair: OriginRepair | None = None,
        keep_bytes: int = DEFAULT_KEEP_BYTES,
    ):
        table.check_blob(digest, inner.size, path=name or inner.name)
        self.inner = inner
        self.table = table
        self.digest = digest
        self.name = name or inner.name
        self.size = inner.size
        self.block_size = table.block_size
        self.stats = stats if stats is not None else default_stats()
        self.repair = repair or OriginRepair(self.name, digest, evict=evict, origin=origin, stats=self.stats)
        self._keep = max(1, keep_bytes // self.block_size)
        self._blocks: OrderedDict[int, memoryview] = OrderedDict()
        self._lock = threading.Lock()

    # -- the Source interface ----------------------------------------------------------------------

    def readinto(self, buf: memoryview, offset: int) -> int:
        n = min(len(buf), self.size - offset)
        if n <= 0:
            return 0
        view = memoryview(buf).cast("B")[:n]
        bs = self.block_size
        block, last = offset // bs, (offset + n - 1) // bs
        while block <= last:
            kept = self._kept(block)
            if kept is not None:
                self._copy_out(view, offset, block, kept)
                block += 1
                continue
            end = block
            while end < last and not self._has(end + 1):
                end += 1
            lo, hi = block * bs, min(self.size, (end + 1) * bs)
            if lo >= offset and hi <= offset + n:
                # whole blocks of the caller's buffer: read and check them in place, keep nothing
                self._load(block, end, view[lo - offset : hi - offset])
            else:
                for i, data in enumerate(self._load(block, end)):
                    self._copy_out(view, offset, block + i, data)
            block = end + 1
        return n

    def readinto_nowait(self, buf: memoryview, offset: int) -> int | None:
        n = min(len(buf), self.size - offset)
        if n <= 0:
            return 0
        bs = self.block_size
        blocks = range(offset // bs, (offset + n - 1) // bs + 1)
        with self._lock:
            kept = [self._blocks.get(b) for b in blocks]
        if any(k is None for k in kept):
            return None
        view = memoryview(buf).cast("B")[:n]
        for b, data in zip(blocks, kept, strict=True):
            assert data is not None
            self._copy_out(view, offset, b, data)
        return n

    def prefetch(self, ranges: list[tuple[int, int]]) -> int:
        """Pass a prefetch to the source below (bytes are checked when read)."""
        inner_prefetch = getattr(self.inner, "prefetch", None)
        return int(inner_prefetch(ranges)) if inner_prefetch is not None else 0

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
        self.inner.close()

    # -- blocks ------------------------------------------------------------------------------------

    def _has(self, block: int) -> bool:
        with self._lock:
            return block in self._blocks

    def _kept(self, block: int) -> memoryview | None:
        with self._lock:
            data = self._blocks.get(block)
            if data is not None:
                self._blocks.move_to_end(block)
            return data

    def _copy_out(self, view: memoryview, offset: int, block: int, data: memoryview) -> None:
        start = block * self.block_size
        lo, hi = max(start, offset), min(start + len(data), offset + len(view))
        view[lo - offset : hi - offset] = data[lo - start : hi - start]

    def _load(self, first: int, last: int, into: memoryview | None = None) -> list[memoryview]:
        """Blocks ``first..last`` read through the source below, each verified (or repaired): into
        ``into`` (exactly their bytes) when given, else into a buffer of their own, kept in the LRU."""
        bs = self.block_size
        start = first * bs
        end = min(self.size, (last + 1) * bs)
        whole = into if into is not None else memoryview(bytearray(end - start))
        got = 0
        while got < len(whole):
            k = self.inner.readinto(whole[got:], start + got)
            if k <= 0:
                raise IntegrityError(
                    f"blob ended at {start + got} of {self.size} bytes", path=self.name, field="size"
                )
            got += k
        out = []
        for b in range(first, last + 1):
            piece = whole[(b - first) * bs : min(len(whole), (b - first + 1) * bs)]
            if hashlib.sha256(piece).digest() != self.table.digest(b):
                piece[:] = self._repair(b, piece)
            out.append(piece)
        self.stats.incr(VERIFIED_BLOCKS, last - first + 1)
        self.stats.incr(VERIFIED_BYTES, len(whole))
        if into is not None:
            return out
        with self._lock:
            for b, piece in zip(range(first, last + 1), out, strict=True):
                self._blocks[b] = piece
                self._blocks.move_to_end(b)
            while len(self._blocks) > self._keep:
                self._blocks.popitem(last=False)
        return out

    def _repair(self, block: int, bad: memoryview) -> memoryview:
        """A good copy of ``block`` (whose bytes ``bad`` failed) from the origin, or IntegrityError."""
        off, length = self.table.block_range(block)
        want = bytes(self.table.digest(block)).hex()
        got = hashlib.sha256(bad).hexdigest()
        self.stats.incr(MISMATCHES)
        log.warning(
            "%s: block %d at offset %d has sha256:%s, the digest table says sha256:%s; refetching it "
            "from the origin",
            self.name,
            block,
            off,
            got,
            want,
        )
        origin_note = "no origin to refetch from"
        fetched = self.repair.refetch(off, length, REFETCHES)
        if fetched is not None:
            data = fetched.data
            again = hashlib.sha256(data).hexdigest()
            if len(data) == length and again == want:
                log.warning(
                    "%s: block %d: the origin's copy is good; serving and caching it", self.name, block
                )
                fetched.keep()
                return data
            origin_note = f"the origin's copy, sha256:{again}, is wrong as well"
            if again == got:
                origin_note = "the origin serves the same bytes"
        raise IntegrityError(
            f"block {block} (bytes {off}..{off + length}) has sha256:{got}, the digest table says "
            f"sha256:{want}; {origin_note}",
            path=f"{self.name} (blob {self.digest})",
            field="offset",
            value=off,
        )


__all__ = ["MISMATCHES", "REFETCHES", "VERIFIED_BLOCKS", "VERIFIED_BYTES", "VerifiedSource"]
