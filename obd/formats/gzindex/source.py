"""The decompressed stream of a gzip file as a :class:`~obd.io.source.Source`, read at random (§8.3).

A read starts a raw inflater at the nearest index entry at or before the offset, primes it with the
entry's leftover bits, sets its window as dictionary, and inflates forward; inflaters parked where
earlier reads stopped let sequential reads continue instead of restarting.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from obd.errors import FormatError, ObdError, TruncatedError
from obd.formats.gzindex.format import WINSIZE, GzipIndex
from obd.formats.gzindex.libz import Z_BUF_ERROR, Z_NEED_DICT, Z_NO_FLUSH, Z_STREAM_END, Inflate
from obd.io.source import FileSource, Source

_CHUNK = 65536


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _fetcher() -> ThreadPoolExecutor:
    """Threads that fetch windows of indexes read by ranges (made anew in a forked child)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=8, thread_name_prefix="obd-gzwin"))
        return _pool[1]


class _Cursor:
    """A raw inflater positioned at uncompressed offset ``out_pos``, fed from ``gzip`` at ``in_pos``."""

    def __init__(self, gzip: Source, index: GzipIndex, i: int):
        de_pos, en_pos, _, bits, _ = index.entry(i)
        self.gzip = gzip
        self.inf = Inflate(-15, path=gzip.name)
        strm = self.inf.strm
        try:
            # a window read by ranges is fetched while the gzip bytes are: one round trip, not two
            pending = None if index.has_window(i) else _fetcher().submit(index.window, i)
            if bits or pending is not None:  # the byte read also starts fetching the gzip bytes
                byte = gzip.read_exact(en_pos - 1, 1, f"gzip data (entry[{i}].en_pos)")[0]
            if bits:
                self.inf.check(self.inf.z.inflatePrime(self.inf.ref, bits, byte >> (8 - bits)), "prime")
            window = pending.result() if pending is not None else index.window(i)
            self.inf.check(self.inf.z.inflateSetDictionary(self.inf.ref, window, WINSIZE), "set dictionary")
        except BaseException:
            self.inf.close()
            raise
        self.inbuf = ctypes.create_string_buffer(_CHUNK)
        self.inview = memoryview(self.inbuf).cast("B")
        self.in_addr = ctypes.addressof(self.inbuf)
        strm.avail_in = 0
        self.in_pos = en_pos
        self.out_pos = de_pos
        self.ended = False

    def run(self, addr: int, n: int) -> int:
        """Inflate up to ``n`` bytes to address ``addr``; fewer only at the end of the deflate stream."""
        strm = self.inf.strm
        z = self.inf.z
        strm.next_out = addr
        strm.avail_out = n
        while strm.avail_out and not self.ended:
            if strm.avail_in == 0:
                got = self.gzip.readinto(self.inview, self.in_pos)
                if got <= 0:
                    raise TruncatedError(
                        f"gzip data ends at {self.in_pos} inside the deflate stream",
                        path=self.gzip.name,
                        field="gzip data",
                    )
                self.in_pos += got
                strm.next_in = self.in_addr
                strm.avail_in = got
            rc = self.inf.check(z.inflate(self.inf.ref, Z_NO_FLUSH), "")
            if rc == Z_STREAM_END:
                self.ended = True
            elif rc == Z_NEED_DICT:
                raise FormatError(
                    "deflate stream asks for a dictionary", path=self.gzip.name, field="gzip data"
                )
            elif rc == Z_BUF_ERROR and strm.avail_in and strm.avail_out:  # pragma: no cover - no progress
                raise FormatError("inflate made no progress", path=self.gzip.name, field="gzip data")
        done = n - strm.avail_out
        self.out_pos += done
        return done

    def close(self) -> None:
        self.inf.close()


class GzipIndexedSource(Source):
    """The decompressed bytes of a gzip file, read at random through its ``ddgzidx`` index.

    ``size`` is the index's ``uncompress_file_size``. ``readinto`` restarts inflation at the
    nearest entry at or before the offset (§8.3); a few inflaters left where the last reads ended
    are kept, so sequential reads continue instead of restarting. Safe to call from many threads
    (each read owns its inflater; libz runs without the GIL).
    """

    #: Parked inflaters kept for reuse.
    POOL = 4

    def __init__(self, gzip_source: Source, index_source: Source | GzipIndex, *, name: str | None = None):
        if isinstance(index_source, GzipIndex):
            index = index_source
            if index.header.gzip_file_size != gzip_source.size:
                raise FormatError(
                    f"index was built for a {index.header.gzip_file_size}-byte gzip file, "
                    f"the target holds {gzip_source.size}",
                    path=index.name,
                    field="header.gzip_file_size",
                    value=index.header.gzip_file_size,
                )
        else:
            index = GzipIndex(index_source, gzip_size=gzip_source.size)
        self.gzip = gzip_source
        self.index = index
        self.name = name or gzip_source.name
        self.size = index.uncompressed_size
        self._pool: list[_Cursor] = []
        self._lock = threading.Lock()
        self._scratch = threading.local()

    def _take(self, offset: int) -> _Cursor:
        i = self.index.find(offset)
        start = self.index.de_pos[i]
        with self._lock:
            best = None
            for c in self._pool:
                # a parked cursor is worth reusing if it needs less skipping than a restart would
                if start - _CHUNK <= c.out_pos <= offset and (best is None or c.out_pos > best.out_pos):
                    best = c
            if best is not None:
                self._pool.remove(best)
                return best
        return _Cursor(self.gzip, self.index, i)

    def _park(self, cursor: _Cursor) -> None:
        if cursor.ended:
            cursor.close()
            return
        with self._lock:
            self._pool.append(cursor)
            while len(self._pool) > self.POOL:
                self._pool.pop(0).close()

    def _discard_buffer(self) -> tuple[ctypes.Array, int]:
        buf = getattr(self._scratch, "buf", None)
        if buf is None:
            buf = self._scratch.buf = ctypes.create_string_buffer(_CHUNK)
        return buf, ctypes.addressof(buf)

    def readinto(self, buf: memoryview, offset: int) -> int:
        if offset < 0:
            raise ObdError("negative read offset", path=self.name, field="offset", value=offset)
        if offset >= self.size or len(buf) == 0:
            return 0
        view = memoryview(buf).cast("B")
        n = min(len(view), self.size - offset)
        cursor = self._take(offset)
        try:
            _keep, skip_addr = self._discard_buffer()
            while cursor.out_pos < offset:
                k = min(_CHUNK, offset - cursor.out_pos)
                if cursor.run(skip_addr, k) < k:
                    break
            done = 0
            if cursor.out_pos == offset:
                try:
                    target = (ctypes.c_char * n).from_buffer(view)
                except TypeError:
                    target = None
                if target is not None:
                    done = cursor.run(ctypes.addressof(target), n)
                    del target
                else:  # pragma: no cover - read-only or exotic buffers
                    tmp = ctypes.create_string_buffer(n)
                    done = cursor.run(ctypes.addressof(tmp), n)
                    view[:done] = memoryview(tmp).cast("B")[:done]
            if done < n:
                raise TruncatedError(
                    f"deflate stream ends at {cursor.out_pos}, before the {self.size} bytes the index says",
                    path=self.name,
                    field="header.uncompress_file_size",
                    value=self.size,
                )
        except BaseException:
            cursor.close()
            raise
        self._park(cursor)
        return n

    def close(self) -> None:
        """Free the parked inflaters and close the gzip and index sources."""
        with self._lock:
            pool, self._pool = self._pool, []
        for c in pool:
            c.close()
        self.gzip.close()
        self.index.source.close()


def is_gzip(source: Source) -> bool:
    """True if ``source`` starts with the gzip magic ``1f 8b`` (``is_gzfile``)."""
    return source.size >= 2 and source.pread(0, 2) == b"\x1f\x8b"


def open_gzip_indexed(
    gzip_path: str | os.PathLike[str], index_path: str | os.PathLike[str]
) -> GzipIndexedSource:
    """Convenience: :class:`GzipIndexedSource` over two local files."""
    return GzipIndexedSource(FileSource(gzip_path), FileSource(index_path))
