"""turboOCI (and erofs meta) "warp" layers: file metadata in the layer, file data in the original tar.

A warp layer (docs/formats.md §1.18) is an LSMT layer whose index points into **two** files, told apart
by each entry's tag: relative tag 0 (``fsMeta``) is the layer's own data, relative tag 1
(``remoteData``) is the *target*, the uncompressed tar stream of the OCI layer the filesystem was
built from. Converting a layer therefore writes only filesystem metadata; every regular file's
blocks are mapped straight onto its bytes inside the tar.

* :class:`WarpRWLayer` — the writable form (``overlaybd-create --turboOCI``): an RW index file
  (header flags 0x01, one 16-byte record appended per write, discard or remote registration) and a
  header-less fs-meta file truncated to the virtual size, where virtual byte *x* lives at byte *x*.
  :meth:`WarpRWLayer.pwrite` writes metadata in place; :meth:`WarpRWLayer.register_remote` is
  overlaybd's ``RemoteData`` ioctl.
* :func:`commit_warp` — ``overlaybd-commit --turboOCI``/``--fastoci``: like a normal commit, but
  remote mappings are emitted unchanged (still pointing into the target), the index is not padded
  and no user tag is written.

Committed warp blobs are read by :class:`obd.lsmt.sealed.SealedLayer` with ``warp=True``.

Tags on disk are ``rw_tag`` and ``rw_tag + 1``, where ``rw_tag`` is the number of lower layers the
RW layer was stacked on when the record was written. Opening subtracts the smallest tag found.
That reproduces an upstream bug on purpose: an index holding **only** remote records normalises
them all to tag 0, so such a layer reads its "remote" data from the fs-meta file (and a commit
copies it from there). obd does what overlaybd does, so that both see the same device.
"""

from __future__ import annotations

import logging
import os
import uuid as _uuid
from collections.abc import Callable

import numpy as np

from obd.errors import AlignmentError, FormatError, ObdError
from obd.io.source import Source
from obd.lsmt.commit import SealedInfo, Writable, layer_info, write_sealed
from obd.lsmt.format import (
    FLAGS_RW_INDEX,
    HT_SPACE,
    INVALID_OFFSET,
    MAX_LENGTH,
    MAX_MOFFSET,
    MAX_OFFSET,
    SECTOR,
    HeaderTrailer,
    MappingColumns,
    format_uuid,
)
from obd.lsmt.index import Mapping
from obd.lsmt.rw import IndexJournal, JournaledRWLayer, check_aligned, open_layer_fd

log = logging.getLogger(__name__)

#: Relative tags (overlaybd's ``SegmentType``).
FS_META = 0
REMOTE_DATA = 1


class MissingTarget(Source):
    """Stands in for the target of a warp layer opened without one: reading it is an error."""

    def __init__(self, name: str):
        self.name = name
        self.size = 0

    def readinto(self, buf: memoryview, offset: int) -> int:
        raise FormatError(
            "turboOCI layer maps file data into its target layer, but no target (upper.target / "
            "targetFile) was given",
            path=self.name,
            field="targetFile",
        )


class WarpRWLayer(JournaledRWLayer):
    """A writable turboOCI layer: RW index file + header-less fs-meta file + read-only target.

    ``files`` is ``[fsmeta, target]``; :meth:`dump` reports relative tags that index it. As an
    RW layer of a :class:`~obd.lsmt.stack.Stack`, ``index.tag`` is set to the fs-meta slot and
    :attr:`record_tag` to the number of lowers (the ``rw_tag`` overlaybd writes into records).
    The index file is the same journal an append layer keeps (:class:`~obd.lsmt.rw.IndexJournal`);
    its header doubles as the layer's header.
    """

    def __init__(
        self,
        journal: IndexJournal,
        fsmeta_path: str,
        fsmeta_fd: int,
        *,
        target: Source | None = None,
        readonly: bool = False,
    ):
        super().__init__(fsmeta_path, fsmeta_fd, journal.header, journal, readonly=readonly)
        self.target: Source = target if target is not None else MissingTarget(f"{journal.path} (target)")
        #: records that overlaybd keeps in the file but that are not mappings (INVALID padding)
        self.skipped_records = 0

    # --- create / open ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        index_path: str,
        fsmeta_path: str,
        virtual_size: int,
        *,
        uuid: str | None = None,
        target: Source | None = None,
    ) -> WarpRWLayer:
        """``overlaybd-create --turboOCI``: an empty layer with a random uuid and a null parent.

        The index file gets the RW index header; the fs-meta file is created empty and truncated to
        ``virtual_size`` (sparse, no header). ``-u`` has no effect on warp creates upstream, so
        there is no parent argument.
        """
        if virtual_size < 0 or virtual_size % SECTOR:
            raise AlignmentError(
                f"virtual size must be a non-negative multiple of {SECTOR}", field="vsize", value=virtual_size
            )
        header = HeaderTrailer(
            flags=FLAGS_RW_INDEX,
            index_offset=HT_SPACE,
            index_size=0,
            virtual_size=virtual_size,
            uuid=format_uuid(uuid or _uuid.uuid4()),
        )
        journal = IndexJournal.create(index_path, header)
        try:
            mfd = open_layer_fd(fsmeta_path, create=True)
        except BaseException:
            journal.close()
            raise
        try:
            os.ftruncate(mfd, virtual_size)
            os.fsync(mfd)
            journal.sync(metadata=True)
        except BaseException:
            journal.close()
            os.close(mfd)
            raise
        return cls(journal, fsmeta_path, mfd, target=target)

    @classmethod
    def open(
        cls,
        index_path: str,
        fsmeta_path: str,
        *,
        target: Source | None = None,
        readonly: bool = False,
    ) -> WarpRWLayer:
        """Reopen a layer (``open_warpfile_rw``): replay its records, tags normalised to 0/1.

        The layer takes ownership of ``target`` (closed with it, also when opening fails).
        """
        try:
            journal = IndexJournal.open(index_path, readonly=readonly)
            try:
                mfd = open_layer_fd(fsmeta_path, create=False, readonly=readonly)
            except BaseException:
                journal.close()
                raise
        except BaseException:
            if target is not None:
                target.close()
            raise
        try:
            layer = cls(journal, fsmeta_path, mfd, target=target, readonly=readonly)
            layer._replay()
        except BaseException:
            journal.close()
            os.close(mfd)
            if target is not None:
                target.close()
            raise
        return layer

    def _accept(self, cols: MappingColumns, count: int) -> tuple[int, np.ndarray]:
        """Every record is kept; tags are made relative to the smallest one and must be 0 or 1.

        No moffset checks (fs-meta mappings are identity-mapped, remote ones point into the
        target), except the one overlaybd keeps for warp indexes: a data record must not end at 0.
        """
        real = cols.offset != INVALID_OFFSET
        self.skipped_records = int(count - real.sum())
        rel = np.zeros(count, np.int64)
        if not real.any():
            return count, rel
        tags = cols.tag[real]
        rel = cols.tag - tags.min()
        over = np.nonzero(real & (rel > REMOTE_DATA))[0]
        if len(over):
            i = int(np.count_nonzero(real[: over[0]]))
            raise FormatError(
                f"record tags span {int(tags.min())}..{int(tags.max())}; a warp layer uses two "
                "consecutive tags (fs-meta, target), so records were written at different stack depths",
                path=self.index_path,
                field=f"index[{i}].tag",
                value=int(cols.tag[over[0]]),
            )
        bad = np.nonzero(real & ~cols.zeroed & (cols.moffset + cols.length == 0))[0]
        if len(bad):
            i = int(np.count_nonzero(real[: bad[0]]))
            raise FormatError(
                "empty data record at moffset 0 (overlaybd refuses to open such an index)",
                path=self.index_path,
                field=f"index[{i}].length",
                value=0,
            )
        return count, rel

    # --- identity ---------------------------------------------------------------------------------
    @property
    def fsmeta_path(self) -> str:
        return self.data_path

    @property
    def files(self) -> list[Source]:
        return [self.data_source, self.target]

    def dump(self) -> list[Mapping]:
        """The live mappings in order, tagged 0 (fs-meta) or 1 (target): slots into :attr:`files`."""
        return self.index.dump(relative=True)

    # --- writes -----------------------------------------------------------------------------------
    def _write_piece(self, data: memoryview, offset: int) -> None:
        n = len(data)
        if n == 0:
            return
        written = 0
        while written < n:
            written += os.pwrite(self._data_fd, data[written:], offset + written)
        s = offset // SECTOR
        with self._lock:
            self._log(s, n // SECTOR, s, False, FS_META)
            if offset + n > self.data_source.size:
                self.data_source.size = offset + n

    def _trim_piece(self, offset: int, length: int) -> None:
        if length == 0:
            return
        with self._lock:
            # a discard records the fs-meta file's end as its moffset, as LSMTFile::discard does
            end = os.fstat(self._data_fd).st_size // SECTOR
            self._log(offset // SECTOR, length // SECTOR, end, True, FS_META)

    def register_remote(self, offset: int, count: int, roffset: int) -> int:
        """overlaybd's ``RemoteData`` ioctl: device bytes ``[offset, offset+count)`` are target bytes
        ``[roffset, roffset+count)``. All three in bytes, multiples of 512.

        Recorded as mappings of at most 16383 sectors with tag ``rw_tag + 1``. Returns ``count``.
        """
        self._writable()
        if offset < 0 or count < 0 or roffset < 0:
            raise ObdError("negative offset or count", field="remote", value=(offset, count, roffset))
        check_aligned(offset, count, "remote")
        if roffset % SECTOR:
            raise AlignmentError(
                f"remote data offset {roffset} is not a multiple of {SECTOR}", field="roffset", value=roffset
            )
        s, n, r = offset // SECTOR, count // SECTOR, roffset // SECTOR
        if s + n >= MAX_OFFSET or r + n > MAX_MOFFSET:
            raise ObdError(
                "remote mapping does not fit the index entry's offset fields",
                field="remote",
                value=(offset, count, roffset),
            )
        with self._lock:
            while n > 0:
                k = min(n, MAX_LENGTH)
                self._log(s, k, r, False, REMOTE_DATA)
                s += k
                r += k
                n -= k
        return count

    def update_vsize(self, virtual_size: int) -> None:
        """Rewrite ``virtual_size`` in the index header and grow the fs-meta file to it.

        (overlaybd never does this for warp layers: it skips the vsize inheritance of
        ``stack_files`` and would corrupt the header-less fs-meta file on resize.)
        """
        with self._lock:
            self.journal.write_header(self.index_header.with_(virtual_size=virtual_size))
            self.header = self.journal.header
            if os.fstat(self._data_fd).st_size < virtual_size:
                os.ftruncate(self._data_fd, virtual_size)
                self.data_source.size = virtual_size
        self.flush()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self.target.close()


def open_warp_rw(
    index_path: str, fsmeta_path: str, *, target: Source | None = None, readonly: bool = False
) -> WarpRWLayer:
    """Open a writable turboOCI layer (``upper`` with ``target`` in ``config.v1.json``)."""
    return WarpRWLayer.open(index_path, fsmeta_path, target=target, readonly=readonly)


def commit_warp(
    layer: WarpRWLayer,
    out: Writable,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> SealedInfo:
    """``overlaybd-commit --turboOCI`` (alias ``--fastoci``): stream a sealed warp blob to ``out``.

    Header flags 0x07 with the layer's virtual size, a null uuid unless one is given, a parent only
    if one is given, and never a user tag. Fs-meta mappings are copied from the fs-meta file in
    64-sector chunks as a normal commit does, zeroed ones take the current data position, and
    remote mappings are emitted unchanged (their moffset stays a sector of the target). The index
    follows the data without padding, the trailer follows the index. ``out`` may be a
    :class:`~obd.layer.writer.BlobWriter` (ZFile and tar wrappers) or any binary stream.
    """
    header = layer_info(layer.virtual_size, uuid=uuid, parent_uuid=parent_uuid)
    return write_sealed(
        out, layer.dump(), layer.files, header, pad_index=False, keep_tag=REMOTE_DATA, progress=progress
    )
