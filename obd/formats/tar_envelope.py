"""overlaybd's tar envelope: one regular-file tar entry wrapped around a layer blob (docs/formats.md §3).

Registry layers made with ``overlaybd-commit -t`` / ``overlaybd-zfile -t`` (and so by the
convertor) are a ZFile inside a minimal tar archive::

    [0, 512)      PAX header 'x', name "overlaybd.pax", size = length of the PAX data
    [512, 1024)   PAX data "<L> size=<N>\\n", zero padded
    [1024, 1536)  file header '0', name "overlaybd.commit", size field 0 (the real size is in PAX)
    [1536, ...)   the payload (N bytes)
    zeros to the next multiple of 512, then two zero blocks

Other producers differ: Go ``archive/tar`` wraps the builder's base layer as plain USTAR (no PAX,
payload at 512) and ``ctr obdconv`` leaves 1024 extra zero bytes at the end.

The reader here follows overlaybd's (``is_tar_file`` + ``TarFile::read_header``) but checks every
header it walks, and computes the payload offset from the header chain; overlaybd itself hard-codes
512, or 1536 once any PAX header was seen, so a chain where the two disagree is one overlaybd would
misread and is rejected unless ``strict=False``.

The writer reproduces overlaybd's output byte for byte: the same placeholder prefix while the
payload streams in (so a crashed writer leaves a file that is not recognised as tar), and the same
field formatting (``snprintf("%*lo ")`` quirks included) when it is finalised.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from obd.errors import ChecksumError, FormatError, ObdError, TruncatedError
from obd.io.source import FileSource, Source, WindowSource

BLOCK = 512
#: Size of the prefix overlaybd writes: PAX header, one block of PAX data, file header.
PREFIX_SIZE = 3 * BLOCK
#: Base offsets the C++ reader hard-codes (``TarFile::read_header``).
BASE_PLAIN = BLOCK
BASE_PAX = 3 * BLOCK
#: Most headers (extension headers plus the file header) a chain may hold before we give up.
MAX_CHAIN = 8
#: Largest PAX / GNU long-name payload accepted (overlaybd's is 15-30 bytes).
MAX_EXTENSION_DATA = 1 << 20

PAX_NAME = b"overlaybd.pax"
COMMIT_NAME = b"overlaybd.commit"
PLACEHOLDER_NAME = b"overlaybd.new"
DEFAULT_MODE = 0o100644

#: The 512-byte POSIX (ustar) header: (field, width) in order; every field is raw bytes.
LAYOUT: tuple[tuple[str, int], ...] = (
    ("name", 100),
    ("mode", 8),
    ("uid", 8),
    ("gid", 8),
    ("size", 12),
    ("mtime", 12),
    ("chksum", 8),
    ("typeflag", 1),
    ("linkname", 100),
    ("magic", 6),
    ("version", 2),
    ("uname", 32),
    ("gname", 32),
    ("devmajor", 8),
    ("devminor", 8),
    ("prefix", 155),
    ("padding", 12),
)
HEADER_STRUCT = struct.Struct("".join(f"{width}s" for _, width in LAYOUT))
assert HEADER_STRUCT.size == BLOCK
_FIELDS = tuple(name for name, _ in LAYOUT)
#: Byte offset of each field inside the header.
OFFSETS: dict[str, int] = {}
for _i, (_name, _) in enumerate(LAYOUT):
    OFFSETS[_name] = sum(width for _, width in LAYOUT[:_i])
del _i, _name
CHKSUM_OFFSET = OFFSETS["chksum"]
MAGIC_OFFSET = OFFSETS["magic"]
VERSION_OFFSET = OFFSETS["version"]

USTAR_MAGIC = b"ustar"  # overlaybd compares 5 bytes (TMAGLEN - 1)
USTAR_VERSION = b"00"
PAX_TYPES = (b"x", b"g")
GNU_LONG_TYPES = (b"L", b"K")
#: Type flags of a regular file: '0', the old-style NUL, and contiguous '7'.
REGULAR_TYPES = (b"0", b"\x00", b"7")

_HIGH_BYTES = bytes(range(128, 256))
_ZERO_BLOCK = bytes(BLOCK)


# -- field helpers ----------------------------------------------------------------------------------


def header_checksums(block: bytes) -> tuple[int, int]:
    """Unsigned and signed tar checksums of header ``block``, its 8 chksum bytes counted as spaces
    (a valid header stores one of the two: old writers summed signed chars)."""
    blanked = block[:CHKSUM_OFFSET] + b" " * 8 + block[CHKSUM_OFFSET + 8 :]
    unsigned = sum(blanked)
    high = len(blanked) - len(blanked.translate(None, _HIGH_BYTES))
    return unsigned, unsigned - 256 * high


def parse_number(raw: bytes, *, path: str, field_name: str) -> int:
    """A tar header number: optional spaces, octal digits, then NULs/spaces; empty means 0.

    A leading byte with the top bit set is GNU's base-256 form (big-endian, the first byte's other
    seven bits included), which writers use for sizes that do not fit in 11 octal digits; a
    negative one (0xFF lead) is refused. Shared by the envelope reader and the layer-tar parser
    (:mod:`obd.convert.tarfields`).
    """
    if raw and raw[0] & 0x80:
        if raw[0] == 0xFF:
            raise FormatError("negative base-256 number", path=path, field=field_name, value=raw)
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise FormatError("not an octal number", path=path, field=field_name, value=raw)
    return int(text, 8)


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\x00", 1)[0]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_pax_records(data: bytes, *, path: str, field_name: str = "pax") -> dict[str, str]:
    """Parse PAX extended-header data: records ``"<len> <key>=<value>\\n"`` filling ``data`` exactly.

    ``len`` is decimal and counts the whole record. Later records override earlier ones, as in
    overlaybd (a ``std::map`` keyed by name).
    """
    records: dict[str, str] = {}
    pos = 0
    end = len(data)
    index = 0
    while pos < end:
        where = f"{field_name}.record[{index}]"
        space = data.find(b" ", pos, min(end, pos + 21))
        digits = data[pos:space] if space > pos else b""
        if not digits or not digits.isdigit():
            raise FormatError("record does not start with a decimal length", path=path, field=where)
        length = int(digits)
        if length < len(digits) + 4 or pos + length > end:
            raise FormatError(
                f"record length does not fit the {end - pos} bytes left", path=path, field=where, value=length
            )
        record = data[space + 1 : pos + length]
        if not record.endswith(b"\n"):
            raise FormatError("record does not end with a newline", path=path, field=where)
        key, eq, value = record[:-1].partition(b"=")
        if not eq or not key:
            raise FormatError("record is not key=value", path=path, field=where, value=record[:32])
        records[_decode(key)] = _decode(value)
        pos += length
        index += 1
    return records


def format_pax_record(key: str, value: str) -> bytes:
    """One PAX record with its self-counting length, computed exactly as ``TarFile::format_pax_record``."""
    size = len(key) + len(value) + 3
    size += len(str(size))
    record = f"{size} {key}={value}\n"
    if len(record) != size:
        size = len(record)
        record = f"{size} {key}={value}\n"
    return record.encode()


def _int_to_oct(value: int, width: int) -> bytes:
    """``snprintf(buf, width, "%*lo ", width - 2, value)``: octal, space, NUL (truncated like C)."""
    text = f"{value:{width - 2}o} ".encode()[: width - 1]
    return text + b"\x00" * (width - len(text))


def _int_to_oct_nonull(value: int, width: int) -> bytes:
    """overlaybd's ``int_to_oct_nonull``: ``"%*lo"`` in ``width - 1`` columns, last byte a space."""
    text = f"{value:{width - 1}o}".encode()[: width - 1]
    return text + b"\x00" * (width - 1 - len(text)) + b" "


def _put(block: bytearray, name: str, value: bytes) -> None:
    start = OFFSETS[name]
    block[start : start + len(value)] = value


def _seal(block: bytearray) -> bytes:
    """Write the checksum the way libtar's ``int_to_oct(crc_calc(), chksum, 8)`` does."""
    unsigned, _ = header_checksums(bytes(block))
    _put(block, "chksum", _int_to_oct(unsigned, 8))
    return bytes(block)


def _host_names() -> tuple[bytes, bytes]:
    """Names of uid 0 and gid 0 on this host ("root" where the lookup fails)."""
    try:
        uname = pwd.getpwuid(0).pw_name
    except (KeyError, OSError):
        uname = "root"
    try:
        gname = grp.getgrgid(0).gr_name
    except (KeyError, OSError):
        gname = "root"
    return uname.encode(), gname.encode()


def envelope_prefix(
    payload_size: int, *, mode: int = DEFAULT_MODE, uname: str | None = None, gname: str | None = None
) -> bytes:
    """The 1536 bytes overlaybd writes in front of a ``payload_size``-byte payload (§3).

    ``uname``/``gname`` default to this host's names for uid 0 and gid 0, like the C++ writer.
    """
    if payload_size < 0:
        raise ValueError(f"payload_size={payload_size} is negative")
    if not 0 <= mode <= 0o777777:
        raise ValueError(f"mode={mode:#o} does not fit the 6-digit mode field")
    host_u, host_g = _host_names()
    u = host_u if uname is None else uname.encode()
    g = host_g if gname is None else gname.encode()

    record = format_pax_record("size", str(payload_size))
    if len(record) > BLOCK:  # pragma: no cover - a 490-digit size
        raise ValueError("PAX record does not fit one block")
    pax = bytearray(BLOCK)
    _put(pax, "name", PAX_NAME)
    _put(pax, "size", _int_to_oct_nonull(len(record), 12))
    _put(pax, "typeflag", b"x")
    _put(pax, "magic", b"ustar\x00")
    _put(pax, "version", USTAR_VERSION)

    head = bytearray(BLOCK)
    _put(head, "name", COMMIT_NAME)
    _put(head, "mode", _int_to_oct(mode, 8))
    _put(head, "uid", _int_to_oct(0, 8))
    _put(head, "gid", _int_to_oct(0, 8))
    _put(head, "size", _int_to_oct_nonull(0, 12))
    _put(head, "mtime", _int_to_oct_nonull(0, 12))
    _put(head, "typeflag", b"0")
    _put(head, "magic", b"ustar\x00")
    _put(head, "version", USTAR_VERSION)
    _put(head, "uname", u[:31])
    _put(head, "gname", g[:31])
    return _seal(pax) + record.ljust(BLOCK, b"\x00") + _seal(head)


def placeholder_prefix() -> bytes:
    """The prefix overlaybd writes while the payload is still streaming (``mark_new_tar``).

    Its file header has magic ``xxtar``/version ``xx`` and no checksums, so a file left in this
    state by a crash is not taken for a tar envelope.
    """
    record = format_pax_record("size", "0")
    pax = bytearray(BLOCK)
    _put(pax, "name", PAX_NAME)
    _put(pax, "size", _int_to_oct_nonull(len(record), 12))
    _put(pax, "typeflag", b"x")
    head = bytearray(BLOCK)
    _put(head, "name", PLACEHOLDER_NAME)
    _put(head, "version", b"xx")
    _put(head, "magic", b"xxtar\x00")
    _put(head, "size", _int_to_oct_nonull(0, 12))
    return bytes(pax) + record.ljust(BLOCK, b"\x00") + bytes(head)


def envelope_footer(payload_size: int, *, payload_offset: int = PREFIX_SIZE) -> bytes:
    """Zero padding to the next 512-byte boundary plus the two zero end-of-archive blocks."""
    end = payload_offset + payload_size
    return bytes(-end % BLOCK + 2 * BLOCK)


# -- reader -----------------------------------------------------------------------------------------


def is_tar_envelope(source: Source) -> bool:
    """overlaybd's ``is_tar_file``: 512 readable bytes, ``ustar`` at 257, ``00`` at 263, checksum right.

    The checksum may be the unsigned or the signed byte sum. GNU's ``ustar `` + `` \\0`` is not
    accepted (its version bytes differ). Never raises for short or garbage input.
    """
    if source.size < BLOCK:
        return False
    block = source.pread(0, BLOCK)
    if len(block) != BLOCK:
        return False
    return _ustar_ok(block) and _checksum_ok(block)


def _ustar_ok(block: bytes) -> bool:
    return (
        block[MAGIC_OFFSET : MAGIC_OFFSET + 5] == USTAR_MAGIC
        and block[VERSION_OFFSET : VERSION_OFFSET + 2] == USTAR_VERSION
    )


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = parse_number(block[CHKSUM_OFFSET : CHKSUM_OFFSET + 8], path="", field_name="chksum")
    except FormatError:
        return False
    return stored in header_checksums(block)


@dataclass(frozen=True)
class TarHeader:
    """One parsed 512-byte header of the chain, with its position in the file."""

    offset: int
    typeflag: bytes
    name: bytes
    prefix: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    uname: bytes
    gname: bytes
    signed_checksum: bool


@dataclass(frozen=True)
class TarEnvelope:
    """A validated tar envelope: the parsed header chain and a window onto the payload."""

    source: Source
    headers: tuple[TarHeader, ...]
    pax_records: Mapping[str, str]
    global_records: Mapping[str, str]
    gnu_longname: bytes | None
    gnu_longlink: bytes | None
    payload_offset: int
    payload_size: int
    #: Where the C++ reader starts the payload: 1536 if any PAX header was seen, else 512.
    overlaybd_offset: int
    payload: WindowSource = field(repr=False)

    @property
    def header(self) -> TarHeader:
        """The entry's own (last) header."""
        return self.headers[-1]

    @property
    def name(self) -> str:
        """Entry name: PAX ``path``, else the GNU long name, else ustar ``prefix/name``."""
        if "path" in self.pax_records:
            return self.pax_records["path"]
        if self.gnu_longname is not None:
            return _decode(self.gnu_longname)
        head = self.header
        if head.prefix:
            return _decode(head.prefix + b"/" + head.name)
        return _decode(head.name)

    @property
    def mode(self) -> int:
        return self.header.mode

    @property
    def has_pax(self) -> bool:
        return self.overlaybd_offset == BASE_PAX

    @property
    def end_offset(self) -> int:
        """First byte after the payload."""
        return self.payload_offset + self.payload_size

    @property
    def trailing_size(self) -> int:
        """Bytes after the payload (footer, padding, ``obdconv``'s extra zeros)."""
        return self.source.size - self.end_offset


def _parse_header(block: bytes, offset: int, *, path: str, where: str) -> TarHeader:
    if not _ustar_ok(block):
        raise FormatError(
            "not a ustar header (magic/version)",
            path=path,
            field=f"{where}.magic",
            value=block[MAGIC_OFFSET : MAGIC_OFFSET + 8],
        )
    raw = dict(zip(_FIELDS, HEADER_STRUCT.unpack(block), strict=True))
    stored = parse_number(raw["chksum"], path=path, field_name=f"{where}.chksum")
    unsigned, signed = header_checksums(block)
    if stored not in (unsigned, signed):
        raise ChecksumError(
            f"header checksum mismatch (computed {unsigned:o} unsigned, {signed:o} signed)",
            path=path,
            field=f"{where}.chksum",
            value=stored,
        )

    def num(name: str) -> int:
        return parse_number(raw[name], path=path, field_name=f"{where}.{name}")

    return TarHeader(
        offset=offset,
        typeflag=raw["typeflag"],
        name=_cstr(raw["name"]),
        prefix=_cstr(raw["prefix"]),
        mode=num("mode"),
        uid=num("uid"),
        gid=num("gid"),
        size=num("size"),
        mtime=num("mtime"),
        uname=_cstr(raw["uname"]),
        gname=_cstr(raw["gname"]),
        signed_checksum=stored != unsigned,
    )


def open_envelope(source: Source, *, strict: bool = True) -> TarEnvelope:
    """Parse and validate the tar envelope of ``source``; the payload is ``.payload``.

    Walks the header chain (PAX ``x``/``g``, GNU ``L``/``K``) up to the entry's own header,
    checking magic, checksum and numeric fields of each. The payload size is the PAX ``size``
    record when present and positive, else the header's size field. With ``strict`` (the default)
    the payload must start where overlaybd would look for it (see module docstring).

    Raises :class:`FormatError` (or a subclass) for anything that is not a well-formed envelope.
    """
    path = source.name
    if not is_tar_envelope(source):
        if source.size < BLOCK:
            raise TruncatedError(
                f"{source.size} bytes is less than one tar header", path=path, field="header[0]"
            )
        raise FormatError("not a tar envelope (magic, version or checksum)", path=path, field="header[0]")

    headers: list[TarHeader] = []
    pax: dict[str, str] = {}
    global_records: dict[str, str] = {}
    longname: bytes | None = None
    longlink: bytes | None = None
    pax_seen = False
    offset = 0
    for index in range(MAX_CHAIN):
        where = f"header[{index}]"
        block = source.read_exact(offset, BLOCK, where)
        if block == _ZERO_BLOCK:
            raise FormatError("end-of-archive block before the entry's header", path=path, field=where)
        head = _parse_header(block, offset, path=path, where=where)
        headers.append(head)
        data_offset = offset + BLOCK
        if head.typeflag not in PAX_TYPES and head.typeflag not in GNU_LONG_TYPES:
            break
        if head.size > MAX_EXTENSION_DATA:
            raise FormatError(
                f"extension data larger than {MAX_EXTENSION_DATA} bytes",
                path=path,
                field=f"{where}.size",
                value=head.size,
            )
        data = source.read_exact(data_offset, head.size, f"{where}.data")
        if head.typeflag == b"x":
            pax_seen = True
            pax.update(parse_pax_records(data, path=path, field_name=f"{where}.pax"))
        elif head.typeflag == b"g":
            pax_seen = True
            global_records.update(parse_pax_records(data, path=path, field_name=f"{where}.pax"))
        elif head.typeflag == b"L":
            longname = data.split(b"\x00", 1)[0]
        else:
            longlink = data.split(b"\x00", 1)[0]
        offset = data_offset + head.size + (-head.size % BLOCK)
    else:
        raise FormatError(
            f"more than {MAX_CHAIN} headers before the entry", path=path, field="header", value=MAX_CHAIN
        )

    entry = headers[-1]
    if entry.typeflag not in REGULAR_TYPES:
        raise FormatError(
            "the envelope's entry is not a regular file",
            path=path,
            field=f"header[{len(headers) - 1}].typeflag",
            value=entry.typeflag,
        )
    size = entry.size
    if "size" in pax:
        text = pax["size"]
        if not (text.isascii() and text.isdigit()) or len(text) > 20:
            raise FormatError("PAX size is not a decimal number", path=path, field="pax.size", value=text)
        if int(text) > 0:
            size = int(text)
    payload_offset = offset + BLOCK
    cxx_offset = BASE_PAX if pax_seen else BASE_PLAIN
    if strict and payload_offset != cxx_offset:
        raise FormatError(
            f"payload starts at {payload_offset} but overlaybd would read it from {cxx_offset}",
            path=path,
            field="payload_offset",
            value=payload_offset,
        )
    if payload_offset + size > source.size:
        raise TruncatedError(
            f"payload [{payload_offset}, {payload_offset + size}) runs past the end of the "
            f"{source.size}-byte file",
            path=path,
            field="payload_size",
            value=size,
        )
    return TarEnvelope(
        source=source,
        headers=tuple(headers),
        pax_records=pax,
        global_records=global_records,
        gnu_longname=longname,
        gnu_longlink=longlink,
        payload_offset=payload_offset,
        payload_size=size,
        overlaybd_offset=cxx_offset,
        payload=WindowSource(source, payload_offset, size, name=path),
    )


def unwrap(source: Source) -> Source:
    """The payload of ``source`` if it is a tar envelope, else ``source`` itself (``open_tar_file``)."""
    if is_tar_envelope(source):
        return open_envelope(source).payload
    return source


# -- writer -----------------------------------------------------------------------------------------


class TarEnvelopeWriter:
    """Stream a payload into overlaybd's tar envelope.

    The placeholder prefix is written at once; ``write``/``pwrite``/``seek`` address the payload
    (offset 0 = first payload byte); ``close()`` rewrites the 1536-byte prefix with the real size
    and appends the footer. If the ``with`` block raises, the envelope is **not** finalised: the
    placeholder stays, as it would after a crash of the C++ tool.

    ``target`` is a path (created or truncated, closed by ``close()``) or a seekable binary stream
    (the envelope starts at its current position; left open).
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | BinaryIO,
        *,
        mode: int = DEFAULT_MODE,
        uname: str | None = None,
        gname: str | None = None,
    ):
        if not 0 <= mode <= 0o777777:
            raise ValueError(f"mode={mode:#o} does not fit the 6-digit mode field")
        self.mode = mode
        self._names = (uname, gname)
        if isinstance(target, (str, os.PathLike)):
            self.name = os.fspath(target)
            try:
                self._stream: BinaryIO = open(target, "w+b")  # noqa: SIM115 - owned, closed in close()
            except OSError as e:
                raise ObdError(f"cannot create: {e.strerror}", path=self.name) from e
            self._owned = True
        else:
            if not target.seekable():
                raise ValueError("the target stream must be seekable")
            self.name = getattr(target, "name", "<stream>")
            self._stream = target
            self._owned = False
        self._base = self._stream.tell()
        self._stream.write(placeholder_prefix())
        self._pos = 0
        self._size = 0
        self._closed = False

    # file-like surface, payload-relative
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> int:
        """Payload bytes so far (the furthest byte written)."""
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise ValueError(f"negative position {pos}")
        self._pos = pos
        return pos

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self.pwrite(data, self._pos)
        self._pos += n
        return n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at payload offset ``offset`` without moving the stream position."""
        self._check_open()
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        n = memoryview(data).nbytes
        if n == 0:
            return 0
        self._stream.seek(self._base + PREFIX_SIZE + offset)
        self._stream.write(data)
        self._size = max(self._size, offset + n)
        return n

    def flush(self) -> None:
        self._check_open()
        self._stream.flush()

    def close(self) -> None:
        """Finalise: real prefix, zero padding, two zero blocks; closes the file if we opened it."""
        if self._closed:
            return
        try:
            uname, gname = self._names
            self._stream.seek(self._base)
            self._stream.write(envelope_prefix(self._size, mode=self.mode, uname=uname, gname=gname))
            self._stream.seek(self._base + PREFIX_SIZE + self._size)
            self._stream.write(envelope_footer(self._size))
            self._stream.flush()
        finally:
            self._finish()

    def abort(self) -> None:
        """Stop without finalising; the placeholder prefix is left in place."""
        if not self._closed:
            self._finish()

    def _finish(self) -> None:
        self._closed = True
        if self._owned:
            self._stream.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("write to a closed TarEnvelopeWriter")

    def __enter__(self) -> TarEnvelopeWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_COPY_CHUNK = 1 << 20


def _copy(
    src: Source, dst_write: Callable[[memoryview], object], start: int = 0, length: int | None = None
) -> None:
    length = src.size - start if length is None else length
    buf = bytearray(min(_COPY_CHUNK, max(length, 1)))
    view = memoryview(buf)
    pos = 0
    while pos < length:
        k = min(len(buf), length - pos)
        n = src.readinto(view[:k], start + pos)
        if n <= 0:
            raise TruncatedError(f"short read at offset {start + pos}", path=src.name, field="payload")
        dst_write(view[:n])
        pos += n


def wrap_file(
    src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str], *, mode: int = DEFAULT_MODE
) -> None:
    """Write ``dst_path`` = ``src_path`` inside overlaybd's tar envelope (as ``overlaybd-commit -t``)."""
    with FileSource(src_path) as src, TarEnvelopeWriter(dst_path, mode=mode) as out:
        _copy(src, out.write)


def unwrap_file(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]) -> None:
    """Write the payload of the tar envelope ``src_path`` to ``dst_path``."""
    with FileSource(src_path) as src:
        env = open_envelope(src)
        with open(dst_path, "wb") as out:
            _copy(env.payload, out.write)


__all__ = [
    "BASE_PAX",
    "BASE_PLAIN",
    "PREFIX_SIZE",
    "TarEnvelope",
    "TarEnvelopeWriter",
    "TarHeader",
    "envelope_footer",
    "envelope_prefix",
    "format_pax_record",
    "header_checksums",
    "is_tar_envelope",
    "open_envelope",
    "parse_number",
    "parse_pax_records",
    "placeholder_prefix",
    "unwrap",
    "unwrap_file",
    "wrap_file",
]
