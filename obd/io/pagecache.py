"""Small reads from the page cache without releasing the GIL.

``os.preadv`` releases the GIL for every call. A 4 KiB read that the page cache holds takes about a
microsecond in the kernel, less than what a release costs when many threads serve small requests
(nbdkit's 16): every release is a chance for another thread to take the GIL and for this one to
wait, with a futex wake-up and a task switch, to get it back. :func:`read_cached` instead calls
``preadv2(RWF_NOWAIT)`` through :class:`ctypes.PyDLL`, which keeps the GIL: the kernel copies what
the page cache holds and refuses (``EAGAIN``) rather than wait for the disk, so the GIL is never held
across real I/O. On a refusal the caller does its ordinary, releasing read.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

#: Above this many bytes a read releases the GIL as usual: the copy itself is then long enough.
MAX_HELD = 64 << 10


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


def _load() -> Callable[..., int] | None:
    try:
        fn = ctypes.PyDLL("libc.so.6", use_errno=True).preadv2
    except (OSError, AttributeError):  # not glibc, or older than 2.26
        return None
    fn.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int, ctypes.c_int64, ctypes.c_int)
    fn.restype = ctypes.c_ssize_t
    return fn


_preadv2 = _load()
_addressof = ctypes.addressof
_char = ctypes.c_char
_get_errno = ctypes.get_errno
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def read_cached(fd: int, buf: memoryview, offset: int) -> int:
    """Read into ``buf`` from ``offset`` what the page cache holds, keeping the GIL.

    Returns the bytes read (a full ``len(buf)``, or fewer at the end of the file), or -1 when the
    caller must read as usual: data not cached, ``buf`` too large or read-only, a file system
    without ``RWF_NOWAIT`` (-2 then, so that the caller stops asking), or any error (which the
    ordinary read will then report).
    """
    n = len(buf)
    if _preadv2 is None or n > MAX_HELD or not n:
        return -2 if _preadv2 is None else -1
    try:
        # A new iovec per call: another thread may run between any two statements here.
        iov = _Iovec(_addressof(_char.from_buffer(buf)), n)
    except (TypeError, ValueError):  # read-only or not contiguous
        return -1
    got = _preadv2(fd, iov, 1, offset, _NOWAIT)
    if got >= 0:
        return got
    return -2 if _get_errno() in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS) else -1
