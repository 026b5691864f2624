"""Atomic publication of files: write beside the target, make it durable, rename it into place.

A reader (or a process restarted after a kill -9) sees either the old file or the complete new one,
never a torn one: the data goes to a temporary name in the target's directory (same file system,
so the rename is atomic), is fsync'ed, and only then replaces the target. A failure on the way
removes the temporary file and leaves the target as it was. This is the one place obd does that;
every writer of a result file goes through it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from typing import IO, Any


def temp_path(path: str | os.PathLike[str]) -> str:
    """A temporary name beside ``path`` that no other process or thread uses at the same time."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}-{threading.get_ident()}"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside directory ``path`` durable (best effort where directories can't be opened)."""
    try:
        fd = os.open(os.fspath(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def publishing(
    path: str | os.PathLike[str], mode: str = "wb", *, durable: bool = True, **open_kw: Any
) -> Iterator[IO[Any]]:
    """``with publishing(path) as f: f.write(...)``: ``path`` appears whole when the block ends.

    ``durable`` fsyncs the file before the rename and the directory after it (so the new name
    survives a power cut too); turn it off for caches whose loss only costs a refetch.
    """
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path))


def publish_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, **kw: Any) -> None:
    """Replace ``path`` with ``data``, atomically (see :func:`publishing`)."""
    with publishing(path, **kw) as f:
        f.write(data)


def publish_copy(path: str | os.PathLike[str], src: str | os.PathLike[str]) -> None:
    """Put the file ``src`` at ``path`` atomically: a hard link when both are on one file system,
    else a copy (made durable before the rename)."""
    path = os.fspath(path)
    tmp = temp_path(path)
    _discard(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:
            _discard(tmp)
            raise
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def publish_path(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename a finished temporary file or directory ``tmp`` (written by someone else, e.g. a tool
    that takes an output path) to ``path``, durably."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.fspath(path)))
