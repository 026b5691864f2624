"""Random-access byte sources: the one small interface every layer of the read path speaks.

A :class:`Source` has a ``name`` (for error messages), a ``size`` and ``readinto(buf, offset)``.
Each format layer (tar envelope, ZFile, LSMT) consumes a Source and, where it yields bytes of its
own, is one: data flows one way, and a layer only knows the one below it.

``readinto`` fills as much of ``buf`` as the source holds from ``offset`` and returns the count; it
is short only at the end of the source. Implementations must be safe to call from many threads at
once (``os.preadv`` is; anything with shared state takes a lock).
"""

from __future__ import annotations

import errno
import os
from typing import BinaryIO

from obd.errors import ObdError, TruncatedError
from obd.io.pagecache import read_cached

#: A read-only buffer of zeros that callers slice to zero-fill without allocating.
ZEROS = memoryview(bytes(4 << 20))


def fill_zero(buf: memoryview) -> None:
    """Set every byte of ``buf`` to zero, in ``len(ZEROS)`` strides."""
    n = len(buf)
    step = len(ZEROS)
    pos = 0
    while pos < n:
        k = min(step, n - pos)
        buf[pos : pos + k] = ZEROS[:k]
        pos += k


class Source:
    """Base class: subclasses implement ``readinto`` and set ``name`` and ``size``."""

    name: str = "<source>"
    size: int = 0

    def readinto(self, buf: memoryview, offset: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def readinto_nowait(self, buf: memoryview, offset: int) -> int | None:
        """:meth:`readinto`, but only if that cannot wait for I/O (the bytes are in memory or in the
        page cache); None when it would have to, and the caller should use :meth:`readinto` where
        blocking is fine (a worker thread). An event loop serves cached reads with it without the
        cost of a thread hop. The default never knows, so it always says None."""
        return None

    def pread(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``offset`` (fewer only at the end of the source)."""
        if offset >= self.size or length <= 0:
            return b""
        buf = bytearray(min(length, self.size - offset))
        n = self.readinto(memoryview(buf), offset)
        del buf[n:]
        return bytes(buf)

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` or raise :class:`TruncatedError` naming ``what``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TruncatedError(
                f"needs bytes [{offset}, {offset + length}) but the file holds {self.size}",
                path=self.name,
                field=what,
            )
        data = self.pread(offset, length)
        if len(data) != length:
            raise TruncatedError(
                f"read {len(data)} of {length} bytes at offset {offset}", path=self.name, field=what
            )
        return data

    def close(self) -> None:
        """Release what the source holds open; further reads are undefined."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} size={self.size}>"


class FileSource(Source):
    """A local file read with ``os.preadv`` (thread-safe, no shared file position).

    Small reads the page cache holds are served first by :func:`~obd.io.pagecache.read_cached`,
    which keeps the GIL (many threads reading 4 KiB each spend less that way).
    """

    def __init__(self, path: str | os.PathLike[str], *, fd: int | None = None, name: str | None = None):
        self.path = os.fspath(path)
        self.name = name or self.path
        try:
            self.fd = fd if fd is not None else os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ObdError(f"cannot open: {e.strerror}", path=self.path) from e
        self._owns_fd = fd is None
        self.size = os.fstat(self.fd).st_size
        self._held = True

    def _read_held(self, buf: memoryview, offset: int) -> bool:
        """Whether :func:`read_cached` filled ``buf``; a file system without ``RWF_NOWAIT`` is not
        asked again."""
        if not self._held:
            return False
        got = read_cached(self.fd, buf, offset)
        if got == -2:
            self._held = False
        return got == len(buf)

    def readinto(self, buf: memoryview, offset: int) -> int:
        # no clamp at self.size: the file may have grown since it was opened (an RW data file)
        want = len(buf)
        if self._read_held(buf, offset):
            return want
        got = 0
        while got < want:
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if n <= 0:
                break
            got += n
        return got

    def readinto_nowait(self, buf: memoryview, offset: int) -> int | None:
        want = len(buf)
        if self._read_held(buf, offset):
            return want
        got = 0
        while got < want:
            try:
                n = os.preadv(self.fd, [buf[got:]], offset + got, os.RWF_NOWAIT)
            except OSError:  # EAGAIN: not (all) in the page cache; others: readinto will report them
                return None
            if n <= 0:
                break
            got += n
        return got

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BytesSource(Source):
    """Bytes held in memory (tests, small decoded blobs)."""

    def __init__(self, data: bytes | bytearray | memoryview, name: str = "<memory>"):
        self._data = memoryview(data).cast("B")
        self.name = name
        self.size = len(self._data)

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset >= self.size:
            return 0
        n = min(len(buf), self.size - offset)
        buf[:n] = self._data[offset : offset + n]
        return n

    def readinto_nowait(self, buf: memoryview, offset: int) -> int | None:
        return self.readinto(buf, offset)


class WindowSource(Source):
    """``size`` bytes of ``parent`` starting at ``base``: a tar envelope's payload, for example."""

    def __init__(self, parent: Source, base: int, size: int, name: str | None = None):
        if base < 0 or size < 0 or base + size > parent.size:
            raise TruncatedError(
                f"window [{base}, {base + size}) does not fit in {parent.size} bytes",
                path=parent.name,
                field="payload",
            )
        self.parent = parent
        self.base = base
        self.size = size
        self.name = name or parent.name

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset >= self.size:
            return 0
        n = min(len(buf), self.size - offset)
        return self.parent.readinto(buf[:n], self.base + offset)

    def readinto_nowait(self, buf: memoryview, offset: int) -> int | None:
        if offset >= self.size:
            return 0
        n = min(len(buf), self.size - offset)
        return self.parent.readinto_nowait(buf[:n], self.base + offset)

    def close(self) -> None:
        self.parent.close()


class StreamWriter:
    """Counts what is written to a binary stream, so writers can report offsets without ``tell()``."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.offset = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if n:
            self.stream.write(data)
            self.offset += n
        return n


def data_extents(fd: int, size: int, block: int = 4096) -> list[tuple[int, int]]:
    """``(offset, length)`` of the data of a sparse file (``SEEK_DATA``/``SEEK_HOLE``), widened to
    whole ``block``-byte blocks (but not past ``size``); touching ranges are merged."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        a = start // block * block
        b = min(-(-stop // block) * block, size)
        if out and out[-1][0] + out[-1][1] >= a:
            a0 = out[-1][0]
            out[-1] = (a0, max(b, a0 + out[-1][1]) - a0)
        else:
            out.append((a, b - a))
        pos = stop
    return out
