"""The ZFile on-disk record: the 512-byte header / trailer, its flags, algorithm ids and limits.

Layout of a ZFile (docs/formats.md §2.1)::

    [header 512][block 0][crc0?][block 1][crc1?] … [block N−1][crcN−1?][index: N × uint32 LE][trailer 512]

Header and trailer share one record: 96 meaningful bytes (the struct below) padded with zeros to
512. Old writers (fixture F1, ``ext4_64``) left stack garbage in the high flag bits, in the padding
bytes 89..95 and in bytes 96..511, so only the low flag bits and the named fields are ever read.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

from obd.errors import FormatError, TruncatedError
from obd.formats.crc import crc32c_raw

#: ``"ZFile\0\1"`` plus a NUL.
MAGIC0 = b"ZFile\x00\x01\x00"
#: ``"tuji.yyf@Alibaba"``.
MAGIC1 = b"tuji.yyf@Alibaba"

#: On-disk size of a header or trailer record.
RECORD_SIZE = 512
#: ``sizeof(HeaderTrailer)``, stored in the record's ``size`` field.
STRUCT_SIZE = 96
#: Blocks start right after the header (``dict_size`` is always 0, see §2.11).
DATA_OFFSET = RECORD_SIZE
#: Bytes of the per-block CRC that follows each block when ``verify`` is 1.
BLOCK_CRC_SIZE = 4

#: Block sizes the tools accept: powers of two from 4 to 64 KiB.
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 65536
DEFAULT_BLOCK_SIZE = 4096
#: ``index_size`` ceiling of the C++ reader (``load_jump_table``).
MAX_INDEX_SIZE = 1_000_000_000

#: The header/trailer record, field by field (docs/formats.md §2.2): little-endian, no gaps, 96 bytes.
#: :class:`ZFileRecord` keeps the meaningful ones (``algo`` as ``algorithm``); the pads and
#: reserved words are written as 0 and never read (old writers left garbage in them).
RECORD_FIELDS: tuple[tuple[str, str], ...] = (
    ("magic0", "8s"),
    ("magic1", "16s"),
    ("size", "I"),
    ("digest", "I"),
    ("flags", "Q"),
    ("index_offset", "Q"),  # bytes
    ("index_size", "Q"),  # blocks, not bytes
    ("original_file_size", "Q"),
    ("index_crc", "I"),
    ("reserved_0", "I"),
    # CompressOptions
    ("block_size", "I"),
    ("algo", "B"),
    ("level", "B"),
    ("use_dict", "B"),
    ("pad", "B"),
    ("opt_reserved", "I"),
    ("dict_size", "I"),
    ("verify", "B"),
    ("pad7", "7s"),
)
_RECORD = struct.Struct("<" + "".join(code for _, code in RECORD_FIELDS))
assert _RECORD.size == STRUCT_SIZE
_NAMES = tuple(name for name, _ in RECORD_FIELDS)

#: Fields :class:`ZFileRecord` does not keep, with the value always written: the magics, and the
#: reserved and padding bytes (where old writers left garbage, so they are never read).
_CONSTANT_FIELDS: dict[str, int | bytes] = {
    "magic0": MAGIC0,
    "magic1": MAGIC1,
    "reserved_0": 0,
    "pad": 0,
    "opt_reserved": 0,
    "pad7": b"",
}
#: Fields whose :class:`ZFileRecord` attribute is named differently.
_ATTRIBUTE = {"algo": "algorithm"}

#: Byte offset of the ``digest`` field, zeroed while the digest is computed.
DIGEST_OFFSET = struct.calcsize("<" + "".join(code for _, code in RECORD_FIELDS[: _NAMES.index("digest")]))
assert DIGEST_OFFSET == 28


class Flag(enum.IntFlag):
    """Bits of the 64-bit ``flags`` field (§2.3). Only these low bits carry meaning."""

    HEADER = 1 << 0
    TYPE = 1 << 1
    SEALED = 1 << 2
    HEADER_OVERWRITE = 1 << 3
    DIGEST = 1 << 4
    INDEX_COMPRESSED = 1 << 5


#: Mask of the meaningful flag bits; the rest may be garbage in old blobs.
FLAG_MASK = 0x3F

#: Flag values written by current writers.
FLAGS_HEADER = Flag.HEADER | Flag.TYPE | Flag.DIGEST  # 0x13
FLAGS_TRAILER = Flag.TYPE | Flag.SEALED | Flag.DIGEST  # 0x16
FLAGS_HEADER_OVERWRITTEN = Flag.HEADER | Flag.TYPE | Flag.HEADER_OVERWRITE | Flag.DIGEST  # 0x1B


class Algorithm(enum.IntEnum):
    """``opt.algo`` values (§2.7)."""

    MINI_LZO = 0
    LZ4 = 1
    ZSTD = 2


ALGORITHM_NAMES = {Algorithm.MINI_LZO: "mini_lzo", Algorithm.LZ4: "lz4", Algorithm.ZSTD: "zstd"}


def algorithm_name(algo: int) -> str:
    """Readable name of an ``opt.algo`` value (``"algo#7"`` for unknown ones)."""
    try:
        return ALGORITHM_NAMES[Algorithm(algo)]
    except ValueError:
        return f"algo#{algo}"


def parse_algorithm(name: str | int | Algorithm) -> Algorithm:
    """Map ``"lz4"`` / ``"zstd"`` / ``"mini_lzo"`` (or an id) to :class:`Algorithm`; ValueError otherwise."""
    if isinstance(name, str):
        for algo, text in ALGORITHM_NAMES.items():
            if text == name.lower():
                return algo
        raise ValueError(f"unknown ZFile algorithm {name!r} (expected 'lz4' or 'zstd')")
    return Algorithm(name)


def flag_names(flags: int) -> list[str]:
    """Names of the meaningful bits set in ``flags``, lowest first (for inspectors)."""
    return [f.name.lower() for f in Flag if flags & f and f.name]


def record_digest(raw: bytes | bytearray | memoryview) -> int:
    """Digest of a 512-byte record: raw CRC32C (seed 0) over it with the digest field zeroed (§2.4)."""
    buf = bytearray(raw[:RECORD_SIZE])
    buf[DIGEST_OFFSET : DIGEST_OFFSET + 4] = b"\0\0\0\0"
    return crc32c_raw(buf)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class ZFileRecord:
    """One header or trailer record.

    ``flags`` keeps all 64 bits as stored; the ``is_*`` properties test single bits the way the
    C++ reader does, so garbage high bits are harmless. ``raw`` holds the 512 bytes a parsed
    record came from (``None`` for records built in memory) so :attr:`digest_valid` can be
    checked against exactly what is on disk.
    """

    flags: int
    index_offset: int = 0
    index_size: int = 0
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    algorithm: int = Algorithm.LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: int = 1
    digest: int = 0
    size: int = STRUCT_SIZE
    raw: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    # -- parsing and packing -------------------------------------------------------------------

    @classmethod
    def parse(
        cls, raw: bytes | bytearray | memoryview, path: object = None, what: str = "header"
    ) -> ZFileRecord:
        """Decode a 512-byte record, checking both magics and that the header bit matches ``what``.

        ``what`` is ``"header"`` (bit 0 must be 1) or ``"trailer"`` (bit 0 must be 0); it also
        prefixes the field names in errors. The digest is *not* checked here: whether it must
        be depends on the flags and on which record this is (see :mod:`obd.zfile.reader`).
        """
        raw = bytes(raw)
        if len(raw) < RECORD_SIZE:
            raise TruncatedError(
                f"a ZFile {what} needs {RECORD_SIZE} bytes, got {len(raw)}", path=path, field=what
            )
        raw = raw[:RECORD_SIZE]
        f = dict(zip(_NAMES, _RECORD.unpack_from(raw), strict=True))
        if f["magic0"] != MAGIC0:
            raise FormatError(
                "not a ZFile (bad magic0)", path=path, field=f"{what}.magic0", value=f["magic0"]
            )
        if f["magic1"] != MAGIC1:
            raise FormatError(
                "not a ZFile (bad magic1)", path=path, field=f"{what}.magic1", value=f["magic1"]
            )
        flags = f["flags"]
        want_header = what == "header"
        if bool(flags & Flag.HEADER) != want_header:
            raise FormatError(
                f"the header bit says {'header' if flags & Flag.HEADER else 'trailer'}, expected {what}",
                path=path,
                field=f"{what}.flags",
                value=flags,
            )
        return cls(raw=raw, **{_ATTRIBUTE.get(k, k): v for k, v in f.items() if k not in _CONSTANT_FIELDS})

    def pack(self) -> bytes:
        """The 512-byte on-disk form, zero-padded, with ``digest`` computed over it (§2.4)."""
        values = [
            _CONSTANT_FIELDS[k] if k in _CONSTANT_FIELDS else getattr(self, _ATTRIBUTE.get(k, k))
            for k in _NAMES
        ]
        values[_NAMES.index("digest")] = 0
        buf = bytearray(RECORD_SIZE)
        _RECORD.pack_into(buf, 0, *values)
        struct.pack_into("<I", buf, DIGEST_OFFSET, crc32c_raw(buf))
        return bytes(buf)

    def sealed_copy(self, **changes: int) -> ZFileRecord:
        """A copy with ``changes`` applied and ``digest``/``raw`` refreshed from :meth:`pack`."""
        rec = dataclasses.replace(self, raw=None, **changes)
        packed = rec.pack()
        return dataclasses.replace(
            rec, digest=int.from_bytes(packed[DIGEST_OFFSET : DIGEST_OFFSET + 4], "little"), raw=packed
        )

    # -- flag decoding -------------------------------------------------------------------------

    @property
    def is_header(self) -> bool:
        return bool(self.flags & Flag.HEADER)

    @property
    def is_data(self) -> bool:
        return bool(self.flags & Flag.TYPE)

    @property
    def sealed(self) -> bool:
        return bool(self.flags & Flag.SEALED)

    @property
    def header_overwritten(self) -> bool:
        return bool(self.flags & Flag.HEADER_OVERWRITE)

    @property
    def digest_enabled(self) -> bool:
        return bool(self.flags & Flag.DIGEST)

    @property
    def index_compressed(self) -> bool:
        """Bit 5: declared upstream but never set nor honoured; reported, not acted on."""
        return bool(self.flags & Flag.INDEX_COMPRESSED)

    @property
    def garbage_flag_bits(self) -> int:
        """Bits above the meaningful ones (non-zero only in blobs from old writers)."""
        return self.flags & ~FLAG_MASK

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags)

    @property
    def algorithm_name(self) -> str:
        return algorithm_name(self.algorithm)

    @property
    def digest_valid(self) -> bool:
        """Whether the stored digest matches the record bytes (meaningful only if :attr:`digest_enabled`)."""
        raw = self.raw if self.raw is not None else self.pack()
        return record_digest(raw) == self.digest

    @property
    def index_bytes(self) -> int:
        return self.index_size * 4

    def as_dict(self) -> dict[str, object]:
        """Field values for an inspector (``obd zfile info``) or JSON output."""
        return {
            "flags": self.flags,
            "flag_names": self.flag_names,
            "is_header": self.is_header,
            "sealed": self.sealed,
            "header_overwrite": self.header_overwritten,
            "digest_enabled": self.digest_enabled,
            "digest": self.digest,
            "digest_valid": self.digest_valid,
            "garbage_flag_bits": self.garbage_flag_bits,
            "index_offset": self.index_offset,
            "index_size": self.index_size,
            "original_file_size": self.original_file_size,
            "index_crc": self.index_crc,
            "block_size": self.block_size,
            "algorithm": self.algorithm_name,
            "level": self.level,
            "use_dict": self.use_dict,
            "dict_size": self.dict_size,
            "verify": self.verify,
        }


__all__ = [
    "ALGORITHM_NAMES",
    "BLOCK_CRC_SIZE",
    "DATA_OFFSET",
    "DEFAULT_BLOCK_SIZE",
    "FLAGS_HEADER",
    "FLAGS_HEADER_OVERWRITTEN",
    "FLAGS_TRAILER",
    "FLAG_MASK",
    "MAGIC0",
    "MAGIC1",
    "MAX_BLOCK_SIZE",
    "MAX_INDEX_SIZE",
    "MIN_BLOCK_SIZE",
    "RECORD_FIELDS",
    "RECORD_SIZE",
    "STRUCT_SIZE",
    "Algorithm",
    "Flag",
    "ZFileRecord",
    "algorithm_name",
    "flag_names",
    "is_power_of_two",
    "parse_algorithm",
    "record_digest",
]
