"""Fixed-layout binary records, declared once by field name.

A record is a frozen dataclass whose fields, in order, match a :class:`struct.Struct` kept on the
class as ``LAYOUT``. :meth:`Record.parse` checks that the bytes hold the whole record before
unpacking it, so a short or truncated file gives a :class:`~obd.errors.TruncatedError` naming the
record and offset instead of a bare :class:`struct.error`; each record's own ``parse`` then checks
the fields it relies on and raises :class:`~obd.errors.FormatError` naming the bad one.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, Self

from obd.errors import TruncatedError


class Record:
    """Base of the records: ``LAYOUT`` holds the fields in dataclass field order."""

    LAYOUT: ClassVar[struct.Struct]
    #: How errors name the record (``elf.header``, ``bzimage.setup_header``...).
    NAME: ClassVar[str]

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0, *, path: Any = None) -> Self:
        """The record at ``offset`` of ``data``; TruncatedError when ``data`` ends before it does."""
        size = cls.LAYOUT.size
        if offset < 0 or offset + size > len(data):
            raise TruncatedError(
                f"the {size}-byte record at offset {offset} runs past the end ({len(data)} bytes)",
                path=path,
                field=cls.NAME,
                value=offset,
            )
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        return cls(**dict(zip(names, cls.LAYOUT.unpack_from(data, offset), strict=True)))
