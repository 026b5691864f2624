"""Writable LSMT layers in both overlaybd flavours (docs/formats.md §1.8, §1.9).

* **append** (:class:`AppendRWLayer`, overlaybd's default): a data file (4096-byte header, then
  sectors appended in write order) and an index file (4096-byte header, then one 16-byte mapping
  per write or discard, in time order). Reopening replays the records.
  The index file is an :class:`IndexJournal`, which warp layers (:mod:`obd.lsmt.warp`) share.
* **sparse** (:class:`SparseRWLayer`, ``overlaybd-create -s``): one data file of
  ``virtual_size + 4096`` bytes where virtual byte *x* lives at file byte ``4096 + x``; the file's
  holes *are* the index, rebuilt with ``SEEK_DATA``/``SEEK_HOLE`` on open.

Crash safety: data is written before the index record that points at it, and :meth:`flush`
fsyncs data then index, so everything acknowledged before a completed flush survives a crash. A
reopen ignores a torn tail (a partial record, or records pointing past the end of the data file —
possible only after power loss) and refuses damage anywhere else.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import uuid as _uuid

import numpy as np

from obd.errors import AlignmentError, FormatError, LayerStateError, ObdError, TruncatedError
from obd.io.source import FileSource, Source
from obd.lsmt.format import (
    ENTRY_SIZE,
    FLAG_SPARSE,
    FLAGS_RW_DATA,
    FLAGS_RW_INDEX,
    HT_SPACE,
    INVALID_OFFSET,
    MAX_IO_SIZE,
    MAX_LENGTH,
    MAX_RW_INDEX_SIZE,
    SECTOR,
    HeaderTrailer,
    MappingColumns,
    decode_mappings,
    encode_mapping,
    format_uuid,
)
from obd.lsmt.index import Index, Mapping, MutableIndex

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
#: glibc's soname, not ``find_library("c")``: that forks ldconfig, 5–10 ms of every nbdkit start.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of a file, keeping its size (reads return zeros)."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def check_aligned(offset: int, length: int, what: str) -> None:
    if offset % SECTOR or length % SECTOR:
        raise AlignmentError(
            f"{what} at byte {offset}, length {length}: both must be multiples of {SECTOR}",
            field=what,
        )


def open_layer_fd(path: str, *, create: bool, readonly: bool = False) -> int:
    flags = (
        (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    )
    try:
        return os.open(path, flags, 0o644)
    except OSError as e:
        raise ObdError(f"cannot {'create' if create else 'open'}: {e.strerror}", path=path) from e


class RWLayer:
    """What both flavours share: the header, the in-memory index, the data file as a Source."""

    sparse: bool = False

    def __init__(self, data_path: str, data_fd: int, header: HeaderTrailer, *, readonly: bool = False):
        self.data_path = data_path
        self.readonly = readonly
        self._data_fd = data_fd
        self.header = header
        self.index = MutableIndex()
        self.data_source: Source = FileSource(data_path, fd=data_fd)
        self._lock = threading.Lock()
        self._closed = False
        #: Tag written into new index records: overlaybd writes the number of lowers when stacked.
        self.record_tag = 0

    # --- identity ---------------------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self.header.virtual_size

    @property
    def uuid(self) -> str:
        return self.header.uuid

    @property
    def parent_uuid(self) -> str:
        return self.header.parent_uuid

    @property
    def files(self) -> list[Source]:
        return [self.data_source]

    def dump(self) -> list[Mapping]:
        """The live mappings in order (what a commit copies)."""
        return self.index.dump()

    def to_index(self) -> Index:
        return self.index.to_index()

    # --- writes -----------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self._closed:
            raise LayerStateError("layer is closed", path=self.data_path)
        if self.readonly:
            raise LayerStateError("layer was opened read-only", path=self.data_path)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write sector-aligned ``data`` at byte ``offset``; splits at 4 MiB as overlaybd does."""
        view = memoryview(data).cast("B")
        check_aligned(offset, len(view), "write")
        self._writable()
        pos = 0
        while pos < len(view):
            n = min(MAX_IO_SIZE, len(view) - pos)
            self._write_piece(view[pos : pos + n], offset + pos)
            pos += n

    def trim(self, offset: int, length: int) -> None:
        """Discard ``[offset, offset+length)``: it reads as zeros and hides lower layers."""
        check_aligned(offset, length, "trim")
        self._writable()
        pos = 0
        while pos < length:
            n = min(MAX_LENGTH * SECTOR, length - pos)
            self._trim_piece(offset + pos, n)
            pos += n

    def _write_piece(self, data: memoryview, offset: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _trim_piece(self, offset: int, length: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def update_vsize(self, virtual_size: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self.data_source.close()
        os.close(self._data_fd)

    def __enter__(self) -> RWLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IndexJournal:
    """An RW index file (docs/formats.md §1.8): a 4096-byte header (flags 0x01, ``index_offset`` 4096),
    then one 16-byte mapping record appended per write, discard or remote registration.

    Shared by :class:`AppendRWLayer` and :class:`~obd.lsmt.warp.WarpRWLayer`, which differ only in
    what their records point at. The journal owns the file descriptor. After a reopen, appends go
    right after the last record the layer kept (:meth:`resume`); when opened writable, whatever
    followed that record (a partial record, a torn tail) is cut off first.
    """

    def __init__(self, path: str, fd: int, header: HeaderTrailer, *, readonly: bool = False):
        self.path = path
        self.fd = fd
        self.header = header
        self.readonly = readonly
        #: where the next record goes
        self.end = HT_SPACE

    @classmethod
    def create(cls, path: str, header: HeaderTrailer) -> IndexJournal:
        """Create the file (it must not exist) and write ``header``; :meth:`sync` makes it durable."""
        fd = open_layer_fd(path, create=True)
        try:
            os.pwrite(fd, header.pack(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header)

    @classmethod
    def open(cls, path: str, *, readonly: bool = False) -> IndexJournal:
        """Open an existing file, checking its header: an index file, unsealed, ``index_offset`` 4096."""
        fd = open_layer_fd(path, create=False, readonly=readonly)
        try:
            header = read_header(fd, path)
            if header.is_data or header.is_sealed or header.index_offset != HT_SPACE:
                bad_offset = header.index_offset != HT_SPACE
                raise FormatError(
                    "not an RW index file (needs flags index, unsealed, index_offset 4096)",
                    path=path,
                    field="header.index_offset" if bad_offset else "header.flags",
                    value=header.index_offset if bad_offset else header.flags,
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header, readonly=readonly)

    def records(self) -> tuple[MappingColumns, int]:
        """Every whole record in file order (INVALID padding included) and their count."""
        cols, count, _partial = read_index_records(self.fd, self.path)
        return cols, count

    def resume(self, keep: int) -> None:
        """Append after the first ``keep`` records; when writable, cut off whatever follows them."""
        self.end = HT_SPACE + keep * ENTRY_SIZE
        if not self.readonly and os.fstat(self.fd).st_size > self.end:
            os.ftruncate(self.fd, self.end)

    def append(self, record: bytes) -> None:
        """Write one encoded record at the end (the caller serialises appends)."""
        os.pwrite(self.fd, record, self.end)
        self.end += len(record)

    def write_header(self, header: HeaderTrailer) -> None:
        self.header = header
        os.pwrite(self.fd, header.pack(), 0)

    def sync(self, *, metadata: bool = False) -> None:
        """Make the records durable (``metadata``: the file's size and inode too, as after a create)."""
        if metadata:
            os.fsync(self.fd)
        else:
            os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class JournaledRWLayer(RWLayer):
    """An RW layer whose mappings are logged in an :class:`IndexJournal` and replayed on open.

    Crash safety comes from the order: data is written before the record that points at it, and
    :meth:`flush` syncs the data file before the journal. Subclasses say, in :meth:`_accept`,
    which records of a reopened journal are sound and which tags they replay with.
    """

    def __init__(
        self, data_path: str, data_fd: int, header: HeaderTrailer, journal: IndexJournal, *, readonly: bool
    ):
        super().__init__(data_path, data_fd, header, readonly=readonly)
        self.journal = journal

    @property
    def index_path(self) -> str:
        return self.journal.path

    @property
    def index_header(self) -> HeaderTrailer:
        return self.journal.header

    def _accept(self, cols: MappingColumns, count: int) -> tuple[int, np.ndarray]:
        """How many leading records to keep, and the relative tag of every record (raises on damage)."""
        raise NotImplementedError  # pragma: no cover - interface

    def _replay(self) -> None:
        """Rebuild the in-memory index from the journal; later records win (``Index0::insert``)."""
        cols, count = self.journal.records()
        keep, tags = self._accept(cols, count)
        ins = self.index.insert
        for o, ln, m, z, t, ok in zip(
            cols.offset[:keep].tolist(),
            cols.length[:keep].tolist(),
            cols.moffset[:keep].tolist(),
            cols.zeroed[:keep].tolist(),
            tags[:keep].tolist(),
            (cols.offset[:keep] != INVALID_OFFSET).tolist(),
            strict=True,
        ):
            if ok:
                ins(o, ln, m, z, t)
        self.journal.resume(keep)

    def _log(self, offset: int, length: int, moffset: int, zeroed: bool, rel: int = 0) -> None:
        """Append one record (tag ``record_tag + rel``) and apply it in memory; the caller holds the lock."""
        self.journal.append(encode_mapping(offset, length, moffset, zeroed, self.record_tag + rel))
        self.index.insert(offset, length, moffset, zeroed, rel)

    def flush(self) -> None:
        """Make every write so far durable: data first, then the index records that point at it."""
        if self._closed or self.readonly:
            return
        os.fdatasync(self._data_fd)
        self.journal.sync()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self.journal.close()


class AppendRWLayer(JournaledRWLayer):
    """overlaybd's default RW layer: append-only data file plus a log of index records."""

    def __init__(
        self,
        data_path: str,
        data_fd: int,
        header: HeaderTrailer,
        journal: IndexJournal,
        *,
        readonly: bool = False,
    ):
        super().__init__(data_path, data_fd, header, journal, readonly=readonly)
        size = os.fstat(data_fd).st_size
        self._data_end = -(-size // SECTOR) * SECTOR
        self.dropped_records = 0
        self.garbage_sectors = 0

    # --- create / open ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        data_path: str,
        index_path: str,
        virtual_size: int,
        *,
        uuid: str | None = None,
        parent_uuid: str | None = None,
        user_tag: bytes = b"",
    ) -> AppendRWLayer:
        """Create a new, empty layer (``overlaybd-create``); a random uuid when none is given."""
        ident = format_uuid(uuid or _uuid.uuid4())
        base = HeaderTrailer(
            flags=FLAGS_RW_DATA,
            virtual_size=virtual_size,
            uuid=ident,
            parent_uuid=format_uuid(parent_uuid),
            user_tag=user_tag,
        )
        index_header = base.with_(flags=FLAGS_RW_INDEX, index_offset=HT_SPACE, index_size=0)
        dfd = open_layer_fd(data_path, create=True)
        try:
            journal = IndexJournal.create(index_path, index_header)
        except BaseException:
            os.close(dfd)
            raise
        try:
            os.pwrite(dfd, base.pack(), 0)
            os.fsync(dfd)
            journal.sync(metadata=True)
        except BaseException:
            os.close(dfd)
            journal.close()
            raise
        return cls(data_path, dfd, base, journal)

    @classmethod
    def open(
        cls, data_path: str, index_path: str, header: HeaderTrailer | None = None, *, readonly: bool = False
    ) -> AppendRWLayer:
        """Reopen a layer, replaying its index records (later records win)."""
        dfd = open_layer_fd(data_path, create=False, readonly=readonly)
        try:
            if header is None:
                header = read_header(dfd, data_path)
            journal = IndexJournal.open(index_path, readonly=readonly)
        except BaseException:
            os.close(dfd)
            raise
        try:
            layer = cls(data_path, dfd, header, journal, readonly=readonly)
            layer._replay()
        except BaseException:
            os.close(dfd)
            journal.close()
            raise
        return layer

    def _accept(self, cols: MappingColumns, count: int) -> tuple[int, np.ndarray]:
        """Records must point inside the data file; a run of records at the end pointing past it is
        a torn tail (data lost in a power cut, possible only after power loss) and is dropped."""
        data_end = self._data_end // SECTOR
        data_begin = HT_SPACE // SECTOR
        real = cols.offset != INVALID_OFFSET
        mend = cols.moffset + np.where(cols.zeroed, 0, cols.length)
        bad_past_end = real & ((mend > data_end) | (cols.moffset > data_end))
        bad_other = real & (
            (cols.moffset < data_begin) | ((~cols.zeroed) & ((cols.length == 0) | (cols.moffset >= data_end)))
        )
        bad = np.nonzero(bad_past_end | bad_other)[0]
        keep = count
        if len(bad):
            first = int(bad[0])
            tail_is_torn = bool((bad_past_end[first:] | ~real[first:]).all())
            if not tail_is_torn:
                raise FormatError(
                    f"record {first} points at sector {int(cols.moffset[first])}, outside the data file's "
                    f"[{data_begin}, {data_end}) sectors",
                    path=self.index_path,
                    field=f"index[{first}].moffset",
                    value=int(cols.moffset[first]),
                )
            keep = first
            self.dropped_records = count - first
            log.warning(
                "%s: ignoring %d torn record(s) at the end that point past the data file",
                self.index_path,
                self.dropped_records,
            )
        return keep, np.zeros(count, np.int64)

    # --- writes -----------------------------------------------------------------------------------
    def _write_piece(self, data: memoryview, offset: int) -> None:
        n = len(data)
        if n == 0:
            return
        with self._lock:
            pos = self._data_end
            self._data_end += n
            self.data_source.size = self._data_end
        written = 0
        while written < n:
            written += os.pwrite(self._data_fd, data[written:], pos + written)
        with self._lock:
            self._log(offset // SECTOR, n // SECTOR, pos // SECTOR, False)

    def _trim_piece(self, offset: int, length: int) -> None:
        if length == 0:
            return
        with self._lock:
            self._log(offset // SECTOR, length // SECTOR, self._data_end // SECTOR, True)

    def update_vsize(self, virtual_size: int) -> None:
        """Rewrite ``virtual_size`` in both headers (``overlaybd-resize``; also done when stacking a 0)."""
        with self._lock:
            self.header = self.header.with_(virtual_size=virtual_size)
            os.pwrite(self._data_fd, self.header.pack(), 0)
            self.journal.write_header(self.index_header.with_(virtual_size=virtual_size))
        self.flush()

    @property
    def data_end(self) -> int:
        return self._data_end


class SparseRWLayer(RWLayer):
    """``overlaybd-create -s``: the data file is the device image at offset 4096; holes are unmapped."""

    sparse = True

    @classmethod
    def create(
        cls,
        data_path: str,
        virtual_size: int,
        *,
        index_path: str | None = None,
        uuid: str | None = None,
        parent_uuid: str | None = None,
        user_tag: bytes = b"",
    ) -> SparseRWLayer:
        header = HeaderTrailer(
            flags=FLAGS_RW_DATA | FLAG_SPARSE,
            virtual_size=virtual_size,
            uuid=format_uuid(uuid or _uuid.uuid4()),
            parent_uuid=format_uuid(parent_uuid),
            user_tag=user_tag,
        )
        dfd = open_layer_fd(data_path, create=True)
        os.pwrite(dfd, header.pack(), 0)
        os.ftruncate(dfd, virtual_size + HT_SPACE)
        os.fsync(dfd)
        if index_path:
            os.close(open_layer_fd(index_path, create=True))
        return cls(data_path, dfd, header)

    @classmethod
    def open(
        cls, data_path: str, header: HeaderTrailer | None = None, *, readonly: bool = False
    ) -> SparseRWLayer:
        dfd = open_layer_fd(data_path, create=False, readonly=readonly)
        try:
            if header is None:
                header = read_header(dfd, data_path)
            layer = cls(data_path, dfd, header, readonly=readonly)
            layer._scan_extents()
        except BaseException:
            os.close(dfd)
            raise
        return layer

    def _scan_extents(self) -> None:
        fd = self._data_fd
        size = os.fstat(fd).st_size
        pos = HT_SPACE
        ins = self.index.insert
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            first = -(-start // SECTOR)  # holes and data are fs-block aligned; be safe anyway
            last = -(-stop // SECTOR)
            s = first
            while s < last:
                n = min(MAX_LENGTH, last - s)
                ins(s - HT_SPACE // SECTOR, n, s, False)
                s += n
            pos = stop

    def _write_piece(self, data: memoryview, offset: int) -> None:
        n = len(data)
        if n == 0:
            return
        written = 0
        while written < n:
            written += os.pwrite(self._data_fd, data[written:], HT_SPACE + offset + written)
        s = offset // SECTOR
        self.index.insert(s, n // SECTOR, s + HT_SPACE // SECTOR, False)

    def _trim_piece(self, offset: int, length: int) -> None:
        if length == 0:
            return
        punch_hole(self._data_fd, HT_SPACE + offset, length)
        s = offset // SECTOR
        self.index.insert(s, length // SECTOR, s + HT_SPACE // SECTOR, True)

    def flush(self) -> None:
        if not self._closed and not self.readonly:
            os.fdatasync(self._data_fd)

    def update_vsize(self, virtual_size: int) -> None:
        with self._lock:
            self.header = self.header.with_(virtual_size=virtual_size)
            os.pwrite(self._data_fd, self.header.pack(), 0)
            os.ftruncate(self._data_fd, virtual_size + HT_SPACE)
            self.data_source.size = virtual_size + HT_SPACE
        self.flush()


def read_index_records(fd: int, path: str) -> tuple[MappingColumns, int, int]:
    """The records of an RW index file: (decoded columns, whole-record count, bytes of a torn partial record).

    Refuses absurd counts before reading; a partial trailing record is ignored with a warning.
    """
    size = os.fstat(fd).st_size
    count = max(0, (size - HT_SPACE) // ENTRY_SIZE)
    if count > MAX_RW_INDEX_SIZE:
        raise FormatError(
            f"more than {MAX_RW_INDEX_SIZE} records", path=path, field="index.count", value=count
        )
    partial = max(0, size - HT_SPACE) % ENTRY_SIZE
    if partial:
        log.warning("%s: ignoring a partial record of %d bytes at the end", path, partial)
    raw = os.pread(fd, count * ENTRY_SIZE, HT_SPACE) if count else b""
    if len(raw) != count * ENTRY_SIZE:
        raise TruncatedError("index file shrank while reading", path=path, field="index")
    return decode_mappings(raw), count, partial


def read_header(fd: int, path: str) -> HeaderTrailer:
    raw = os.pread(fd, HT_SPACE, 0)
    if len(raw) < HT_SPACE:
        raise TruncatedError(
            f"file is {len(raw)} bytes, shorter than the 4096-byte header", path=path, field="header"
        )
    header = HeaderTrailer.parse(raw, path=path, what="header")
    if not header.is_header:
        raise FormatError(
            "record at offset 0 is not a header", path=path, field="header.flags", value=header.flags
        )
    return header


def open_rw(data_path: str, index_path: str | None = None, *, readonly: bool = False) -> RWLayer:
    """Open an RW layer of either flavour (the sparse bit of the data header decides)."""
    fd = open_layer_fd(data_path, create=False, readonly=True)
    try:
        header = read_header(fd, data_path)
    finally:
        os.close(fd)
    if not header.is_data:
        raise FormatError("not an RW data file", path=data_path, field="header.flags", value=header.flags)
    if header.is_sealed:
        raise LayerStateError("layer is sealed; open it read-only", path=data_path)
    if header.is_sparse:
        return SparseRWLayer.open(data_path, header, readonly=readonly)
    if not index_path:
        raise LayerStateError("an append-mode RW layer needs its index file", path=data_path)
    return AppendRWLayer.open(data_path, index_path, header, readonly=readonly)


def create_rw(
    data_path: str,
    index_path: str | None,
    virtual_size: int,
    *,
    sparse: bool = False,
    uuid: str | None = None,
    parent_uuid: str | None = None,
) -> RWLayer:
    """Create an RW layer of either flavour (``overlaybd-create [-s]``)."""
    if sparse:
        return SparseRWLayer.create(
            data_path, virtual_size, index_path=index_path, uuid=uuid, parent_uuid=parent_uuid
        )
    if not index_path:
        raise LayerStateError("an append-mode RW layer needs an index file path", path=data_path)
    return AppendRWLayer.create(data_path, index_path, virtual_size, uuid=uuid, parent_uuid=parent_uuid)
