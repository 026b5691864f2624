"""Tar header fields and PAX records, parsed and validated before use (for :mod:`obd.convert.layertar`)."""

from __future__ import annotations

from obd.errors import FormatError
from obd.formats.tar_envelope import header_checksums, parse_number

#: A tar block (header or data padding unit).
BLOCK = 512

# Entry kinds.
FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
CHR = "chr"
BLK = "blk"
FIFO = "fifo"


class HostileTarError(FormatError):
    """A tar entry tries to leave the image root, or declares sizes no real layer has."""


def show(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def cstr(raw: bytes) -> bytes:
    return raw.split(b"\x00", 1)[0]


def header_number(raw: bytes, *, path: str, where: str) -> int:
    """An octal header number, or GNU base-256 (:func:`obd.formats.tar_envelope.parse_number`)."""
    return parse_number(raw, path=path, field_name=where)


def checksum_ok(block: bytes) -> bool:
    """Whether header ``block`` stores its own (unsigned or signed) checksum."""
    text = cstr(block[148:156]).strip(b" ")
    if not text or text.strip(b"01234567"):
        return False
    return int(text, 8) in header_checksums(block)


def parse_pax(data: bytes, *, path: str, where: str) -> dict[bytes, bytes]:
    """PAX records ``"<len> <key>=<value>\\n"`` that fill ``data`` exactly; later keys win."""
    return dict(parse_pax_list(data, path=path, where=where))


def parse_pax_list(data: bytes, *, path: str, where: str) -> list[tuple[bytes, bytes]]:
    """PAX records in archive order, repeated keys kept (GNU sparse 0.0 repeats its map keys)."""
    records: list[tuple[bytes, bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0:  # some writers pad the record block with NULs
            if data[pos:].strip(b"\x00"):
                raise FormatError("garbage after the PAX records", path=path, field=where)
            break
        space = data.find(b" ", pos, min(end, pos + 21))
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise FormatError("PAX record lacks its decimal length", path=path, field=where)
        length = int(digits)
        if length < len(digits) + 4 or pos + length > end:
            raise FormatError("PAX record length runs past the header", path=path, field=where, value=length)
        record = data[space + 1 : pos + length]
        if not record.endswith(b"\n"):
            raise FormatError("PAX record does not end with a newline", path=path, field=where)
        key, eq, value = record[:-1].partition(b"=")
        if not eq or not key:
            raise FormatError("PAX record is not key=value", path=path, field=where, value=show(record[:40]))
        records.append((key, value))
        pos += length
    return records


def pax_int(value: bytes, *, path: str, where: str, allow_fraction: bool = False) -> int:
    text = value.strip()
    if allow_fraction and b"." in text:
        text = text.split(b".", 1)[0] or b"0"
    sign = 1
    if text.startswith(b"-"):
        sign, text = -1, text[1:]
    if not text.isdigit() or len(text) > 20:
        raise FormatError("PAX value is not a decimal number", path=path, field=where, value=show(value))
    return sign * int(text)
