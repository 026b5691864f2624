"""CRC32C the way overlaybd computes it: Castagnoli, reflected, **no** pre- or post-inversion.

overlaybd's ``crc32c_extend(data, seed)`` starts the register at ``seed`` and returns it unchanged,
so it differs from the standard CRC-32C that libraries expose. With a library that continues a
standard CRC from a previous value ``prev``, ``raw(data, seed) = std(data, prev=seed ^ ~0) ^ ~0``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from collections.abc import Callable


def _library_crc32c() -> Callable[..., int]:
    """The ``crc32c`` package's C function, loaded from its extension module without running the
    package's ``__init__``, which asks ``importlib.metadata`` for its version: 30 ms (email, zipfile,
    csv...) of every nbdkit start, a tenth of it. Any surprise falls back to the plain import."""
    try:
        spec = importlib.util.find_spec("crc32c")
        for where in (spec.submodule_search_locations or []) if spec else []:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(where, "_crc32c" + suffix)
                ext = importlib.util.spec_from_file_location("crc32c._crc32c", path)
                if ext is not None and ext.loader is not None and os.path.exists(path):
                    module = importlib.util.module_from_spec(ext)
                    ext.loader.exec_module(module)
                    fn: Callable[..., int] = module.crc32c
                    return fn
    except (ImportError, OSError, AttributeError):
        pass
    import crc32c

    return crc32c.crc32c


#: Seed of the per-block ZFile checksum (``crc32c_salt`` upstream).
ZFILE_BLOCK_SEED = 100007

_MASK = 0xFFFFFFFF
#: The library's standard CRC-32C, ``crc32c(data, value=prev)``.
crc32c_std = _library_crc32c()
_std = crc32c_std


def crc32c_raw(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Raw CRC32C of ``data`` starting from ``seed`` (see module docstring)."""
    return _std(data, value=seed ^ _MASK) ^ _MASK
