"""The digest table: SHA-256 of every fixed-size block of one layer blob (docs/verify.md).

Layout (little-endian, no gaps)::

    [header 64][digest of block 0: 32] … [digest of block N−1: 32]

The header names the blob it covers (its size and raw SHA-256) and the block size, so a table can
never be applied to the wrong blob. Block *i* covers blob bytes ``[i·B, min((i+1)·B, size))``: the
last block is short unless the blob size is a multiple of ``B``. A table is itself a registry blob;
its digest is pinned by the layer descriptor (:mod:`obd.verify.table`), which the manifest digest
pins in turn, so every block is tied to the manifest digest.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable

from obd.errors import FormatError, TruncatedError

#: ``"OBDVTAB"`` plus format generation 1.
MAGIC = b"OBDVTAB\x01"
VERSION = 1
DIGEST_SIZE = 32
#: Block sizes a table may use: powers of two from 4 KiB to 16 MiB.
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 16 << 20
DEFAULT_BLOCK_SIZE = 64 << 10
#: What the digest table blob is called in OCI descriptors.
MEDIA_TYPE = "application/vnd.obd.verify.table.v1"

#: The header, field by field.
HEADER_FIELDS: tuple[tuple[str, str], ...] = (
    ("magic", "8s"),
    ("version", "I"),
    ("block_size", "I"),
    ("blob_size", "Q"),
    ("block_count", "Q"),
    ("blob_sha256", "32s"),
)
_HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_FIELDS))
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 64


def check_block_size(block_size: int, *, path: object = None) -> int:
    """``block_size`` if a table may use it; else a FormatError."""
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise FormatError(
            "block size must be a power of two from 4 KiB to 16 MiB",
            path=path,
            field="block_size",
            value=block_size,
        )
    return block_size


def block_count(blob_size: int, block_size: int) -> int:
    return -(-blob_size // block_size)


def table_size(blob_size: int, block_size: int) -> int:
    """Bytes of the table of a ``blob_size``-byte blob."""
    return HEADER_SIZE + DIGEST_SIZE * block_count(blob_size, block_size)


class DigestTable:
    """A parsed digest table, validated in full by the constructor.

    ``path`` names the table in errors (its digest, normally).
    """

    def __init__(self, data: bytes, *, path: object = None):
        if len(data) < HEADER_SIZE:
            raise TruncatedError(
                f"{len(data)} bytes, less than the {HEADER_SIZE}-byte header", path=path, field="header"
            )
        magic, version, bs, blob_size, count, blob_sha = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise FormatError("not an obd digest table", path=path, field="header.magic", value=magic)
        if version != VERSION:
            raise FormatError("unknown table version", path=path, field="header.version", value=version)
        check_block_size(bs, path=path)
        if count != block_count(blob_size, bs):
            raise FormatError(
                f"a {blob_size}-byte blob in {bs}-byte blocks has {block_count(blob_size, bs)} blocks",
                path=path,
                field="header.block_count",
                value=count,
            )
        if len(data) != HEADER_SIZE + DIGEST_SIZE * count:
            raise FormatError(
                f"table is {len(data)} bytes; {count} digests need {HEADER_SIZE + DIGEST_SIZE * count}",
                path=path,
                field="size",
                value=len(data),
            )
        self.path = None if path is None else str(path)
        self.block_size: int = bs
        self.blob_size: int = blob_size
        self.block_count: int = count
        self.blob_digest = "sha256:" + blob_sha.hex()
        self._digests = memoryview(data)[HEADER_SIZE:]

    def digest(self, block: int) -> memoryview:
        """The 32-byte SHA-256 block ``block`` must have."""
        return self._digests[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE]

    def block_range(self, block: int) -> tuple[int, int]:
        """``(offset, length)`` of block ``block`` in the blob."""
        start = block * self.block_size
        return start, min(self.block_size, self.blob_size - start)

    def check_blob(self, digest: str, size: int, *, path: object = None) -> None:
        """FormatError unless this table covers blob ``digest`` of ``size`` bytes."""
        if digest != self.blob_digest:
            raise FormatError(
                f"the table covers blob {self.blob_digest}, not {digest}",
                path=path or self.path,
                field="header.blob_sha256",
            )
        if size != self.blob_size:
            raise FormatError(
                f"the table covers a {self.blob_size}-byte blob; this one has {size}",
                path=path or self.path,
                field="header.blob_size",
                value=self.blob_size,
            )


def build_table(
    read: Callable[[memoryview, int], int], blob_size: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[bytes, str]:
    """``(table bytes, blob digest)`` of the blob ``read(buf, offset)`` fills (a Source's
    ``readinto``, or a file's ``os.preadv`` wrapper). The blob is read once, in 4 MiB strides."""
    check_block_size(block_size)
    count = block_count(blob_size, block_size)
    out = bytearray(HEADER_SIZE + DIGEST_SIZE * count)
    whole = hashlib.sha256()
    stride = max(block_size, (4 << 20) // block_size * block_size)
    buf = memoryview(bytearray(stride))
    pos = 0
    at = HEADER_SIZE
    while pos < blob_size:
        want = min(stride, blob_size - pos)
        got = 0
        while got < want:
            n = read(buf[got:want], pos + got)
            if n <= 0:
                raise TruncatedError(f"blob ended at {pos + got} of {blob_size} bytes", field="blob")
            got += n
        piece = buf[:want]
        whole.update(piece)
        for lo in range(0, want, block_size):
            out[at : at + DIGEST_SIZE] = hashlib.sha256(piece[lo : lo + block_size]).digest()
            at += DIGEST_SIZE
        pos += want
    sha = whole.digest()
    _HEADER.pack_into(out, 0, MAGIC, VERSION, block_size, blob_size, count, sha)
    return bytes(out), "sha256:" + sha.hex()


def build_table_file(path: str, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[bytes, str]:
    """:func:`build_table` of the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return build_table(lambda b, off: os.preadv(fd, [b], off), size, block_size)
    finally:
        os.close(fd)


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DIGEST_SIZE",
    "HEADER_FIELDS",
    "HEADER_SIZE",
    "MAGIC",
    "MEDIA_TYPE",
    "DigestTable",
    "block_count",
    "build_table",
    "build_table_file",
    "check_block_size",
    "table_size",
]
