"""GNU tar's sparse members: their maps read and validated before they are trusted.

Every format GNU tar writes (``--sparse``): the old GNU ``S`` type with its map in the header and
extension blocks, and the PAX formats 0.0 (``GNU.sparse.offset``/``numbytes`` records), 0.1
(``GNU.sparse.map``) and 1.0 (the map at the start of the member's data). A map is checked for its
numbers, order, bounds and count, and that its data lengths add up to the stored size;
:mod:`obd.convert.layertar` calls these while it reads a member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from obd.convert.tarfields import BLOCK, FILE, HostileTarError, header_number, pax_int, show
from obd.errors import FormatError, UnsupportedError

#: Most data segments a sparse member's map may list (GNU tar's own files have one per data run).
MAX_SPARSE_SEGMENTS = 1 << 16


class _Reader(Protocol):
    def read(self, n: int, what: str) -> bytes: ...


_SPARSE_OFFSET = b"GNU.sparse.offset"
_SPARSE_NUMBYTES = b"GNU.sparse.numbytes"
#: PAX keys of a format 0.0 map (repeated, in order: kept apart from the other PAX records)
SPARSE_PAIR_KEYS = (_SPARSE_OFFSET, _SPARSE_NUMBYTES)
#: old GNU header: 4 map entries of 12+12 bytes at 386, ``isextended`` at 482, ``realsize`` at 483;
#: an extension block holds 21 entries and its own ``isextended`` at 504
_OLD_MAP_AT, _OLD_MAP_ENTRIES, _OLD_EXTENDED_AT, _OLD_REALSIZE_AT = 386, 4, 482, 483
_EXT_MAP_ENTRIES, _EXT_EXTENDED_AT = 21, 504


@dataclass(frozen=True)
class SparseHeader:
    """What a member's headers say of its sparse map, before its data is read."""

    real_size: int
    segments: list[tuple[int, int]] | None  # None: format 1.0, the map opens the member's data
    field: str  # where the map is, for errors
    size_field: str  # where the real size is


def sparse_old(block: bytes, inp: _Reader, *, path: str, where: str) -> tuple[int, list[tuple[int, int]]]:
    """``(real size, segments)`` of an old GNU ``S`` header, reading its extension blocks."""
    segments: list[tuple[int, int]] = []
    ended = False

    def take(raw: bytes, start: int, count: int, field: str) -> None:
        nonlocal ended
        for i in range(count):
            at = start + 24 * i
            item = raw[at : at + 24]
            here = f"{field}[{i}]"
            if ended:
                if item.strip(b"\x00"):
                    raise FormatError(
                        "sparse map entry after the map's end", path=path, field=here, value=show(item)
                    )
                continue
            if item[12] == 0:  # GNU tar ends the map at an empty numbytes field
                if item[:12].strip(b"\x00"):
                    raise FormatError("sparse map entry without its length", path=path, field=here)
                ended = True
                continue
            off = header_number(item[:12], path=path, where=f"{here}.offset")
            length = header_number(item[12:], path=path, where=f"{here}.numbytes")
            segments.append((off, length))

    take(block, _OLD_MAP_AT, _OLD_MAP_ENTRIES, f"{where}.sparse")
    real_size = header_number(
        block[_OLD_REALSIZE_AT : _OLD_REALSIZE_AT + 12], path=path, where=f"{where}.realsize"
    )
    extended = block[_OLD_EXTENDED_AT]
    blocks = 0
    while extended:
        blocks += 1
        if blocks * _EXT_MAP_ENTRIES > MAX_SPARSE_SEGMENTS:
            raise HostileTarError(
                f"more than {MAX_SPARSE_SEGMENTS} sparse map entries",
                path=path,
                field=f"{where}.sparse.ext[{blocks}]",
                value=blocks,
            )
        ext = inp.read(BLOCK, f"{where} sparse extension block {blocks}")
        take(ext, 0, _EXT_MAP_ENTRIES, f"{where}.sparse.ext[{blocks}]")
        extended = ext[_EXT_EXTENDED_AT]
    return real_size, segments


def sparse_header(
    pax: dict[bytes, bytes],
    pairs: list[tuple[bytes, bytes]],
    old_map: tuple[int, list[tuple[int, int]]] | None,
    kind: str,
    *,
    path: str,
    where: str,
    shown: str,
) -> SparseHeader | None:
    """The sparse map a member's headers declare, in any of GNU tar's formats; None if it has none."""
    if old_map is None and not any(k.startswith(b"GNU.sparse.") for k in pax):
        return None
    if kind != FILE:
        raise FormatError(f"{shown}: a sparse map on a {kind} entry", path=path, field=f"{where}.pax")
    if old_map is not None:
        real_size, segments = old_map
        return SparseHeader(real_size, segments, f"{where}.sparse", f"{where}.realsize")

    def number(key: bytes) -> int:
        if key not in pax:
            raise FormatError(
                f"{shown}: sparse member without {key.decode()}",
                path=path,
                field=f"{where}.pax.{key.decode()}",
            )
        return pax_int(pax[key], path=path, where=f"{where}.pax.{key.decode()}")

    major, minor = pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor")
    if major is not None or minor is not None:
        version = ((major or b"?").strip(), (minor or b"?").strip())
        if version != (b"1", b"0"):
            raise UnsupportedError(
                f"{shown}: GNU sparse format {show(version[0])}.{show(version[1])} is not supported "
                "(0.0, 0.1 and 1.0 are)",
                path=path,
                field=f"{where}.pax.GNU.sparse.major",
            )
        real_size = number(b"GNU.sparse.realsize")
        return SparseHeader(real_size, None, f"{where}.sparse.map", f"{where}.pax.GNU.sparse.realsize")
    real_size = number(b"GNU.sparse.size")
    if b"GNU.sparse.map" in pax:  # 0.1
        field = f"{where}.pax.GNU.sparse.map"
        numbers = pax[b"GNU.sparse.map"].split(b",")
        if len(numbers) % 2:
            raise FormatError(f"{shown}: sparse map has an odd count of numbers", path=path, field=field)
        if len(numbers) // 2 > MAX_SPARSE_SEGMENTS:
            raise HostileTarError(
                f"{shown}: more than {MAX_SPARSE_SEGMENTS} sparse map entries", path=path, field=field
            )
        values = [pax_int(n, path=path, where=field) for n in numbers]
        segments = list(zip(values[0::2], values[1::2], strict=True))
    else:  # 0.0: GNU.sparse.offset and GNU.sparse.numbytes records, alternating
        field = f"{where}.pax.{_SPARSE_OFFSET.decode()}"
        keys = [k for k, _v in pairs]
        if keys != [_SPARSE_OFFSET, _SPARSE_NUMBYTES] * (len(keys) // 2):
            raise FormatError(
                f"{shown}: sparse map records do not alternate offset, numbytes", path=path, field=field
            )
        if len(pairs) // 2 > MAX_SPARSE_SEGMENTS:
            raise HostileTarError(
                f"{shown}: more than {MAX_SPARSE_SEGMENTS} sparse map entries", path=path, field=field
            )
        segments = [
            (
                pax_int(pairs[i][1], path=path, where=f"{field}[{i // 2}]"),
                pax_int(
                    pairs[i + 1][1], path=path, where=f"{where}.pax.{_SPARSE_NUMBYTES.decode()}[{i // 2}]"
                ),
            )
            for i in range(0, len(pairs), 2)
        ]
    if b"GNU.sparse.numblocks" in pax:
        count = number(b"GNU.sparse.numblocks")
        if count != len(segments):
            raise FormatError(
                f"{shown}: GNU.sparse.numblocks says {count} segments, the map lists {len(segments)}",
                path=path,
                field=f"{where}.pax.GNU.sparse.numblocks",
                value=count,
            )
    return SparseHeader(real_size, segments, field, f"{where}.pax.GNU.sparse.size")


def sparse_map_v1(inp: _Reader, size: int, *, path: str, field: str) -> tuple[list[tuple[int, int]], int]:
    """Read the map that opens a sparse 1.0 member's data: decimal numbers, one a line (the count,
    then offset and length pairs), padded to a block. Returns the segments and the map's bytes."""
    buf = bytearray()
    pos = used = 0

    def number(what: str) -> int:
        nonlocal pos, used
        while (nl := buf.find(b"\n", pos)) < 0:
            if len(buf) - pos > 20:
                raise FormatError(
                    "sparse map number is not a decimal line", path=path, field=f"{field}.{what}"
                )
            if used + BLOCK > size:
                raise FormatError(
                    "sparse map runs past the member's data", path=path, field=f"{field}.{what}", value=size
                )
            buf.extend(inp.read(BLOCK, f"{field} block"))
            used += BLOCK
        text = bytes(buf[pos:nl])
        pos = nl + 1
        if not text.isdigit() or len(text) > 20:
            raise FormatError(
                "sparse map number is not decimal", path=path, field=f"{field}.{what}", value=show(text[:24])
            )
        return int(text)

    count = number("count")
    if count > MAX_SPARSE_SEGMENTS:
        raise HostileTarError(
            f"more than {MAX_SPARSE_SEGMENTS} sparse map entries",
            path=path,
            field=f"{field}.count",
            value=count,
        )
    segments = [(number(f"offset[{i}]"), number(f"numbytes[{i}]")) for i in range(count)]
    if buf[pos:].strip(b"\x00"):
        raise FormatError("garbage after the sparse map", path=path, field=field)
    return segments, used


def check_segments(
    segments: list[tuple[int, int]], real_size: int, stored: int, *, path: str, field: str, shown: str
) -> tuple[tuple[int, int], ...]:
    """A sparse map's segments, checked: in order, not overlapping, inside the real size, and
    holding exactly the bytes the member stores. Empty segments (GNU tar ends a map with one at the
    real size) are dropped."""
    if len(segments) > MAX_SPARSE_SEGMENTS:
        raise HostileTarError(
            f"{shown}: more than {MAX_SPARSE_SEGMENTS} sparse map entries", path=path, field=field
        )
    end = total = 0
    out = []
    for i, (offset, length) in enumerate(segments):
        here = f"{field}[{i}]"
        if offset < 0 or length < 0:
            raise FormatError(
                f"{shown}: negative sparse map entry", path=path, field=here, value=(offset, length)
            )
        if offset < end:
            raise FormatError(
                f"{shown}: sparse map entries out of order or overlapping",
                path=path,
                field=here,
                value=offset,
            )
        if offset + length > real_size:
            raise FormatError(
                f"{shown}: sparse map entry ends past the file's real size {real_size}",
                path=path,
                field=here,
                value=(offset, length),
            )
        end = offset + length
        total += length
        if length:
            out.append((offset, length))
    if total != stored:
        raise FormatError(
            f"{shown}: the sparse map's entries hold {total} bytes, the member stores {stored}",
            path=path,
            field=field,
            value=total,
        )
    return tuple(out)
