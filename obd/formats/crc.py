"""CRC32C the way overlaybd computes it: Castagnoli, reflected, **no** pre- or post-inversion.

overlaybd's ``crc32c_extend(data, seed)`` starts the register at ``seed`` and returns it unchanged,
so it differs from the standard CRC-32C that libraries expose. With a library that continues a
standard CRC from a previous value ``prev``, ``raw(data, seed) = std(data, prev=seed ^ ~0) ^ ~0``.
"""

from __future__ import annotations

import crc32c as _crc32c

#: Seed of the per-block ZFile checksum (``crc32c_salt`` upstream).
ZFILE_BLOCK_SEED = 100007

_MASK = 0xFFFFFFFF
_std = _crc32c.crc32c


def crc32c_raw(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Raw CRC32C of ``data`` starting from ``seed`` (see module docstring)."""
    return _std(data, value=seed ^ _MASK) ^ _MASK
