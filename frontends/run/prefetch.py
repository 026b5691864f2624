"""Prefetch an ext4 root's metadata before the guest asks for it (no trace needed).

A guest booting from a lazily fetched disk waits on one fetch per read it makes, and a large share
of those reads are file-system metadata: the superblock and group descriptors at mount, then for
every path a program opens the inode table blocks holding its inodes (ext4 reads them 32 blocks at
a time) and the blocks of every directory on the way. Their location is written in the file system
itself, so this module reads it the way the kernel would — superblock, group descriptors, the used
part of each inode table, then every directory's extent tree — and returns the byte ranges, which
the server fetches concurrently while the guest kernel is still starting. What remains for the
guest to wait on is mostly file data, which a recorded trace covers (``trace=``).

Only what ext4 guarantees is trusted, and everything read is checked against the device size and
a byte budget; anything unexpected (not ext4, a corrupt field) ends the walk early with whatever
was found so far: a prefetch is an optimisation, never a reason to fail.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
INCOMPAT_64BIT = 0x80
INCOMPAT_META_BG = 0x10
BG_INODE_UNINIT = 0x1
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
S_IFMT = 0xF000
S_IFDIR = 0x4000
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
#: Never plan more than this many bytes of metadata (a huge or hostile file system).
DEFAULT_BUDGET = 64 << 20
#: The first read: superblock and group descriptors of any file system up to a few TiB.
HEAD_BYTES = 256 << 10
#: Extent tree index levels followed (ext4 trees are at most 5 deep).
MAX_DEPTH = 5

Reader = Callable[[int, int], bytes]


@dataclass
class Ext4Layout:
    block_size: int
    blocks: int
    groups: int
    inodes_per_group: int
    inode_size: int
    first_data_block: int
    desc_size: int
    csum: bool


def _superblock(read: Reader, size: int) -> Ext4Layout | None:
    if size < SUPERBLOCK_OFFSET + 1024:
        return None
    sb = read(SUPERBLOCK_OFFSET, 1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != EXT4_MAGIC:
        return None
    log_bs = struct.unpack_from("<I", sb, 0x18)[0]
    if log_bs > 6:
        return None
    bs = 1024 << log_bs
    blocks_lo, first, bpg, ipg = (struct.unpack_from("<I", sb, o)[0] for o in (0x04, 0x14, 0x20, 0x28))
    inode_size = struct.unpack_from("<H", sb, 0x58)[0]
    incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
    blocks = blocks_lo
    desc_size = 32
    if incompat & INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        desc_size = struct.unpack_from("<H", sb, 0xFE)[0] or 32
    if (
        incompat & INCOMPAT_META_BG
        or not bpg
        or not ipg
        or inode_size < 128
        or inode_size > bs
        or inode_size & (inode_size - 1)
        or desc_size not in (32, 64)
        or blocks * bs > size
    ):
        return None
    groups = -(-(blocks - first) // bpg)
    csum = bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))
    return Ext4Layout(bs, blocks, groups, ipg, inode_size, first, desc_size, csum)


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
    """(data ranges in bytes, child node block numbers) of one extent tree node (``i_block`` or a block)."""
    if len(node) < 12:
        return [], []
    magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
    if magic != EXTENT_MAGIC or entries > (len(node) - 12) // 12:
        return [], []
    data: list[tuple[int, int]] = []
    children: list[int] = []
    for i in range(entries):
        at = 12 + 12 * i
        if depth == 0:
            _lblk, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, at)
            if length > 32768:  # an uninitialised extent: reads as zeros, nothing to fetch
                continue
            start = start_hi << 32 | start_lo
            if length and start + length <= blocks:
                data.append((start * bs, length * bs))
        else:
            _lblk, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, at)
            leaf = leaf_hi << 32 | leaf_lo
            if leaf < blocks:
                children.append(leaf)
    return data, children


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

    def read(offset: int, length: int) -> bytes:
        if offset + length <= len(head):
            return head[offset : offset + length]
        return raw_read(offset, length)

    lay = _superblock(read, size)
    if lay is None:
        return []
    bs = lay.block_size
    gdt_at = (lay.first_data_block + 1) * bs
    gdt_len = lay.groups * lay.desc_size
    if gdt_at + gdt_len > size or gdt_len > budget:
        return []
    ranges = [(0, gdt_at + gdt_len + (-(gdt_at + gdt_len) % bs))]
    spent = ranges[0][1]
    gdt = read(gdt_at, gdt_len)
    if len(gdt) < gdt_len:
        return ranges
    tables: list[tuple[int, int]] = []
    for g in range(lay.groups):
        d = gdt[g * lay.desc_size : (g + 1) * lay.desc_size]
        itable = struct.unpack_from("<I", d, 0x8)[0]
        flags = struct.unpack_from("<H", d, 0x12)[0]
        unused = struct.unpack_from("<H", d, 0x1C)[0]
        if lay.desc_size >= 64:
            itable |= struct.unpack_from("<I", d, 0x28)[0] << 32
            unused |= struct.unpack_from("<H", d, 0x32)[0] << 16
        used = lay.inodes_per_group
        if lay.csum:
            if flags & BG_INODE_UNINIT:
                continue
            used = max(0, lay.inodes_per_group - min(unused, lay.inodes_per_group))
        n = used * lay.inode_size
        n += -n % bs
        if not n or itable == 0 or itable * bs + n > size or spent + n > budget:
            continue
        tables.append((itable * bs, n))
        spent += n
    ranges += tables
    if not directories:
        return _merge(ranges)
    nodes: list[int] = []
    for at, n in tables:
        raw = read(at, n)
        if len(raw) < n:
            continue
        inodes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, lay.inode_size)
        modes = inodes[:, 0:2].copy().view("<u2")[:, 0]
        flags = inodes[:, 0x20:0x24].copy().view("<u4")[:, 0]
        dirs = np.flatnonzero(
            ((modes & S_IFMT) == S_IFDIR) & ((flags & EXTENTS_FL) != 0) & ((flags & INLINE_DATA_FL) == 0)
        )
        for i in dirs:
            data, children = _extents(bytes(inodes[i, 0x28:0x64]), bs, lay.blocks)
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
            data, children = _extents(read(b * bs, bs), bs, lay.blocks)
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

    import threading

    local = threading.local()

    def one(job: tuple[int, int]) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(piece))
        return readinto(buf[: job[1]], job[0])

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="obd-prefetch") as pool:
        total = sum(pool.map(one, pieces))
    return PrefetchResult(len(pieces), total)
