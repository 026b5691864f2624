"""Building turboOCI-style meta layers from plain OCI layer tars (docs/index.md, docs/formats.md §1.18, §9).

A meta layer is a committed warp layer (``ext4.fs.meta``): the ext4 metadata a layer's tar creates
(inodes, directories, extent trees, bitmaps) lives in the layer itself, and every regular file's
data blocks are tag-1 mappings onto that file's bytes in the *uncompressed* tar stream. A gzip layer
also gets its ``gzip.meta`` (§8), so the stream can be entered at a seek point instead of from the
start. Reading a file then costs a Range request into the original blob and nothing else.

How one layer is built (:meth:`TurboBuilder.build`), over a sparse raw working copy of the device
that holds metadata only:

1. the blob is read once: the gzip index is built from it, and the tar is parsed and its files
   spooled (:func:`obd.convert.layertar.read_layer`, which also records each file's data offset);
2. the tar is applied with debugfs, overlaybd-apply semantics (:mod:`obd.convert.ext4`: whiteouts,
   opaque directories, hard links, symlinks), on top of what the layers below left;
3. the physical extents of every file this layer created are read back (``dump_extents -l``), and
   those blocks are punched out of the working copy again (their bytes stay in the tar);
4. every 4 KiB block that now differs from the copy taken before step 2 is written into a fresh
   :class:`~obd.lsmt.warp.WarpRWLayer` as fs-meta, the extents are registered as remote data
   (device offset → tar offset, the tail cut at the file size rounded up to 512 as overlaybd does;
   a sparse member's segments each map onto their own run of the tar, and what no whole tar sector
   holds, the holes inside an allocated block, is written as fs-meta: :func:`file_extents`),
   and the layer is committed ``-z --fastoci`` (ZFile lz4, 4 KiB blocks).

Layer N is thus built on layer N-1's metadata, as turboOCI does. The stack a reader opens is the
base layer (the raw ``ext4_64``, as turboOCI places it when not making a file system) and the meta
layers, each with its target.

A zstd layer (which turboOCI refuses) gets obd's frame index, ``zstd.meta``, when it has several
small frames (zstd:chunked, estargz-zstd), so a read decodes only the frames it touches; a layer of
one frame has no seek point and is kept decompressed beside its meta layer, ``layer.tar``
(:mod:`obd.turbo.zstd`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from obd.convert.debugfs import Debugfs, Ext4Error, quote
from obd.convert.ext4 import FsNode, LayerApplier, debugfs_path
from obd.convert.layer import FS_BLOCK, export_nonzero, pwrite_all, write_changes
from obd.convert.layertar import (
    DIR,
    FILE,
    ParsedLayer,
    Spool,
    TarEntry,
    detect_compression,
    open_stream,
    read_layer,
)
from obd.formats.gzindex import DEFAULT_SPAN, build_gzip_index
from obd.image.local import open_layer
from obd.io.publish import publish_path
from obd.io.source import FileSource, data_extents
from obd.layer.blob import open_blob
from obd.layer.tools import OutputOptions, commit_warp_layer
from obd.lsmt.format import SECTOR
from obd.lsmt.rw import punch_hole
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack
from obd.lsmt.warp import FS_META, MissingTarget, WarpRWLayer
from obd.turbo.zstd import decompress_file, scan_frames, write_frame_index

#: File names inside a meta directory, as turboOCI names them inside its ``turboOCIv1.tar.gz``.
META_NAME = "ext4.fs.meta"
GZIP_INDEX_NAME = "gzip.meta"
#: obd's own: a zstd layer's frame index, or its decompressed copy when it has no seek points.
ZSTD_INDEX_NAME = "zstd.meta"
LOCAL_COPY_NAME = "layer.tar"
#: How the meta layer is committed: ``overlaybd-commit -z --fastoci`` (ZFile lz4, 4 KiB blocks).
META_OUTPUT = OutputOptions(compress="lz4", block_size=4096, verify=True)

# one leaf line of `dump_extents -l`: level, entries, logical range, physical range, length, flags
_EXTENT = re.compile(
    rb"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+)\s+-\s+(\d+)\s+(\d+)\s+-\s+(\d+)\s+(\d+)\s*(\S*)\s*$", re.M
)


@dataclass(frozen=True)
class RemoteExtent:
    """Device bytes ``[offset, offset+count)`` are tar-stream bytes ``[roffset, roffset+count)``."""

    offset: int
    count: int
    roffset: int


@dataclass
class TurboLayerStats:
    """What building one meta layer cost and produced."""

    blob_bytes: int = 0
    tar_bytes: int = 0
    entries: int = 0
    files: int = 0
    data_bytes: int = 0
    remote_bytes: int = 0
    meta_bytes: int = 0  # fs-meta bytes written into the layer (before compression)
    meta_file_bytes: int = 0  # size of ext4.fs.meta
    gzip_index_bytes: int = 0
    gzip_index_entries: int = 0
    zstd_frames: int = 0
    local_copy_bytes: int = 0  # a zstd layer without seek points, kept decompressed
    seconds: float = 0.0


@dataclass
class TurboLayer:
    """A built meta layer: ``meta`` (ext4.fs.meta), ``gzip_index`` (gzip.meta, gzip layers only;
    for a zstd layer its ``zstd.meta`` frame index), ``local_copy`` (a zstd layer without seek points:
    its decompressed tar)."""

    meta: str
    gzip_index: str | None
    compression: str
    diff_id: str
    stats: TurboLayerStats = field(default_factory=TurboLayerStats)
    local_copy: str | None = None


def parse_extents(text: bytes, *, path: str) -> list[tuple[int, int, int]]:
    """``(logical block, physical block, blocks)`` of a ``dump_extents -l`` answer."""
    out = []
    for m in _EXTENT.finditer(text):
        if m.group(6):
            # an uninitialised extent reads as zeros on a kernel, whatever the tar holds
            raise Ext4Error(f"{path}: unexpected extent flags {m.group(6)!r}")
        out.append((int(m.group(1)), int(m.group(3)), int(m.group(5))))
    return out


@dataclass(frozen=True)
class LocalExtent:
    """Device bytes ``[offset, offset+count)`` are file bytes ``[foffset, foffset+count)`` that no
    sector of the tar holds as they are: a hole inside a block ext4 allocated for a sparse file, or
    a sparse segment that does not start on a sector boundary of the tar. They are written into
    the meta layer as fs-meta."""

    offset: int
    count: int
    foffset: int


def remote_extents(entry: TarEntry, extents: list[tuple[int, int, int]]) -> list[RemoteExtent]:
    """The remote mappings of one file: each extent onto its bytes in the tar stream (see
    :func:`file_extents`, which also says what cannot be mapped)."""
    return file_extents(entry, extents)[0]


def file_extents(
    entry: TarEntry, extents: list[tuple[int, int, int]]
) -> tuple[list[RemoteExtent], list[LocalExtent]]:
    """Where the bytes of one file's ext4 extents come from: ranges of the tar stream, and the
    rest (:class:`LocalExtent`), which only a sparse member can have.

    As ``extract_regfile_meta_only`` does, a mapping ends at the file size rounded up to 512; the
    rest of the last block is not mapped (it lies past the end of the file). A sparse member's data
    segments lie one after the other in the tar, so each segment is its own run of tar bytes; the
    sectors of an allocated block that no segment covers whole (holes, unaligned edges) are local.
    """
    limit = -(-entry.size // SECTOR) * SECTOR
    segments = entry.sparse if entry.sparse is not None else ((0, entry.size),)
    starts = [offset for offset, _length in segments]
    # where each segment starts in the tar stream: the stored segments follow one another
    tar_at = list(itertools.accumulate((length for _o, length in segments), initial=entry.data_offset))
    remote: list[RemoteExtent] = []
    local: list[LocalExtent] = []
    for logical, physical, blocks in extents:
        lo = logical * FS_BLOCK
        hi = min(lo + blocks * FS_BLOCK, limit)
        if hi <= lo:
            continue
        device = physical * FS_BLOCK - lo  # device byte of file byte x: device + x
        covered = lo
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(segments) and segments[i][0] < hi:
            offset, length = segments[i]
            end = offset + length
            if end == entry.size:
                end = limit  # the tail sector reads the tar's padding, as for a whole file
            delta = tar_at[i] - offset  # tar byte of file byte x: x + delta
            a = -(-max(offset, lo) // SECTOR) * SECTOR
            b = min(end, hi) // SECTOR * SECTOR
            i += 1
            if b <= a or delta % SECTOR:
                continue
            if a > covered:
                local.append(LocalExtent(device + covered, a - covered, covered))
            remote.append(RemoteExtent(device + a, b - a, a + delta))
            covered = b
        if covered < hi:
            local.append(LocalExtent(device + covered, hi - covered, covered))
    return remote, local


class _TurboApplier(LayerApplier):
    """The ext4 applier, remembering which inode each regular file of the layer became."""

    def __init__(self, fs: Debugfs, layer: ParsedLayer, spool_dir: str, *, epoch: int):
        super().__init__(fs, layer, spool_dir, epoch=epoch)
        self.created: dict[int, tuple[object, TarEntry]] = {}

    def apply_entry(self, e: TarEntry) -> None:
        super().apply_entry(e)
        if e.kind == FILE and e.size:
            node = self._find(e.parts, load=False)
            if node is not None and node.kind == FILE:
                self.created[id(node.inode)] = (node.inode, e)

    def surviving_files(self) -> list[tuple[tuple[bytes, ...], TarEntry]]:
        """One path to each file inode this layer created that is still linked, with its entry."""
        found: dict[int, tuple[tuple[bytes, ...], TarEntry]] = {}
        todo: list[tuple[tuple[bytes, ...], FsNode]] = [((), self.root)]
        while todo:
            parts, node = todo.pop()
            for name, child in (node.children or {}).items():
                here = (*parts, name)
                if child.kind == DIR:
                    todo.append((here, child))
                elif child.kind == FILE and child.new:
                    hit = self.created.get(id(child.inode))
                    if hit is not None and id(child.inode) not in found:
                        found[id(child.inode)] = (here, hit[1])
        return sorted(found.values(), key=lambda pe: pe[1].data_offset)


def _sparse_copy(src: str, dst: str) -> None:
    """Copy the sparse file ``src`` to ``dst``, holes kept."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        for start, length in data_extents(fi.fileno(), size):
            os.copy_file_range(fi.fileno(), fo.fileno(), length, start, start)


def _write_local(layer: WarpRWLayer, entry: TarEntry, pieces: list[LocalExtent]) -> int:
    """Write a file's local pieces (read from its spool file, zeros past its end) as fs-meta."""
    assert entry.data is not None
    written = 0
    with open(entry.data, "rb") as f:
        for piece in pieces:
            data = os.pread(f.fileno(), piece.count, piece.foffset)
            layer.pwrite(data + bytes(piece.count - len(data)), piece.offset)
            written += piece.count
    return written


class TurboBuilder:
    """Builds the meta layers of one image, bottom up, over a raw metadata-only copy of the device.

    ``base_layer`` is the overlaybd base layer (``ext4_64``) the stack starts from. Call
    :meth:`build` once per layer, lowest first; :meth:`close` removes the working files.
    """

    def __init__(self, workdir: str, base_layer: str, *, span: int = DEFAULT_SPAN):
        self.workdir = workdir
        self.span = span
        self.raw = os.path.join(workdir, "device.raw")
        self.prev = os.path.join(workdir, "device.prev")
        base = open_layer(base_layer)
        try:
            self.vsize = base.virtual_size
            export_nonzero(Stack([base]), self.raw)
        finally:
            base.close()

    def add_existing(self, meta: str) -> None:
        """Bring the working copy up to a meta layer built earlier (a cache hit), without its tar.

        Its fs-meta mappings are copied in and its remote ones punched out: the working copy holds
        the device's metadata, never file data.
        """
        opened = open_blob(meta)
        layer = SealedLayer(opened.source, warp=True, target=MissingTarget(meta), name=meta, blob=opened)
        fd = os.open(self.raw, os.O_RDWR | os.O_CLOEXEC)
        try:
            for offset, length, moffset, zeroed, tag in layer.index:
                if zeroed or tag != FS_META:
                    punch_hole(fd, offset * SECTOR, length * SECTOR)
                    continue
                data = layer.files[0].pread(moffset * SECTOR, length * SECTOR)
                pwrite_all(fd, memoryview(data), offset * SECTOR)
        finally:
            os.close(fd)
            layer.close()

    def build(
        self,
        blob: str,
        out_dir: str,
        *,
        name: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> TurboLayer:
        """Build the meta layer of the layer blob ``blob`` (tar or tar.gz) into ``out_dir``.

        ``out_dir`` receives ``ext4.fs.meta`` and, for gzip, ``gzip.meta`` (each published
        atomically). ``progress(message)`` is told about each phase.
        """
        t0 = time.monotonic()
        label = name or blob
        say = progress or (lambda _m: None)
        stats = TurboLayerStats(blob_bytes=os.path.getsize(blob))
        with open(blob, "rb") as f:
            compression = detect_compression(f.read(4))
        os.makedirs(out_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="turbo-", dir=self.workdir)
        copy_path = None
        try:
            gz_path = None
            if compression == "zstd":
                say("zstd frames")
                frames = scan_frames(blob, name=label)
                stats.zstd_frames = len(frames.frames)
                if frames.seekable:
                    gz_path = os.path.join(out_dir, ZSTD_INDEX_NAME)
                    write_frame_index(frames, gz_path)
                    stats.gzip_index_bytes = os.path.getsize(gz_path)
                else:
                    copy_path = os.path.join(out_dir, LOCAL_COPY_NAME)
                    stats.local_copy_bytes = decompress_file(blob, copy_path)
            if compression == "gzip":
                say("gzip index")
                tmp_gz = os.path.join(work, GZIP_INDEX_NAME)
                header = build_gzip_index(blob, tmp_gz, span=self.span)
                stats.gzip_index_bytes, stats.gzip_index_entries = header.index_file_size, header.index_num
                gz_path = os.path.join(out_dir, GZIP_INDEX_NAME)
                publish_path(tmp_gz, gz_path)
            say("reading the tar")
            parsed = self._parse(blob, work, label)
            stats.tar_bytes, stats.entries = parsed.tar_bytes, len(parsed.entries)
            stats.data_bytes = parsed.data_bytes
            say(f"applying {len(parsed.entries)} entries")
            _sparse_copy(self.raw, self.prev)
            extents = self._apply(parsed, work)
            stats.files = len(extents)
            say("writing the meta layer")
            meta_tmp = os.path.join(work, META_NAME)
            stats.meta_bytes, stats.remote_bytes = self._commit(extents, work, meta_tmp)
            stats.meta_file_bytes = os.path.getsize(meta_tmp)
            meta = os.path.join(out_dir, META_NAME)
            publish_path(meta_tmp, meta)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if os.path.exists(self.prev):
                os.unlink(self.prev)
        stats.seconds = time.monotonic() - t0
        return TurboLayer(meta, gz_path, compression, parsed.diff_id, stats, copy_path)

    def _parse(self, blob: str, work: str, label: str) -> ParsedLayer:
        spool_dir = os.path.join(work, "spool")
        os.mkdir(spool_dir)
        stream, raw, compression = open_stream(blob)
        try:
            return read_layer(stream, Spool(spool_dir), name=label, compression=compression)
        finally:
            stream.close()
            raw.close()

    def _apply(
        self, parsed: ParsedLayer, work: str
    ) -> list[tuple[TarEntry, list[RemoteExtent], list[LocalExtent]]]:
        """Apply the layer to the working copy; where each new file's extents come from, data punched out."""
        stamp = max(1, parsed.max_mtime)
        fs = Debugfs(self.raw, writable=True, epoch=stamp)
        try:
            applier = _TurboApplier(fs, parsed, os.path.join(work, "spool"), epoch=stamp)
            applier.run()
            files = applier.surviving_files()
            answers = fs.run([b"dump_extents -l " + quote(debugfs_path(parts)) for parts, _ in files])
        except BaseException:
            fs.abort()
            raise
        fs.close()
        out = []
        fd = os.open(self.raw, os.O_RDWR | os.O_CLOEXEC)
        try:
            for (_parts, entry), text in zip(files, answers, strict=True):
                ext = parse_extents(text, path=entry.display)
                for _logical, physical, blocks in ext:
                    # the bytes stay in the tar: the working copy keeps metadata only
                    punch_hole(fd, physical * FS_BLOCK, blocks * FS_BLOCK)
                out.append((entry, *file_extents(entry, ext)))
        finally:
            os.close(fd)
        return out

    def _commit(
        self,
        extents: list[tuple[TarEntry, list[RemoteExtent], list[LocalExtent]]],
        work: str,
        meta_path: str,
    ) -> tuple[int, int]:
        """Write the changed metadata, the local pieces of sparse files and the remote extents into
        a warp layer and commit it."""
        layer = WarpRWLayer.create(
            os.path.join(work, "writable_index"), os.path.join(work, "writable_data"), self.vsize
        )
        try:
            prev = FileSource(self.prev)
            try:
                _compared, changed = write_changes(self.raw, prev, layer)
            finally:
                prev.close()
            remote = 0
            for entry, remotes, locals_ in extents:
                if locals_:
                    changed += _write_local(layer, entry, locals_)
                for ext in remotes:
                    layer.register_remote(ext.offset, ext.count, ext.roffset)
                    remote += ext.count
            layer.flush()
            commit_warp_layer(layer, meta_path, options=META_OUTPUT)
        finally:
            layer.close()
        return changed, remote

    def close(self) -> None:
        for p in (self.raw, self.prev):
            if os.path.exists(p):
                os.unlink(p)


def chain_key(digests: list[str]) -> str:
    """The cache key of the meta layer of the last of ``digests`` (layer digests, lowest first).

    A meta layer depends on every layer below it (its ext4 is built on theirs), so it is keyed by
    the whole chain, as containerd keys snapshots by chain ID.
    """
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode() + b"\n")
    return h.hexdigest()


__all__ = [
    "GZIP_INDEX_NAME",
    "LOCAL_COPY_NAME",
    "META_NAME",
    "META_OUTPUT",
    "ZSTD_INDEX_NAME",
    "LocalExtent",
    "RemoteExtent",
    "TurboBuilder",
    "TurboLayer",
    "TurboLayerStats",
    "chain_key",
    "file_extents",
    "parse_extents",
    "remote_extents",
]
