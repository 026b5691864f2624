"""LSMT on-disk structures, declared once: the header/trailer record and the 16-byte mapping.

Layout facts (docs/formats.md §1): every LSMT file starts with a 4096-byte record whose first 390 bytes
are :data:`HT_STRUCT`; sealed blobs end with a second such record (the trailer). Index entries are
16 bytes, read as two little-endian uint64s ``lo`` and ``hi``::

    offset  = lo & (2**50 - 1)      logical start, sectors
    length  = lo >> 50              14 bits, sectors
    moffset = hi & (2**55 - 1)      start in the backing file, sectors
    zeroed  = (hi >> 55) & 1        a discard: reads as zeros, hides lower layers
    tag     = hi >> 56              which backing file (meaningful only in memory and for warp layers)

Mappings are decoded in bulk into :class:`numpy.ndarray` columns, never one ``struct`` call per
entry. :class:`SealedLayout` is a sealed blob's header and trailer, with the index location
checked against the file size before anything is read from it.
"""

from __future__ import annotations

import struct
import uuid as _uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from obd.errors import FormatError, TruncatedError
from obd.io.source import Source

SECTOR = 512
HT_SPACE = 4096
HT_SIZE = 390
TAG_SIZE = 256
MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657e63d29444084ca2d2c8ec4fcfae8a")
VERSION = 1
SUB_VERSION = 1

FLAG_HEADER = 1 << 0
FLAG_DATA = 1 << 1
FLAG_SEALED = 1 << 2
FLAG_SPARSE = 1 << 4

#: Flag values as overlaybd writes them (docs/formats.md §1.4).
FLAGS_RW_DATA = FLAG_HEADER | FLAG_DATA
FLAGS_RW_INDEX = FLAG_HEADER
FLAGS_SEALED_HEADER = FLAG_HEADER | FLAG_DATA | FLAG_SEALED
FLAGS_SEALED_TRAILER = FLAG_DATA | FLAG_SEALED

OFFSET_BITS = 50
MAX_OFFSET = (1 << OFFSET_BITS) - 1  # also INVALID_OFFSET, the padding marker
INVALID_OFFSET = MAX_OFFSET
MAX_LENGTH = (1 << 14) - 1  # 16383 sectors
MAX_MOFFSET = (1 << 55) - 1
MAX_STACK_LAYERS = 255
MAX_RO_INDEX_SIZE = 1_000_000
MAX_RW_INDEX_SIZE = 128_000_000
MAX_IO_SIZE = 4 << 20
#: Commit copies data in chunks of this many sectors, one index entry each before compaction.
COMMIT_CHUNK_SECTORS = 64
#: Sealed indexes from ``compact()`` are padded to a multiple of this many entries.
INDEX_PAD_ENTRIES = HT_SPACE // 16
#: ``close_seal`` pads its index to a multiple of this many entries.
SEAL_PAD_ENTRIES = SECTOR // 16

NULL_UUID = "00000000-0000-0000-0000-000000000000"

#: The header/trailer record, field by field (docs/formats.md §1.2): packed, little-endian, 390 bytes.
#: :class:`HeaderTrailer` has one attribute per field, under the same name.
HT_FIELDS: tuple[tuple[str, str], ...] = (
    ("magic0", "8s"),
    ("magic1", "16s"),
    ("size", "I"),
    ("flags", "I"),
    ("index_offset", "Q"),  # bytes
    ("index_size", "Q"),  # entries (sealed: including padding)
    ("virtual_size", "Q"),  # bytes
    ("uuid", "37s"),  # text UUID + NUL
    ("parent_uuid", "37s"),
    ("reserved", "H"),
    ("version", "B"),
    ("sub_version", "B"),
    ("user_tag", "256s"),
)
HT_STRUCT = struct.Struct("<" + "".join(code for _, code in HT_FIELDS))
assert HT_STRUCT.size == HT_SIZE
_HT_NAMES = tuple(name for name, _ in HT_FIELDS)
#: Bytes of one index entry (a SegmentMapping).
ENTRY_SIZE = 16

#: Bytes of one INVALID (padding) entry: offset = 2**50-1, everything else 0.
INVALID_ENTRY = struct.pack("<QQ", INVALID_OFFSET, 0)


def format_uuid(value: str | bytes | _uuid.UUID | None) -> str:
    """Return overlaybd's on-disk text form of a UUID: 36 upper-case characters; None → the null UUID."""
    if value is None or value == "":
        return NULL_UUID
    if isinstance(value, bytes):
        value = _uuid.UUID(bytes=value)
    elif isinstance(value, str):
        value = parse_uuid(value)
    return str(value).upper()


def parse_uuid(text: str) -> _uuid.UUID:
    """Parse a UUID the way overlaybd does: exactly 36 characters with dashes at 8, 13, 18 and 23."""
    if len(text) != 36 or any(text[i] != "-" for i in (8, 13, 18, 23)):
        raise ValueError(f"not a UUID: {text!r}")
    return _uuid.UUID(text)


def is_valid_uuid(text: str) -> bool:
    try:
        parse_uuid(text)
    except ValueError:
        return False
    return True


def _text_field(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True)
class HeaderTrailer:
    """One LSMT header or trailer record (the first 390 bytes of a 4096-byte block)."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = NULL_UUID
    parent_uuid: str = NULL_UUID
    user_tag: bytes = b""
    version: int = VERSION
    sub_version: int = SUB_VERSION
    reserved: int = 0
    size: int = HT_SIZE
    magic0: bytes = field(default=MAGIC0, repr=False)
    magic1: bytes = field(default=MAGIC1, repr=False)

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    def flag_names(self) -> list[str]:
        """The set flag bits by name, for humans."""
        names = ["header" if self.is_header else "trailer", "data" if self.is_data else "index"]
        if self.is_sealed:
            names.append("sealed")
        if self.is_sparse:
            names.append("sparse")
        unknown = self.flags & ~(FLAG_HEADER | FLAG_DATA | FLAG_SEALED | FLAG_SPARSE)
        if unknown:
            names.append(f"unknown:0x{unknown:x}")
        return names

    @property
    def tag_text(self) -> str:
        return self.user_tag.rstrip(b"\0").decode("utf-8", "replace")

    @classmethod
    def parse(cls, raw: bytes, *, path: object = None, what: str = "header") -> HeaderTrailer:
        """Decode a record, checking both magics; the caller checks the flags it needs."""
        if len(raw) < HT_SIZE:
            raise FormatError(f"record is {len(raw)} bytes, needs {HT_SIZE}", path=path, field=what)
        f = dict(zip(_HT_NAMES, HT_STRUCT.unpack_from(raw), strict=True))
        if f["magic0"] != MAGIC0:
            raise FormatError(
                "not an LSMT file (bad magic0)", path=path, field=f"{what}.magic0", value=f["magic0"]
            )
        if f["magic1"] != MAGIC1:
            raise FormatError(
                "not an LSMT file (bad magic1)", path=path, field=f"{what}.magic1", value=f["magic1"]
            )
        f["uuid"] = _text_field(f["uuid"])
        f["parent_uuid"] = _text_field(f["parent_uuid"])
        f["user_tag"] = f["user_tag"].rstrip(b"\0")
        return cls(**f)

    def pack(self) -> bytes:
        """Encode as a full 4096-byte block (record + zero padding)."""
        if len(self.user_tag) > TAG_SIZE:
            raise ValueError(f"user tag is {len(self.user_tag)} bytes, at most {TAG_SIZE} allowed")
        f = {name: getattr(self, name) for name in _HT_NAMES}
        f["uuid"] = self.uuid.encode("ascii")
        f["parent_uuid"] = self.parent_uuid.encode("ascii")
        return HT_STRUCT.pack(*f.values()) + bytes(HT_SPACE - HT_SIZE)

    def with_(self, **changes: Any) -> HeaderTrailer:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return {
            "flags": self.flags,
            "flag_names": self.flag_names(),
            "index_offset": self.index_offset,
            "index_size": self.index_size,
            "virtual_size": self.virtual_size,
            "uuid": self.uuid,
            "parent_uuid": self.parent_uuid,
            "user_tag": self.tag_text,
            "version": self.version,
            "sub_version": self.sub_version,
            "size": self.size,
        }


# --- sealed blobs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedLayout:
    """Where the parts of a sealed blob lie, every trailer field checked against the file size.

    ``[header 4096][data …][index: index_slots × 16][trailer 4096]`` (docs/formats.md §1.6). overlaybd
    trusts only the header's magic and type bits; every other field comes from the trailer. Close-
    sealed RW data files keep their unsealed 0x03/0x13 header and are accepted too.
    """

    name: str
    file_size: int
    header: HeaderTrailer
    trailer: HeaderTrailer

    @property
    def trailer_offset(self) -> int:
        return self.file_size - HT_SPACE

    @property
    def index_offset(self) -> int:
        """Byte offset of the index, which is also the end of the data area."""
        return self.trailer.index_offset

    @property
    def index_slots(self) -> int:
        """Index entries on disk, padding included."""
        return self.trailer.index_size

    @property
    def data_sectors(self) -> tuple[int, int]:
        """The data area ``[begin, end)`` in sectors: where data mappings may point."""
        return HT_SPACE // SECTOR, self.index_offset // SECTOR

    @classmethod
    def read(cls, source: Source, name: str | None = None) -> SealedLayout:
        """Read and check the header and trailer of ``source``; nothing past them is read."""
        name = name or source.name
        size = source.size
        if size < HT_SPACE:
            raise TruncatedError(
                f"file is {size} bytes, shorter than the {HT_SPACE}-byte LSMT header", path=name, field="size"
            )
        header = HeaderTrailer.parse(source.read_exact(0, HT_SPACE, "header"), path=name, what="header")
        if not header.is_header:
            raise FormatError(
                "record at offset 0 is not a header", path=name, field="header.flags", value=header.flags
            )
        if not header.is_data:
            raise FormatError(
                "not an LSMT data file (an RW index file?)",
                path=name,
                field="header.flags",
                value=header.flags,
            )
        trailer_offset = size - HT_SPACE
        raw_trailer = source.read_exact(trailer_offset, HT_SPACE, "trailer") if size >= 2 * HT_SPACE else b""
        if raw_trailer[:8] != MAGIC0 and not header.is_sealed:
            raise FormatError(
                "an RW data file that was never committed or sealed (no trailer); commit it with "
                "`obd commit`, or stack it as an upper layer",
                path=name,
                field="trailer",
            )
        if size < 2 * HT_SPACE:
            raise TruncatedError(
                f"file is {size} bytes; a sealed LSMT layer needs at least {2 * HT_SPACE}",
                path=name,
                field="size",
            )
        t = HeaderTrailer.parse(raw_trailer, path=name, what="trailer")
        if t.is_header or not t.is_data or not t.is_sealed:
            raise FormatError(
                "the last 4096 bytes are not a sealed data trailer (an RW data file never committed?)",
                path=name,
                field="trailer.flags",
                value=t.flags,
            )
        if t.virtual_size > MAX_OFFSET * SECTOR:
            raise FormatError(
                f"larger than the {MAX_OFFSET * SECTOR} bytes an LSMT index can address",
                path=name,
                field="trailer.virtual_size",
                value=t.virtual_size,
            )
        if t.index_size > MAX_RO_INDEX_SIZE:
            raise FormatError(
                f"more than the {MAX_RO_INDEX_SIZE} entries a sealed layer may hold",
                path=name,
                field="trailer.index_size",
                value=t.index_size,
            )
        if t.index_offset < HT_SPACE or t.index_offset % SECTOR:
            raise FormatError(
                "index must start at or after byte 4096, on a 512-byte boundary",
                path=name,
                field="trailer.index_offset",
                value=t.index_offset,
            )
        if t.index_offset > trailer_offset or t.index_size * ENTRY_SIZE > trailer_offset - t.index_offset:
            raise FormatError(
                f"index of {t.index_size} entries at {t.index_offset} does not fit before the trailer "
                f"at {trailer_offset}",
                path=name,
                field="trailer.index_offset",
                value=t.index_offset,
            )
        return cls(name, size, header, t)

    def read_entries(self, source: Source) -> MappingColumns:
        """Every on-disk index entry, padding included, decoded in file order."""
        return decode_mappings(source.read_exact(self.index_offset, self.index_slots * ENTRY_SIZE, "index"))


# --- mappings ------------------------------------------------------------------------------------

_LO_OFFSET_MASK = np.uint64(MAX_OFFSET)
_HI_MOFFSET_MASK = np.uint64(MAX_MOFFSET)


@dataclass
class MappingColumns:
    """Decoded index entries as parallel int64 columns (sectors), in file order."""

    offset: np.ndarray
    length: np.ndarray
    moffset: np.ndarray
    zeroed: np.ndarray  # bool
    tag: np.ndarray  # int64 (on-disk values are 0..255)

    def __len__(self) -> int:
        return len(self.offset)

    def take(self, keep: np.ndarray) -> MappingColumns:
        return MappingColumns(
            self.offset[keep], self.length[keep], self.moffset[keep], self.zeroed[keep], self.tag[keep]
        )


def decode_mappings(raw: bytes | memoryview) -> MappingColumns:
    """Decode ``len(raw) // 16`` entries (a trailing partial entry is ignored)."""
    n = len(raw) // 16
    words = np.frombuffer(raw, dtype="<u8", count=2 * n).reshape(n, 2)
    lo = words[:, 0]
    hi = words[:, 1]
    return MappingColumns(
        offset=(lo & _LO_OFFSET_MASK).astype(np.int64),
        length=(lo >> np.uint64(OFFSET_BITS)).astype(np.int64),
        moffset=(hi & _HI_MOFFSET_MASK).astype(np.int64),
        zeroed=((hi >> np.uint64(55)) & np.uint64(1)).astype(bool),
        tag=(hi >> np.uint64(56)).astype(np.int64),
    )


def encode_mappings(cols: MappingColumns) -> bytes:
    """Encode columns as 16-byte entries (the inverse of :func:`decode_mappings`)."""
    n = len(cols)
    words = np.empty((n, 2), dtype="<u8")
    words[:, 0] = cols.offset.astype(np.uint64) | (cols.length.astype(np.uint64) << np.uint64(OFFSET_BITS))
    words[:, 1] = (
        cols.moffset.astype(np.uint64)
        | (cols.zeroed.astype(np.uint64) << np.uint64(55))
        | (cols.tag.astype(np.uint64) << np.uint64(56))
    )
    return words.tobytes()


def encode_mapping(offset: int, length: int, moffset: int, zeroed: bool = False, tag: int = 0) -> bytes:
    """Encode one entry (used for RW index records, one per write)."""
    return struct.pack("<QQ", offset | (length << OFFSET_BITS), moffset | (int(zeroed) << 55) | (tag << 56))
