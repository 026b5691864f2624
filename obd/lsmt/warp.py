"""turboOCI (and erofs meta) "warp" layers: file metadata in the layer, file data in the original tar.

A warp layer (FORMATS.md §1.18) is an LSMT layer whose index points into **two** files, told apart
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
    encode_mapping,
    format_uuid,
)
from obd.lsmt.index import Mapping, MutableIndex
from obd.lsmt.rw import RWLayer, check_aligned, open_layer_fd, read_header, read_index_records

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


class WarpRWLayer(RWLayer):
    """A writable turboOCI layer: RW index file + header-less fs-meta file + read-only target.

    ``files`` is ``[fsmeta, target]``; :meth:`dump` reports relative tags that index it. As an
    RW layer of a :class:`~obd.lsmt.stack.Stack`, ``index.tag`` is set to the fs-meta slot and
    :attr:`record_tag` to the number of lowers (the ``rw_tag`` overlaybd writes into records).
    """

    def __init__(
        self,
        index_path: str,
        index_fd: int,
        fsmeta_path: str,
        fsmeta_fd: int,
        index_header: HeaderTrailer,
        *,
        target: Source | None = None,
        readonly: bool = False,
    ):
        super().__init__(fsmeta_path, fsmeta_fd, index_header, readonly=readonly)
        self.index = MutableIndex()
        self.index_path = index_path
        self._index_fd = index_fd
        self.index_header = index_header
        self.target: Source = target if target is not None else MissingTarget(f"{index_path} (target)")
        self._index_end = HT_SPACE
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
        import uuid as _uuid

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
        ifd = open_layer_fd(index_path, create=True)
        try:
            mfd = open_layer_fd(fsmeta_path, create=True)
        except BaseException:
            os.close(ifd)
            raise
        try:
            os.pwrite(ifd, header.pack(), 0)
            os.ftruncate(mfd, virtual_size)
            os.fsync(mfd)
            os.fsync(ifd)
        except BaseException:
            os.close(ifd)
            os.close(mfd)
            raise
        return cls(index_path, ifd, fsmeta_path, mfd, header, target=target)

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
            ifd = open_layer_fd(index_path, create=False, readonly=readonly)
            try:
                mfd = open_layer_fd(fsmeta_path, create=False, readonly=readonly)
            except BaseException:
                os.close(ifd)
                raise
        except BaseException:
            if target is not None:
                target.close()
            raise
        try:
            header = read_header(ifd, index_path)
            if header.is_data or header.is_sealed or header.index_offset != HT_SPACE:
                raise FormatError(
                    "not an RW index file (needs flags index, unsealed, index_offset 4096)",
                    path=index_path,
                    field="header.flags" if header.index_offset == HT_SPACE else "header.index_offset",
                    value=header.flags if header.index_offset == HT_SPACE else header.index_offset,
                )
            layer = cls(index_path, ifd, fsmeta_path, mfd, header, target=target, readonly=readonly)
            layer._replay()
        except BaseException:
            os.close(ifd)
            os.close(mfd)
            if target is not None:
                target.close()
            raise
        return layer

    def _replay(self) -> None:
        cols, count, partial = read_index_records(self._index_fd, self.index_path)
        real = cols.offset != INVALID_OFFSET
        self.skipped_records = int(count - real.sum())
        cols = cols.take(real)
        if len(cols):
            rel = cols.tag - cols.tag.min()
            over = np.nonzero(rel > REMOTE_DATA)[0]
            if len(over):
                i = int(over[0])
                raise FormatError(
                    f"record tags span {int(cols.tag.min())}..{int(cols.tag.max())}; a warp layer uses two "
                    "consecutive tags (fs-meta, target), so records were written at different stack depths",
                    path=self.index_path,
                    field=f"index[{i}].tag",
                    value=int(cols.tag[i]),
                )
            # the one moffset rule overlaybd keeps for warp indexes (range [0, 2**64)): mend > 0
            bad = np.nonzero(~cols.zeroed & (cols.moffset + cols.length == 0))[0]
            if len(bad):
                i = int(bad[0])
                raise FormatError(
                    "empty data record at moffset 0 (overlaybd refuses to open such an index)",
                    path=self.index_path,
                    field=f"index[{i}].length",
                    value=0,
                )
            ins = self.index.insert
            for o, ln, m, z, t in zip(
                cols.offset.tolist(),
                cols.length.tolist(),
                cols.moffset.tolist(),
                cols.zeroed.tolist(),
                rel.tolist(),
                strict=True,
            ):
                ins(o, ln, m, z, t)
        self._index_end = HT_SPACE + count * 16
        if partial and not self.readonly:
            os.ftruncate(self._index_fd, self._index_end)

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
    def _append_record(self, record: bytes) -> None:
        os.pwrite(self._index_fd, record, self._index_end)
        self._index_end += len(record)

    def _write_piece(self, data: memoryview, offset: int) -> None:
        n = len(data)
        if n == 0:
            return
        written = 0
        while written < n:
            written += os.pwrite(self._data_fd, data[written:], offset + written)
        s = offset // SECTOR
        with self._lock:
            self._append_record(encode_mapping(s, n // SECTOR, s, False, self.record_tag + FS_META))
            self.index.insert(s, n // SECTOR, s, False, FS_META)
            if offset + n > self.data_source.size:
                self.data_source.size = offset + n

    def _trim_piece(self, offset: int, length: int) -> None:
        if length == 0:
            return
        with self._lock:
            # a discard records the fs-meta file's end as its moffset, as LSMTFile::discard does
            end = os.fstat(self._data_fd).st_size // SECTOR
            rec = (offset // SECTOR, length // SECTOR, end)
            self._append_record(encode_mapping(*rec, True, self.record_tag + FS_META))
            self.index.insert(*rec, True, FS_META)

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
                self._append_record(encode_mapping(s, k, r, False, self.record_tag + REMOTE_DATA))
                self.index.insert(s, k, r, False, REMOTE_DATA)
                s += k
                r += k
                n -= k
        return count

    def flush(self) -> None:
        """Make everything so far durable: fs-meta data first, then the records that point at it."""
        if self._closed or self.readonly:
            return
        os.fdatasync(self._data_fd)
        os.fdatasync(self._index_fd)

    def update_vsize(self, virtual_size: int) -> None:
        """Rewrite ``virtual_size`` in the index header and grow the fs-meta file to it.

        (overlaybd never does this for warp layers: it skips the vsize inheritance of
        ``stack_files`` and would corrupt the header-less fs-meta file on resize.)
        """
        with self._lock:
            self.header = self.index_header = self.index_header.with_(virtual_size=virtual_size)
            os.pwrite(self._index_fd, self.index_header.pack(), 0)
            if os.fstat(self._data_fd).st_size < virtual_size:
                os.ftruncate(self._data_fd, virtual_size)
                self.data_source.size = virtual_size
        self.flush()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        os.close(self._index_fd)
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
