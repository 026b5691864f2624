"""obd's CRC32C: the library function loaded without the package's ``__init__``, and overlaybd's raw form."""

from __future__ import annotations

import os

import crc32c

from obd.formats.crc import crc32c_raw, crc32c_std


def test_the_loaded_function_is_the_librarys():
    data = os.urandom(10_000)
    for value in (0, 1, 0xFFFFFFFF, 123456789):
        assert crc32c_std(data, value=value) == crc32c.crc32c(data, value=value)
    assert crc32c_std(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_raw_is_the_standard_crc_without_inversions():
    data = b"overlaybd"
    assert crc32c_raw(data, 7) == crc32c.crc32c(data, value=7 ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    # continuing a raw CRC equals computing it over the whole
    assert crc32c_raw(data[4:], crc32c_raw(data[:4], 5)) == crc32c_raw(data, 5)
