"""Turning applied tars into overlaybd layers: one sparse RW layer per tar, holding only what changed.

The image being built lives twice: as the stack of layers committed so far (read-only, the truth)
and as one sparse raw file, the same device, which debugfs edits in place. After a tar has been
applied to the raw file, every 4 KiB block of its data extents is compared with the stack (numpy,
a few MiB at a time); the blocks that differ — and only those — are written into a fresh sparse RW
layer, which is committed ``-z -t`` like the convertor does (docs/formats.md §7.1). The committed layer
then joins the stack, and the raw file stays in step for the next tar.

The raw file starts as the base layer's device (only its non-zero blocks are written, so a 64 GiB
file system costs a few MiB), or as a fresh ``mke2fs`` with ``mkfs``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from obd.convert.ext4 import ApplyStats, apply_layer, fsck, mkfs_ext4
from obd.convert.layertar import ParsedLayer
from obd.errors import ObdError
from obd.image.local import open_layer
from obd.io.source import Source, data_extents
from obd.layer.tools import OutputOptions, commit_layer
from obd.lsmt.rw import RWLayer, create_rw
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack

FS_BLOCK = 4096
CHUNK = 8 << 20


@dataclass
class LayerStats:
    """Where one layer's time and bytes went."""

    tar_bytes: int = 0
    data_bytes: int = 0
    entries: int = 0
    changed_bytes: int = 0
    compared_bytes: int = 0
    blob_bytes: int = 0
    read_seconds: float = 0.0  # download excluded: decompress, parse, spool
    prepare_seconds: float = 0.0  # making the device's working copy (export or mkfs), when needed
    ext4_seconds: float = 0.0  # planning and debugfs
    fsck_seconds: float = 0.0
    diff_seconds: float = 0.0
    commit_seconds: float = 0.0  # compaction + compression + envelope
    apply: ApplyStats | None = None
    cached: bool = False


@dataclass
class BuiltLayer:
    """A committed layer file and its identity."""

    path: str
    digest: str
    size: int
    uuid: str
    parent_uuid: str | None
    stats: LayerStats = field(default_factory=LayerStats)


def _runs(mask: np.ndarray | np.bool_) -> list[tuple[int, int]]:
    """``[start, end)`` index runs where ``mask`` is true."""
    idx = np.flatnonzero(mask)
    if not idx.size:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def export_nonzero(stack: Stack, path: str) -> int:
    """Write the device of ``stack`` to a new sparse file, skipping all-zero 4 KiB blocks.

    Returns the bytes written. (A 64 GiB base layer maps 517 MiB, of which under 5 MiB are not zero.)
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    written = 0
    try:
        os.ftruncate(fd, stack.size)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        words = np.frombuffer(buf, dtype=np.uint64)
        for ext in stack.extents():
            if ext.kind != "data":
                continue
            a = ext.offset // FS_BLOCK * FS_BLOCK
            end = min(-(-(ext.offset + ext.length) // FS_BLOCK) * FS_BLOCK, stack.size)
            while a < end:
                n = min(CHUNK, end - a)
                got = stack.readinto(view[:n], a)
                if got < n:
                    view[got:n] = bytes(n - got)
                blocks = words[: n // 8].reshape(-1, FS_BLOCK // 8)
                for s, e in _runs(blocks.any(axis=1)):
                    pwrite_all(fd, view[s * FS_BLOCK : e * FS_BLOCK], a + s * FS_BLOCK)
                    written += (e - s) * FS_BLOCK
                a += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def write_changes(raw_path: str, lower: Source | None, rw: RWLayer) -> tuple[int, int]:
    """Copy every 4 KiB block of ``raw_path`` that differs from ``lower`` (zeros if None) into ``rw``.

    Only the raw file's data extents are compared: debugfs writes, it never punches holes, so a
    hole still reads as what the stack has there. Returns ``(bytes compared, bytes written)``.
    """
    fd = os.open(raw_path, os.O_RDONLY | os.O_CLOEXEC)
    compared = changed = 0
    try:
        size = os.fstat(fd).st_size
        new = bytearray(CHUNK)
        old = bytearray(CHUNK)
        nview, oview = memoryview(new), memoryview(old)
        nwords = np.frombuffer(new, dtype=np.uint64)
        owords = np.frombuffer(old, dtype=np.uint64)
        for start, length in data_extents(fd, size):
            pos, end = start, start + length
            while pos < end:
                n = min(CHUNK, end - pos)
                got = os.preadv(fd, [nview[:n]], pos)
                if got < n:
                    nview[got:n] = bytes(n - got)
                a = nwords[: n // 8].reshape(-1, FS_BLOCK // 8)
                if lower is None:
                    diff = a.any(axis=1)
                else:
                    got = lower.readinto(oview[:n], pos)
                    if got < n:
                        oview[got:n] = bytes(n - got)
                    b = owords[: n // 8].reshape(-1, FS_BLOCK // 8)
                    diff = (a != b).any(axis=1)
                for s, e in _runs(diff):
                    rw.pwrite(nview[s * FS_BLOCK : e * FS_BLOCK], pos + s * FS_BLOCK)
                    changed += (e - s) * FS_BLOCK
                compared += n
                pos += n
    finally:
        os.close(fd)
    return compared, changed


def file_digest(path: str) -> tuple[str, int]:
    """``("sha256:…", size)`` of a file."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return "sha256:" + h.hexdigest(), size


class DeviceBuilder:
    """Builds the layers of one image, bottom up, over a raw working copy of the device.

    ``lowers`` start as ``[base layer]`` (or empty with ``mkfs``). :meth:`add_existing` stacks a
    layer converted earlier (a cache hit) without applying anything; :meth:`build` applies a tar
    and commits the change.
    """

    def __init__(
        self,
        workdir: str,
        *,
        base_layer: str | None,
        vsize: int,
        output: OutputOptions,
        fs_uuid: str,
        check: bool = False,
    ):
        if base_layer is None and vsize <= 0:
            raise ObdError("mkfs needs a positive virtual size", field="vsize", value=vsize)
        self.workdir = workdir
        self.output = output
        self.vsize = vsize
        self.fs_uuid = fs_uuid
        self.check = check
        self.raw = os.path.join(workdir, "device.raw")
        self.lowers: list[SealedLayer] = []
        self.count = 0  # image layers stacked so far (the base layer not counted)
        self._raw_valid = False
        if base_layer is not None:
            self.lowers.append(open_layer(base_layer))

    def _stack(self) -> Stack | None:
        return Stack(self.lowers) if self.lowers else None

    def add_existing(self, path: str) -> None:
        """Stack an already committed layer; the raw copy is rebuilt when next needed."""
        self.lowers.append(open_layer(path))
        self.count += 1
        self._raw_valid = False

    def _prepare_raw(self, epoch: int) -> None:
        if self._raw_valid:
            return
        if os.path.exists(self.raw):
            os.unlink(self.raw)
        stack = self._stack()
        if stack is None:
            mkfs_ext4(self.raw, self.vsize, uuid=self.fs_uuid, epoch=epoch)
        else:
            export_nonzero(stack, self.raw)
        self._raw_valid = True

    def build(
        self,
        parsed: ParsedLayer,
        spool_dir: str,
        out_path: str,
        *,
        uuid: str,
        parent_uuid: str | None,
        stats: LayerStats | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> BuiltLayer:
        """Apply ``parsed`` and commit what changed to ``out_path`` (tar-wrapped ZFile)."""
        stats = stats or LayerStats()
        t0 = time.monotonic()
        self._prepare_raw(max(1, parsed.max_mtime))
        stats.prepare_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            stats.apply = apply_layer(self.raw, parsed, spool_dir)
        except BaseException:
            self._raw_valid = False  # half-applied: rebuild from the stack if anyone goes on
            raise
        stats.ext4_seconds = time.monotonic() - t0
        if self.check:
            t0 = time.monotonic()
            try:
                fsck(self.raw)
            except BaseException:
                self._raw_valid = False
                raise
            stats.fsck_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        stack = self._stack()
        data = os.path.join(self.workdir, "writable_data")
        if os.path.exists(data):
            os.unlink(data)
        # the convertor: vsize for the first layer (64 GiB on the base layer), 0 = inherit above it
        rw = create_rw(data, None, self.vsize if self.count == 0 else 0, sparse=True)
        try:
            if rw.virtual_size == 0 and stack is not None:
                rw.update_vsize(stack.size)  # what stacking a vsize-0 layer does (docs/formats.md §1.11)
            stats.compared_bytes, stats.changed_bytes = write_changes(self.raw, stack, rw)
            rw.flush()
            stats.diff_seconds = time.monotonic() - t0
            t0 = time.monotonic()
            commit_layer(
                rw, out_path, uuid=uuid, parent_uuid=parent_uuid, options=self.output, progress=progress
            )
            stats.commit_seconds = time.monotonic() - t0
        finally:
            rw.close()
            os.unlink(data)
        digest, size = file_digest(out_path)
        stats.blob_bytes = size
        stats.tar_bytes, stats.data_bytes, stats.entries = (
            parsed.tar_bytes,
            parsed.data_bytes,
            len(parsed.entries),
        )
        self.lowers.append(open_layer(out_path))
        self.count += 1
        self._raw_valid = True
        return BuiltLayer(out_path, digest, size, uuid, parent_uuid, stats)

    def close(self) -> None:
        for layer in self.lowers:
            layer.close()
        self.lowers = []
        if os.path.exists(self.raw):
            os.unlink(self.raw)


__all__ = [
    "BuiltLayer",
    "DeviceBuilder",
    "LayerStats",
    "data_extents",
    "export_nonzero",
    "file_digest",
    "write_changes",
]
