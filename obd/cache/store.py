"""The on-disk block cache: one sparse data file and one page table per blob, LRU-evicted by blob.

Layout under the cache root (``$OBD_CACHE_DIR``, else ``$XDG_CACHE_HOME/obd``, else ``~/.cache/obd``)::

    lock                    flock target: shared while a blob is opened, exclusive while evicting
    usage                   the size ledger every process charges its fills to (see ``_Ledger``)
    sha256/<hex>.data       sparse, blob-sized: blob byte x lives at file byte x (as overlaybd does)
    sha256/<hex>.meta       page table (see :mod:`obd.cache.layout`): a header, one 8-byte record per page
    sha512/<hex>.*          the same for sha512 digests

One cache directory serves every obd process of a host. The rules that make that safe, and safe
against ``kill -9`` (docs/cache.md has the long form):

* A page's bytes are written (and ``fdatasync``-ed, unless ``sync=False``) before its record is, so
  a crash leaves bytes without a record (absent: refetched), never a record without its bytes.
* Every read checks the page's CRC; a page that fails (or reads short) is dropped and refetched.
* A fill holds a lock on the records it is about to write (:mod:`obd.cache.claims`), so a page
  missed by N processes at once is fetched by one of them; the others wait and read it from here.
* An open blob holds a read lock on its page table's first byte: eviction skips blobs in use while
  idle ones can be evicted instead. Eviction takes the root lock exclusively, truncates the page
  table and the data file to 0 and unlinks them; a process still holding them sees absent pages,
  notices the unlinked files (``st_nlink == 0``) and reopens fresh ones. Opening takes the root
  lock shared, so it never races an eviction; a new page table is built under a temporary name and
  linked in atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from obd.cache.claims import PageClaims, in_use, mark_in_use
from obd.cache.layout import (
    ALGORITHMS,
    DEFAULT_PAGE_SIZE,
    DIGEST_RE,
    HEADER_SIZE,
    MAGIC,
    MAX_BLOB_SIZE,
    RECORD_DTYPE,
    RECORD_SIZE,
    MetaHeader,
    check_digest,
    check_page_size,
    expected_tags,
    page_crcs,
    preadv_full,
    present_bytes,
    pwrite_full,
    read_records,
)
from obd.errors import FormatError, ObdError
from obd.observability.stats import Stats, default_stats

log = logging.getLogger("obd.cache")

#: Default size limit of the whole cache (data and page tables, as allocated on disk).
DEFAULT_LIMIT = 10 << 30
#: A write that crosses the limit evicts least-recently-used blobs down to this fraction of it.
LOW_WATER = 0.9
_TMP_PREFIX = ".tmp-"

# Counter names this module records into a :class:`obd.observability.stats.Stats`.
EVICTIONS = "cache_evictions"
EVICTED_BYTES = "cache_evicted_bytes"
RESETS = "cache_resets"


#: Environment variables that set the cache directory and size limit for every obd process.
ENV_DIR = "OBD_CACHE_DIR"
ENV_LIMIT = "OBD_CACHE_LIMIT"


def default_cache_dir() -> Path:
    """``$OBD_CACHE_DIR``; else ``$XDG_CACHE_HOME/obd``; else ``~/.cache/obd``."""
    own = os.environ.get(ENV_DIR, "")
    if own:
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "obd"


def default_limit() -> int:
    """``$OBD_CACHE_LIMIT`` (a size such as ``20G``), else :data:`DEFAULT_LIMIT`."""
    text = os.environ.get(ENV_LIMIT, "")
    if not text:
        return DEFAULT_LIMIT
    try:
        return parse_size(text)
    except ObdError as e:
        raise ObdError(e.detail, field=ENV_LIMIT, value=text) from None


@dataclass
class BlobEntry:
    """One blob in the cache, as :meth:`CacheStore.entries` reports it."""

    digest: str
    #: Bytes the blob's files occupy on disk (allocated blocks, so holes do not count).
    disk_bytes: int
    #: Last use (open, read or fill), seconds since the epoch: the page table's mtime.
    last_used: float
    #: From the page table header; ``None`` when the header is unreadable (``problem`` says why).
    blob_size: int | None = None
    page_size: int | None = None
    pages: int | None = None
    present_bytes: int | None = None
    problem: str | None = None
    #: ``(path, inode)`` of each file, so eviction removes exactly what it scanned.
    files: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["files"]
        return out


def _disk_bytes(st: os.stat_result) -> int:
    return st.st_blocks * 512


#: Allocation unit assumed when charging a fill (ext4, xfs and btrfs allocate 4 KiB blocks).
_BLOCK = 4096


def _fill_cost(nbytes: int, page_size: int) -> int:
    """What a fill of ``nbytes`` may add on disk: its pages, and the page-table blocks its records touch."""
    pages = -(-nbytes // page_size)
    record_blocks = -(-pages * RECORD_SIZE // _BLOCK) + 1  # +1: the records may straddle a block boundary
    return -(-nbytes // _BLOCK) * _BLOCK + record_blocks * _BLOCK


class _Ledger:
    """The ``usage`` file: the cache's bytes on disk as every process of the host has charged them.

    16 bytes, ``b"obdusage"`` and a little-endian u64. Read and written only under an exclusive
    ``flock`` of the file itself. Fills add to it before they write (:meth:`CacheStore.reserve`);
    eviction, prune and clear set it to a fresh count of the directory. Anything else in the file
    (a new cache, damage) reads as unknown and is recounted.
    """

    FORMAT = struct.Struct("<8sQ")
    MAGIC = b"obdusage"

    def read(self, fd: int) -> int | None:
        raw = os.pread(fd, self.FORMAT.size, 0)
        if len(raw) != self.FORMAT.size:
            return None
        magic, value = self.FORMAT.unpack(raw)
        return value if magic == self.MAGIC else None

    def write(self, fd: int, value: int) -> None:
        pwrite_full(fd, self.FORMAT.pack(self.MAGIC, max(0, value)), 0)


_LEDGER = _Ledger()


class BlobCache:
    """An open blob of the cache: its data file and page table. Thread-safe (pread/pwrite only).

    Made by :meth:`CacheStore.open_blob`; :class:`obd.cache.source.CachedSource` is its user.
    """

    def __init__(self, store: CacheStore, digest: str, header: MetaHeader, data_fd: int, meta_fd: int):
        self.store = store
        self.digest = digest
        self.header = header
        self.size = header.blob_size
        self.page_size = header.page_size
        self.pages = header.pages
        self.generation = header.generation
        self.data_fd = data_fd
        self.meta_fd = meta_fd
        self.data_path, self.meta_path = store.paths(digest)
        self._last_touch = time.monotonic()
        mark_in_use(meta_fd)
        #: cross-process claims on pages being filled (see :mod:`obd.cache.claims`)
        self.claims = PageClaims(meta_fd, digest)

    # -- page table ----------------------------------------------------------------------------

    def records(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(crcs, present)`` of pages ``first .. first+count-1``; a short table reads as absent."""
        return read_records(self.meta_fd, first, count, self.generation)

    def mark_present(self, first: int, crcs: np.ndarray) -> None:
        """Write the records of pages ``first ..`` (their bytes must already be written)."""
        rec = np.empty((len(crcs), 2), dtype=RECORD_DTYPE)
        rec[:, 0] = crcs
        rec[:, 1] = expected_tags(first, crcs, self.generation)
        pwrite_full(self.meta_fd, rec.tobytes(), HEADER_SIZE + first * RECORD_SIZE)

    def drop(self, pages: list[int]) -> None:
        """Mark pages absent (a failed checksum); their bytes stay until refetched over."""
        for p in pages:
            pwrite_full(self.meta_fd, bytes(RECORD_SIZE), HEADER_SIZE + p * RECORD_SIZE)

    def present_bytes(self) -> int:
        """Bytes of the blob present in the cache (scanned in bounded slices)."""
        return present_bytes(self.meta_fd, self.header)

    # -- page bytes ----------------------------------------------------------------------------

    def read_data(self, bufs: list[memoryview], offset: int) -> int:
        return preadv_full(self.data_fd, bufs, offset)

    def write_data(self, data: memoryview, offset: int) -> None:
        pwrite_full(self.data_fd, data, offset)

    def sync_data(self) -> None:
        if self.store.sync:
            os.fdatasync(self.data_fd)

    # -- lifetime ------------------------------------------------------------------------------

    def stale(self) -> bool:
        """True once eviction or a reset unlinked this blob's files (reopen to keep caching)."""
        try:
            return os.fstat(self.meta_fd).st_nlink == 0 or os.fstat(self.data_fd).st_nlink == 0
        except OSError:
            return True

    def touch(self) -> None:
        """Record a use for LRU (the page table's mtime), at most once per ``store.touch_interval``."""
        now = time.monotonic()
        if now - self._last_touch < self.store.touch_interval:
            return
        self._last_touch = now
        with contextlib.suppress(OSError):
            os.utime(self.meta_fd)

    def close(self) -> None:
        for fd in (self.data_fd, self.meta_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.data_fd = self.meta_fd = -1

    def __repr__(self) -> str:
        return f"<BlobCache {self.digest[:19]}… size={self.size} pages={self.pages}>"


class CacheStore:
    """A cache directory shared by every process that uses it, with a size limit.

    ``root`` defaults to :func:`default_cache_dir` and ``limit_bytes`` to :func:`default_limit`.
    The limit bounds what the cache occupies on disk (allocated blocks of all data files and page
    tables). A fill that would cross it first evicts whole blobs, least recently used first,
    down to :data:`LOW_WATER` of the limit; if that is impossible (the blob being filled is alone
    bigger than the limit) the fill is not stored and :meth:`reserve` says so. Every process of
    the host charges its fills to one ledger in the directory (the ``usage`` file) before writing
    them, so the limit holds across processes; only fills in flight while an eviction recounts
    the directory (at most one per process) can take the cache past it, by their size.

    ``sync`` (default on): ``fdatasync`` the data file before writing the records of newly
    filled pages, so a present page survives power loss. Off, a page lost with the page cache
    still cannot be served wrong (its CRC fails and it is refetched).
    """

    #: Seconds between two LRU touches of one open blob (reads are frequent; utime is a syscall).
    touch_interval = 2.0

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        limit_bytes: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        sync: bool = True,
        stats: Stats | None = None,
    ):
        check_page_size(page_size)
        if limit_bytes is None:
            limit_bytes = default_limit()
        if limit_bytes < 0:
            raise ObdError("must not be negative", field="limit_bytes", value=limit_bytes)
        self.root = Path(root) if root is not None else default_cache_dir()
        self.limit_bytes = int(limit_bytes)
        self.page_size = page_size
        self.sync = sync
        self.stats = stats if stats is not None else default_stats()
        self.lock_path = self.root / "lock"
        self.ledger_path = self.root / "usage"
        self._acct = threading.Lock()

    def __repr__(self) -> str:
        return f"<CacheStore {str(self.root)!r} limit={self.limit_bytes}>"

    # -- paths and locking ---------------------------------------------------------------------

    def paths(self, digest: str) -> tuple[Path, Path]:
        """``(data, meta)`` paths of blob ``digest`` (``sha256:<hex>``)."""
        alg, _, hexd = check_digest(digest).partition(":")
        return self.root / alg / f"{hexd}.data", self.root / alg / f"{hexd}.meta"

    def _ensure_dir(self, path: Path) -> None:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ObdError(f"cannot create the cache directory: {e.strerror}", path=path) from e

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        # A fresh descriptor per acquisition: flock locks belong to the open file description, so
        # sharing one between threads would turn a conflict into a silent lock conversion.
        self._ensure_dir(self.root)
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ObdError(f"cannot open the cache lock: {e.strerror}", path=self.lock_path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- opening -------------------------------------------------------------------------------

    def open_blob(self, digest: str, size: int) -> BlobCache:
        """Open (creating or resetting as needed) the cache of blob ``digest`` of ``size`` bytes.

        A page table that is unreadable, of another page size or of another blob size is replaced by
        an empty one (its pages will be fetched again); nothing in it is trusted.
        """
        data_path, meta_path = self.paths(digest)
        if not isinstance(size, int) or size < 0 or size > MAX_BLOB_SIZE:
            raise ObdError("blob size out of range", path=digest, field="size", value=size)
        # A blob whose data file is missing is (re)created under the exclusive lock: two openers
        # racing to create it would otherwise take each other's fresh page table for a stale one,
        # replace it, and each fill a table the other never sees (both fetching every page).
        exclusive = not data_path.exists()
        while (blob := self._open_blob(digest, size, data_path, meta_path, exclusive)) is None:
            exclusive = True  # evicted since we looked: again, under the exclusive lock
        return blob

    def _open_blob(
        self, digest: str, size: int, data_path: Path, meta_path: Path, exclusive: bool
    ) -> BlobCache | None:
        """:meth:`open_blob` under the store lock; None if the data file is missing and the lock
        is only shared."""
        with self._locked(exclusive=exclusive):
            self._ensure_dir(data_path.parent)
            flags = os.O_RDWR | os.O_CLOEXEC
            try:
                try:
                    data_fd, new_data = os.open(data_path, flags), False
                except FileNotFoundError:
                    if not exclusive:
                        return None
                    data_fd, new_data = os.open(data_path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
            except OSError as e:
                raise ObdError(f"cannot open the cache files: {e.strerror}", path=data_path) from e
            try:
                meta_fd, header = self._open_meta(digest, size, meta_path, new_data)
                try:
                    if os.fstat(data_fd).st_size != size:
                        os.ftruncate(data_fd, size)
                except BaseException:
                    os.close(meta_fd)
                    raise
            except OSError as e:
                os.close(data_fd)
                raise ObdError(f"cannot open the cache files: {e.strerror}", path=meta_path) from e
            except BaseException:
                os.close(data_fd)
                raise
        blob = BlobCache(self, digest, header, data_fd, meta_fd)
        with contextlib.suppress(OSError):
            os.utime(meta_fd)
        return blob

    def _open_meta(self, digest: str, size: int, meta_path: Path, new_data: bool) -> tuple[int, MetaHeader]:
        for _ in range(8):
            try:
                fd = os.open(meta_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                self._create_meta(digest, size, meta_path, replace=False)
                new_data = False  # a table made now has no records to distrust
                continue
            try:
                header = self._validate_meta(fd, digest, size, meta_path)
                if new_data:
                    raise FormatError("its data file was missing", path=meta_path)
            except FormatError as e:
                os.close(fd)
                log.warning("%s; starting this blob's cache afresh", e)
                self.stats.incr(RESETS)
                self._create_meta(digest, size, meta_path, replace=True)
                new_data = False
                continue
            except BaseException:
                os.close(fd)
                raise
            return fd, header
        raise ObdError("page table keeps changing under us", path=meta_path)

    def _validate_meta(self, fd: int, digest: str, size: int, meta_path: Path) -> MetaHeader:
        raw = os.pread(fd, HEADER_SIZE, 0)
        header = MetaHeader.unpack(raw, path=str(meta_path), file_size=os.fstat(fd).st_size)
        if header.digest != digest:
            raise FormatError(
                "belongs to another blob", path=meta_path, field="header.digest", value=header.digest
            )
        if header.page_size != self.page_size:
            raise FormatError(
                f"page size differs from the store's {self.page_size}",
                path=meta_path,
                field="header.page_size",
                value=header.page_size,
            )
        if header.blob_size != size:
            raise FormatError(
                f"blob size differs from the {size} bytes the source reports",
                path=meta_path,
                field="header.blob_size",
                value=header.blob_size,
            )
        return header

    def _create_meta(self, digest: str, size: int, meta_path: Path, *, replace: bool) -> None:
        """Build an empty page table under a temporary name, then link it in (or rename over)."""
        header = MetaHeader(self.page_size, size, secrets.randbits(64) | 1, digest)
        tmp = meta_path.parent / f"{_TMP_PREFIX}{meta_path.stem[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, header.pack(), 0)
            os.ftruncate(fd, header.file_size)
            if replace:
                os.rename(tmp, meta_path)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, meta_path)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # -- size accounting and eviction ----------------------------------------------------------

    def reserve(self, blob: BlobCache, nbytes: int) -> bool:
        """Account for ``nbytes`` about to be written to ``blob``; evict if that crosses the limit.

        Returns False when the bytes do not fit even after evicting every other blob: the caller
        then serves them without storing them.
        """
        cost = _fill_cost(nbytes, self.page_size)
        with self._acct:
            if self._charge(cost):
                return True
            self._evict_lru(max(0, int(self.limit_bytes * LOW_WATER) - cost), keep=blob.digest)
            return self._charge(cost)

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[int]:
        """The usage ledger's descriptor, locked exclusively (a fresh description: see ``_locked``).

        An OSError is left as it is: a fill that cannot be charged is served without being stored,
        as one that cannot be written is."""
        self._ensure_dir(self.root)
        fd = os.open(self.ledger_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _charge(self, cost: int) -> bool:
        """Add ``cost`` to the ledger if the total stays within the limit; False (nothing added) if not."""
        with self._ledger() as fd:
            total = _LEDGER.read(fd)
            if total is None:  # new or damaged: count what is there
                total = self.usage()
            if total + cost > self.limit_bytes:
                _LEDGER.write(fd, total)
                return False
            _LEDGER.write(fd, total + cost)
            return True

    def _recount(self) -> None:
        """Set the ledger to what the directory holds (under the exclusive root lock)."""
        with self._ledger() as fd:
            _LEDGER.write(fd, self.usage())

    def _scan(self) -> dict[str, list[tuple[Path, os.stat_result]]]:
        """``digest → [(path, stat)]`` of every blob file (temporary and foreign files left out)."""
        found: dict[str, list[tuple[Path, os.stat_result]]] = {}
        for alg in ALGORITHMS:
            folder = self.root / alg
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ObdError(f"cannot list the cache directory: {e.strerror}", path=folder) from e
            for name in names:
                hexd, dot, ext = name.partition(".")
                digest = f"{alg}:{hexd}"
                if not dot or ext not in ("data", "meta") or not DIGEST_RE.fullmatch(digest):
                    continue
                path = folder / name
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.setdefault(digest, []).append((path, st))
        return found

    def usage(self) -> int:
        """Bytes the cache occupies on disk now (allocated blocks of every blob file)."""
        return sum(_disk_bytes(st) for files in self._scan().values() for _, st in files)

    def entries(self, *, detail: bool = True) -> list[BlobEntry]:
        """Every blob in the cache, least recently used first.

        With ``detail`` the page tables are read (blob size, pages present); a table that fails
        validation is reported through ``problem`` rather than raised.
        """
        out = []
        for digest, files in self._scan().items():
            meta = next((st for p, st in files if p.suffix == ".meta"), None)
            last = (meta or files[0][1]).st_mtime
            entry = BlobEntry(
                digest=digest,
                disk_bytes=sum(_disk_bytes(st) for _, st in files),
                last_used=last,
                files=tuple((str(p), st.st_ino) for p, st in files),
            )
            if meta is None:
                entry.problem = "no page table"
            elif detail:
                self._describe(entry)
            out.append(entry)
        out.sort(key=lambda e: (e.last_used, e.digest))
        return out

    def _describe(self, entry: BlobEntry) -> None:
        _, meta_path = self.paths(entry.digest)
        try:
            fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            entry.problem = f"cannot open the page table: {e.strerror}"
            return
        try:
            raw = os.pread(fd, HEADER_SIZE, 0)
            header = MetaHeader.unpack(raw, path=str(meta_path), file_size=os.fstat(fd).st_size)
            if header.digest != entry.digest:
                raise FormatError("belongs to another blob", path=meta_path, field="header.digest")
            entry.blob_size, entry.page_size, entry.pages = header.blob_size, header.page_size, header.pages
            entry.present_bytes = present_bytes(fd, header)
        except FormatError as e:
            entry.problem = e.detail if e.field is None else f"{e.field}: {e.detail}"
        finally:
            os.close(fd)

    def _remove(self, entry: BlobEntry) -> int:
        """Truncate and unlink the files of ``entry`` that are still the ones scanned; bytes freed."""
        freed = 0
        # the page table first: a reader elsewhere then sees absent pages before vanished bytes
        for path, ino in sorted(entry.files, key=lambda f: not f[0].endswith(".meta")):
            try:
                st = os.stat(path)
                if st.st_ino != ino:
                    continue
                os.truncate(path, 0)
                os.unlink(path)
                freed += _disk_bytes(st)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("cannot remove %s: %s", path, e.strerror)
        self.stats.incr(EVICTIONS)
        self.stats.incr(EVICTED_BYTES, freed)
        return freed

    def _clean_tmp(self) -> None:
        """Remove temporary files left by killed processes (only call under the exclusive lock)."""
        for alg in ALGORITHMS:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(self.root / alg):
                    if name.startswith(_TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.root / alg / name)

    def _evict_lru(
        self, target: int, *, keep: str | None = None, broken_first: bool = False
    ) -> list[BlobEntry]:
        with self._locked(exclusive=True):
            self._clean_tmp()
            entries = self.entries(detail=broken_first)
            total = sum(e.disk_bytes for e in entries)
            if total > target:
                # blobs open in some process go last: evicting one makes its reader refetch everything
                busy = {e.digest for e in entries if in_use(str(self.paths(e.digest)[1]))}
                entries.sort(key=lambda e: (e.digest in busy, e.last_used, e.digest))
            if broken_first:
                entries.sort(key=lambda e: e.problem is None)  # stable: broken ones first, else as above
            evicted = []
            for entry in entries:
                if total <= target and not (broken_first and entry.problem is not None):
                    break
                if entry.digest == keep:
                    continue
                log.info("evicting %s (%d bytes on disk)", entry.digest, entry.disk_bytes)
                self._remove(entry)
                total -= entry.disk_bytes
                evicted.append(entry)
            self._recount()
            return evicted

    def prune(self, target: int | None = None) -> list[BlobEntry]:
        """Evict broken entries, then least-recently-used blobs until the cache fits ``target``.

        ``target`` defaults to the limit. Returns what was removed.
        """
        target = self.limit_bytes if target is None else target
        if target < 0:
            raise ObdError("must not be negative", field="target", value=target)
        return self._evict_lru(target, broken_first=True)

    def clear(self, digest: str | None = None) -> list[BlobEntry]:
        """Remove every blob, or only ``digest``. Processes using them refetch what they read next."""
        want = None if digest is None else check_digest(digest)
        with self._locked(exclusive=True):
            self._clean_tmp()
            removed = [e for e in self.entries(detail=False) if want is None or e.digest == want]
            for entry in removed:
                self._remove(entry)
            self._recount()
        return removed


def parse_size(text: str) -> int:
    """``"10G"``, ``"512MiB"``, ``"1.5g"``, ``"4096"`` → bytes (binary units; ``k``/``m``/``g``/``t``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ObdError("not a size (examples: 4096, 512M, 10G, 1.5TiB)", field="size", value=text)
    scale = 1 << (10 * " kmgtp".index(m.group(2) or " "))
    return int(float(m.group(1)) * scale)


__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_PAGE_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "BlobCache",
    "BlobEntry",
    "CacheStore",
    "MetaHeader",
    "PageClaims",
    "check_digest",
    "default_cache_dir",
    "default_limit",
    "page_crcs",
    "parse_size",
    "read_records",
]
