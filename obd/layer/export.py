"""Writing a stack's virtual device to a raw image file.

The output is **sparse**: it is sized to the device, and only ranges some layer maps to data are
written; unmapped and discarded ranges stay holes (they read as zeros either way), and so does
every 4 KiB block of mapped data that reads as zeros (as ``cp --sparse=always`` and ``qemu-img
convert`` leave them): a plain image's file-system metadata maps its zeroed inode tables, 512 MiB
of a 64 GiB ext4. A 64 GiB device with a few MiB of data therefore exports in about a second and
takes a few MiB of disk.
The file is written under a temporary name and published (:mod:`obd.io.publish`) when complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from obd.errors import ObdError
from obd.io.publish import publish_path, temp_path
from obd.layer.tools import nonzero_runs
from obd.lsmt.stack import Stack
from obd.observability.progress import Progress

PIECE = 4 << 20


@dataclass(frozen=True)
class ExportResult:
    path: str
    virtual_size: int
    data_bytes: int
    data_extents: int
    zero_bytes: int
    hole_bytes: int
    #: what was written: ``data_bytes`` less its blocks of zeros (left holes)
    written_bytes: int = 0


def export_stack(stack: Stack, out_path: str, *, progress: Progress | None = None) -> ExportResult:
    """Write ``stack`` to ``out_path`` as a sparse raw image, atomically."""
    extents = stack.extents()
    data = [e for e in extents if e.kind == "data"]
    total = sum(e.length for e in data)
    if progress is not None:
        progress.total = total
    tmp = temp_path(out_path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ObdError(f"cannot create: {e.strerror}", path=tmp) from e
    try:
        os.ftruncate(fd, stack.size)
        buf = bytearray(PIECE)
        view = memoryview(buf)
        done = written = 0
        for ext in data:
            pos = ext.offset
            end = ext.offset + ext.length
            while pos < end:
                n = min(PIECE, end - pos)
                got = stack.readinto(view[:n], pos)
                for a, b in nonzero_runs(view[:got]):
                    written += b - a
                    while a < b:
                        a += os.pwrite(fd, view[a:b], pos + a)
                pos += n
                done += n
                if progress is not None:
                    progress.update(done)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    publish_path(tmp, out_path)
    return ExportResult(
        path=out_path,
        virtual_size=stack.size,
        data_bytes=total,
        data_extents=len(data),
        zero_bytes=sum(e.length for e in extents if e.kind == "zero"),
        hole_bytes=sum(e.length for e in extents if e.kind == "hole"),
        written_bytes=written,
    )


def stream_stack(stack: Stack, out: BinaryIO, *, progress: Progress | None = None) -> int:
    """Write every byte of the device to a stream (zeros included); returns the byte count."""
    buf = bytearray(PIECE)
    view = memoryview(buf)
    pos = 0
    if progress is not None:
        progress.total = stack.size
    while pos < stack.size:
        n = stack.readinto(view, pos)
        out.write(view[:n])
        pos += n
        if progress is not None:
            progress.update(pos)
    out.flush()
    return pos
