"""A ZFile's validated layout: which record holds the fields, the options, and the jump table.

:meth:`ZFileLayout.read` follows overlaybd's ``zfile_open_ro`` / ``load_jump_table`` (docs/formats.md
§2.9) and adds the checks the C++ code leaves out, so that a damaged or hostile file fails here,
naming the file and the field, before anything is allocated from or trusted in it:

- the header's magic, header bit and (when its digest bit is set) digest; then either the
  overwritten header (bit 3) or a sealed data trailer at the end of the file;
- the options: a power-of-two block size within [4 KiB, 64 KiB], no dictionary, a known codec;
- ``index_size`` and ``index_offset`` against the file size *before* the index is read, and the
  block count against ``original_file_size``;
- the index CRC (when the chosen record's digest bit is set), every index entry > 4 bytes
  (verify) or > 0 and at most a sane bound, and the blocks ending at or before the index.

The reader (:class:`~obd.zfile.reader.ZFileReader`) then only maps reads onto blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from obd.errors import ChecksumError, FormatError, TruncatedError, UnsupportedError
from obd.formats.crc import crc32c_raw
from obd.io.source import Source
from obd.zfile.codecs import Codec, get_codec
from obd.zfile.format import (
    BLOCK_CRC_SIZE,
    DATA_OFFSET,
    MAX_BLOCK_SIZE,
    MAX_INDEX_SIZE,
    MIN_BLOCK_SIZE,
    RECORD_SIZE,
    ZFileRecord,
    algorithm_name,
    is_power_of_two,
)

#: Bytes of one jump-table entry (a uint32 record length).
INDEX_ENTRY_SIZE = 4


def max_record_length(block_size: int) -> int:
    """Largest index entry obd accepts for ``block_size``.

    LZ4 and zstd expand incompressible input by well under 1 % plus a few dozen bytes (a 64 KiB
    block is at most 65,809 bytes in LZ4), so twice the block size is generous for any producer
    while still bounding what one block can make a read allocate.
    """
    return 2 * block_size + 1024


def check_record_digest(rec: ZFileRecord, path: str, what: str) -> None:
    """Raise :class:`ChecksumError` if ``rec`` has its digest bit set and the digest does not match."""
    if rec.digest_enabled and not rec.digest_valid:
        raise ChecksumError(
            f"record digest mismatch (stored 0x{rec.digest:08x})",
            path=path,
            field=f"{what}.digest",
            value=rec.digest,
        )


@dataclass(frozen=True, eq=False)
class ZFileLayout:
    """The checked structure of one ZFile.

    ``record`` is the record the fields come from, ``record_kind`` says which (``"header"`` when the
    header was overwritten at the end, else ``"trailer"``). ``trailer`` is ``None`` when it is not
    needed and unreadable. ``record_lengths`` is the jump table as stored (bytes per block,
    including its CRC); ``offsets`` the absolute start of every block plus the end of the last.
    """

    name: str
    file_size: int
    header: ZFileRecord
    trailer: ZFileRecord | None
    record: ZFileRecord
    record_kind: str
    codec: Codec
    record_lengths: np.ndarray
    offsets: np.ndarray
    #: whether the index CRC was checked (only if the chosen record's digest bit is set)
    index_crc_checked: bool

    @property
    def block_size(self) -> int:
        return self.record.block_size

    @property
    def verify(self) -> bool:
        """Whether every block is followed by its CRC."""
        return bool(self.record.verify)

    @property
    def crc_len(self) -> int:
        return BLOCK_CRC_SIZE if self.verify else 0

    @property
    def original_size(self) -> int:
        return self.record.original_file_size

    @property
    def block_count(self) -> int:
        return len(self.record_lengths)

    @property
    def last_block_length(self) -> int:
        """Decompressed length of the last block (0 for an empty file)."""
        n = self.block_count
        return self.original_size - (n - 1) * self.block_size if n else 0

    @property
    def compressed_lengths(self) -> np.ndarray:
        """Compressed bytes per block, without the CRC (a new array on every call)."""
        return self.record_lengths - np.uint32(self.crc_len)

    @property
    def algorithm(self) -> int:
        return self.record.algorithm

    @property
    def algorithm_name(self) -> str:
        return algorithm_name(self.record.algorithm)

    @classmethod
    def read(cls, source: Source, name: str | None = None) -> ZFileLayout:
        """Read and check the records and the jump table of ``source`` (see the module docstring)."""
        name = name or source.name
        header, trailer, rec, kind, index_limit = _read_records(source, name)
        _check_options(rec, kind, name)
        codec = get_codec(rec.algorithm, path=name, field=f"{kind}.algo")
        _check_index_extent(rec, kind, index_limit, name)
        raw_index = source.read_exact(rec.index_offset, INDEX_ENTRY_SIZE * rec.index_size, "index")
        if rec.digest_enabled:
            crc = crc32c_raw(raw_index)
            if crc != rec.index_crc:
                raise ChecksumError(
                    f"index CRC mismatch (stored 0x{rec.index_crc:08x}, computed 0x{crc:08x})",
                    path=name,
                    field=f"{kind}.index_crc",
                    value=rec.index_crc,
                )
        lengths = np.frombuffer(raw_index, dtype="<u4").astype(np.uint32)
        offsets = _block_offsets(lengths, rec, kind, name)
        return cls(
            name=name,
            file_size=source.size,
            header=header,
            trailer=trailer,
            record=rec,
            record_kind=kind,
            codec=codec,
            record_lengths=lengths,
            offsets=offsets,
            index_crc_checked=rec.digest_enabled,
        )


def _read_records(source: Source, name: str) -> tuple[ZFileRecord, ZFileRecord | None, ZFileRecord, str, int]:
    """Header, trailer, the record to use, its kind, and where the index must end at the latest."""
    fsize = source.size
    if fsize < RECORD_SIZE:
        raise TruncatedError(
            f"{fsize} bytes cannot hold a ZFile header ({RECORD_SIZE})", path=name, field="header"
        )
    header = ZFileRecord.parse(source.read_exact(0, RECORD_SIZE, "header"), name, "header")
    check_record_digest(header, name, "header")
    if header.header_overwritten:
        trailer = None
        if fsize >= 2 * RECORD_SIZE:
            try:
                trailer = ZFileRecord.parse(
                    source.read_exact(fsize - RECORD_SIZE, RECORD_SIZE, "trailer"), name, "trailer"
                )
            except FormatError:
                trailer = None
        return header, trailer, header, "header", fsize
    if not header.is_data:
        raise FormatError(
            "not a data file (type bit clear)", path=name, field="header.flags", value=header.flags
        )
    if fsize < 2 * RECORD_SIZE:
        raise TruncatedError(
            f"{fsize} bytes cannot hold a ZFile header and trailer", path=name, field="trailer"
        )
    trailer = ZFileRecord.parse(
        source.read_exact(fsize - RECORD_SIZE, RECORD_SIZE, "trailer"), name, "trailer"
    )
    if not trailer.is_data:
        raise FormatError(
            "not a data file (type bit clear)", path=name, field="trailer.flags", value=trailer.flags
        )
    if not trailer.sealed:
        raise FormatError("trailer is not sealed", path=name, field="trailer.flags", value=trailer.flags)
    return header, trailer, trailer, "trailer", fsize - RECORD_SIZE


def _check_options(rec: ZFileRecord, kind: str, name: str) -> None:
    bs = rec.block_size
    if not is_power_of_two(bs):
        raise FormatError("block size is not a power of two", path=name, field=f"{kind}.block_size", value=bs)
    if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise UnsupportedError(
            f"block size outside [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]",
            path=name,
            field=f"{kind}.block_size",
            value=bs,
        )
    if rec.dict_size or rec.use_dict:
        raise UnsupportedError(
            "compression dictionaries are not supported",
            path=name,
            field=f"{kind}.dict_size" if rec.dict_size else f"{kind}.use_dict",
            value=rec.dict_size or rec.use_dict,
        )


def _check_index_extent(rec: ZFileRecord, kind: str, index_limit: int, name: str) -> None:
    """The index must lie in ``[DATA_OFFSET, index_limit)`` and hold exactly the blocks the size needs."""
    n = rec.index_size
    if n > MAX_INDEX_SIZE:
        raise FormatError(
            f"more than {MAX_INDEX_SIZE} blocks", path=name, field=f"{kind}.index_size", value=n
        )
    if rec.index_offset < DATA_OFFSET or rec.index_offset > index_limit:
        raise FormatError(
            f"index offset outside the file's data area [{DATA_OFFSET}, {index_limit}]",
            path=name,
            field=f"{kind}.index_offset",
            value=rec.index_offset,
        )
    if INDEX_ENTRY_SIZE * n > index_limit - rec.index_offset:
        raise FormatError(
            f"an index of {n} entries ({INDEX_ENTRY_SIZE * n} bytes) does not fit between offset "
            f"{rec.index_offset} and {index_limit}",
            path=name,
            field=f"{kind}.index_size",
            value=n,
        )
    bs = rec.block_size
    want_blocks = -(-rec.original_file_size // bs)
    if n != want_blocks:
        raise FormatError(
            f"{n} blocks cannot hold {rec.original_file_size} bytes in {bs}-byte blocks "
            f"(needs {want_blocks})",
            path=name,
            field=f"{kind}.index_size",
            value=n,
        )


def _block_offsets(lengths: np.ndarray, rec: ZFileRecord, kind: str, name: str) -> np.ndarray:
    """Check every record length and return the prefix sums: block starts plus the end."""
    bs = rec.block_size
    crc_len = BLOCK_CRC_SIZE if rec.verify else 0
    n = len(lengths)
    if n:
        lo = int(lengths.min())
        hi = int(lengths.max())
        if lo <= crc_len:
            bad = int(np.argmax(lengths <= crc_len))
            raise FormatError(
                f"block {bad} is {lo} bytes long; entries must be > {crc_len}",
                path=name,
                field=f"index[{bad}]",
                value=lo,
            )
        if hi > max_record_length(bs) + crc_len:
            bad = int(np.argmax(lengths > max_record_length(bs) + crc_len))
            raise FormatError(
                f"block {bad} is {hi} bytes long, more than any codec makes of {bs} bytes",
                path=name,
                field=f"index[{bad}]",
                value=hi,
            )
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = DATA_OFFSET
    np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
    offsets[1:] += DATA_OFFSET
    if int(offsets[-1]) > rec.index_offset:
        raise FormatError(
            f"the blocks end at {int(offsets[-1])}, past the index at {rec.index_offset}",
            path=name,
            field=f"{kind}.index_offset",
            value=rec.index_offset,
        )
    return offsets


__all__ = ["INDEX_ENTRY_SIZE", "ZFileLayout", "check_record_digest", "max_record_length"]
