"""Prefetch an ext4 root's metadata before the guest asks for it (no trace needed).

A guest booting from a lazily fetched disk waits on one fetch per read it makes, and a large share
of those reads are file-system metadata: the superblock and group descriptors at mount, then for
every path a program opens the inode table blocks holding its inodes (ext4 reads them 32 blocks at
a time) and the blocks of every directory on the way. Their location is written in the file system
itself, so this module reads it the way the kernel would — superblock, group descriptors, the used
part of each inode table, the journal superblock and the backup superblocks (Linux reads both at
mount), then every directory's extent tree — and returns the byte ranges, which
the server fetches concurrently while the guest kernel is still starting. What remains for the
guest to wait on is mostly file data, which a recorded trace covers (``trace=``).

Only what ext4 guarantees is trusted, and everything read is checked against the device size and
a byte budget; anything unexpected (not ext4, a corrupt field) ends the walk early with whatever
was found so far: a prefetch is an optimisation, never a reason to fail. The on-disk structures
are declared (and validated) in :mod:`obd.formats.ext4`; the nbd plugin's ``prefetch-meta=``
runs :func:`prefetch_metadata` in the background once it serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from obd.errors import ObdError
from obd.formats.ext4 import (
    BG_INODE_UNINIT,
    EXTENTS_FL,
    INLINE_DATA_FL,
    S_IFDIR,
    S_IFMT,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    ExtentNode,
    GroupDescriptors,
    Superblock,
    parse_inodes,
)
from obd.io.priority import background_reads

#: Never plan more than this many bytes of metadata (a huge or hostile file system).
DEFAULT_BUDGET = 64 << 20
#: The first read: superblock and group descriptors of any file system up to a few TiB.
HEAD_BYTES = 256 << 10
#: Extent tree index levels followed (ext4 trees are at most 5 deep).
MAX_DEPTH = 5

Reader = Callable[[int, int], bytes]


def _superblock(read: Reader, size: int) -> Superblock | None:
    """The superblock, if the device holds an ext4 file system this walk can follow."""
    if size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
        return None
    try:
        sb = Superblock.parse(read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    except ObdError:
        return None
    if sb.meta_bg or sb.size > size:  # meta_bg: the group descriptors are spread out
        return None
    return sb


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, n in sorted(ranges):
        if n <= 0:
            continue
        if out and a <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], a + n - out[-1][0])
        else:
            out.append([a, n])
    return [(a, n) for a, n in out]


def _extents(node: bytes, bs: int, blocks: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(data ranges in bytes, child node block numbers) of one extent tree node (``i_block`` or a block);
    nothing for a node that is not one."""
    try:
        parsed = ExtentNode.parse(node)
    except ObdError:
        return [], []
    data = [
        (e.start * bs, e.length * bs)
        for e in parsed.extents
        if not e.uninitialized and e.length and e.start + e.length <= blocks  # uninitialised: zeros
    ]
    return data, [b for b in parsed.children if b < blocks]


def _journal_head(read: Reader, sb: Superblock, gdt: GroupDescriptors, size: int) -> list[tuple[int, int]]:
    """The first block of an internal journal (its superblock, the first thing a mount reads after
    the group descriptors); nothing when there is none or it cannot be found."""
    group, index = divmod(sb.journal_inum - 1, sb.inodes_per_group)
    if not sb.journal_inum or group >= len(gdt.inode_table):
        return []
    at = int(gdt.inode_table[group]) * sb.block_size + index * sb.inode_size
    if at + sb.inode_size > size:
        return []
    try:
        rec = parse_inodes(read(at, sb.inode_size), sb.inode_size)[0]
    except ObdError:
        return []
    data, _ = _extents(rec["i_block"].tobytes(), sb.block_size, sb.blocks_count)
    return [(data[0][0], sb.block_size)] if data else []


def ext4_metadata(
    read: Reader, size: int, *, budget: int = DEFAULT_BUDGET, directories: bool = True
) -> list[tuple[int, int]]:
    """Byte ranges of an ext4 device's hot metadata: superblock and group descriptors, the used part
    of every inode table and, with ``directories``, every directory's blocks and extent tree nodes.
    Empty if not ext4.

    ``read(offset, length)`` reads the device (it may be called from several threads at once).
    """
    head = read(0, min(size, HEAD_BYTES))  # superblock and (usually) group descriptors in one read
    raw_read = read

    def cached_read(offset: int, length: int) -> bytes:
        if offset + length <= len(head):
            return head[offset : offset + length]
        return raw_read(offset, length)

    read = cached_read

    sb = _superblock(read, size)
    if sb is None:
        return []
    bs = sb.block_size
    gdt_at = sb.group_desc_offset
    gdt_len = sb.groups * sb.desc_size
    if gdt_at + gdt_len > size or gdt_len > budget:
        return []
    ranges = [(0, gdt_at + gdt_len + (-(gdt_at + gdt_len) % bs))]
    spent = ranges[0][1]
    try:
        gdt = GroupDescriptors.parse(read(gdt_at, gdt_len), sb)
    except ObdError:
        return ranges
    ipg = sb.inodes_per_group
    tables: list[tuple[int, int]] = []
    for itable, flags, unused in zip(
        gdt.inode_table.tolist(), gdt.flags.tolist(), gdt.itable_unused.tolist(), strict=True
    ):
        used = ipg
        if sb.group_csum:
            if flags & BG_INODE_UNINIT:
                continue
            used = max(0, ipg - min(unused, ipg))
        n = used * sb.inode_size
        n += -n % bs
        if not n or itable == 0 or itable * bs + n > size or spent + n > budget:
            continue
        tables.append((itable * bs, n))
        spent += n
    ranges += tables
    # What Linux reads at mount besides the above, one dependent round trip each if not prefetched:
    # the journal superblock and the first block of every group holding a backup superblock.
    ranges += _journal_head(read, sb, gdt, size)
    ranges += [(sb.group_offset(g), bs) for g in sb.backup_groups() if sb.group_offset(g) + bs <= size]
    if not directories:
        return _merge(ranges)
    nodes: list[int] = []
    for at, n in tables:
        raw = read(at, n)
        if len(raw) < n:
            continue
        inodes = parse_inodes(raw, sb.inode_size)
        modes, flags = inodes["i_mode"], inodes["i_flags"]
        dirs = np.flatnonzero(
            ((modes & S_IFMT) == S_IFDIR) & ((flags & EXTENTS_FL) != 0) & ((flags & INLINE_DATA_FL) == 0)
        )
        for i in dirs:
            data, children = _extents(inodes[i]["i_block"].tobytes(), bs, sb.blocks_count)
            for r in data:
                if spent + r[1] <= budget:
                    ranges.append(r)
                    spent += r[1]
            nodes += children
    for _ in range(MAX_DEPTH):
        if not nodes or spent + len(nodes) * bs > budget:
            break
        ranges += [(b * bs, bs) for b in nodes]
        spent += len(nodes) * bs
        found: list[int] = []
        for b in nodes:
            data, children = _extents(read(b * bs, bs), bs, sb.blocks_count)
            for r in data:
                if spent + r[1] <= budget:
                    ranges.append(r)
                    spent += r[1]
            found += children
        nodes = found
    return _merge(ranges)


@dataclass(frozen=True)
class PrefetchResult:
    ranges: int
    bytes: int


def prefetch_ranges(
    readinto: Callable[[memoryview, int], int],
    ranges: list[tuple[int, int]],
    *,
    workers: int = 16,
    piece: int = 1 << 20,
) -> PrefetchResult:
    """Read ``ranges`` through ``readinto`` (the device), ``workers`` at a time, to warm the caches."""
    pieces = [(a + p, min(piece, n - p)) for a, n in ranges for p in range(0, n, piece)]
    if not pieces:
        return PrefetchResult(0, 0)
    local = threading.local()

    @background_reads()  # nobody waits on these reads yet: Dragonfly's prefetch priority
    def one(job: tuple[int, int]) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(piece))
        return readinto(buf[: job[1]], job[0])

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="obd-prefetch") as pool:
        total = sum(pool.map(one, pieces))
    return PrefetchResult(len(pieces), total)


def prefetch_metadata(stack: Any, *, directories: bool = True, workers: int = 16) -> PrefetchResult:
    """Plan the ext4 metadata of ``stack`` (a :class:`~obd.lsmt.stack.Stack`, or anything with ``size``
    and ``readinto(buf, offset)``) and read it through, ``workers`` reads at a time."""

    def read(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = stack.readinto(memoryview(buf), offset)
        return bytes(buf[:n])

    ranges = ext4_metadata(read, stack.size, directories=directories)
    return prefetch_ranges(stack.readinto, ranges, workers=workers)
