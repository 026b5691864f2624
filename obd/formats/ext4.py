"""The ext4 on-disk structures obd reads itself: superblock, group descriptor, inode, extent tree nodes.

Each structure is declared once, field by field with the kernel's names (``fs/ext4/ext4.h``), in
the order they sit on disk; the :mod:`struct` layouts and the numpy dtypes (for whole inode tables
and group descriptor tables at once) are derived from those declarations. Everything is little
endian. Only what a reader of the metadata needs is interpreted; the parsers check magics, sizes
and counts and raise :class:`~obd.errors.FormatError` (or :class:`~obd.errors.TruncatedError`,
:class:`~obd.errors.UnsupportedError`) naming the field, e.g. ``superblock.s_magic=4660: not ext4``.

obd writes ext4 file systems with e2fsprogs (``mke2fs``, ``debugfs``: :mod:`obd.convert.ext4`); this
module only reads them (the metadata prefetch of :mod:`obd.prefetch.ext4`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from obd.errors import FormatError, TruncatedError, UnsupportedError

#: The superblock's byte offset on the device, and its size.
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
#: ``s_log_block_size`` limit: blocks are 1 KiB << 0..6 (64 KiB).
MAX_LOG_BLOCK_SIZE = 6
#: Smallest inode record (the "good old" 128-byte inode).
MIN_INODE_SIZE = 128

INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
#: ``bg_flags``: the group's inode table is not initialised (nothing in it is in use).
BG_INODE_UNINIT = 0x1
S_IFMT = 0xF000
S_IFDIR = 0x4000
#: ``i_flags``: the inode's ``i_block`` holds an extent tree; its data is inline in the inode.
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
#: ``ee_len`` above this marks an uninitialised extent (reads as zeros) of ``ee_len - 32768`` blocks.
EXT_INIT_MAX_LEN = 32768

Fields = tuple[tuple[str, str], ...]

#: ``struct ext4_super_block``, up to ``s_blocks_count_hi`` (the rest of its 1024 bytes is unread).
SUPERBLOCK_FIELDS: Fields = (
    ("s_inodes_count", "I"),
    ("s_blocks_count_lo", "I"),
    ("s_r_blocks_count_lo", "I"),
    ("s_free_blocks_count_lo", "I"),
    ("s_free_inodes_count", "I"),
    ("s_first_data_block", "I"),
    ("s_log_block_size", "I"),
    ("s_log_cluster_size", "I"),
    ("s_blocks_per_group", "I"),
    ("s_clusters_per_group", "I"),
    ("s_inodes_per_group", "I"),
    ("s_mtime", "I"),
    ("s_wtime", "I"),
    ("s_mnt_count", "H"),
    ("s_max_mnt_count", "H"),
    ("s_magic", "H"),
    ("s_state", "H"),
    ("s_errors", "H"),
    ("s_minor_rev_level", "H"),
    ("s_lastcheck", "I"),
    ("s_checkinterval", "I"),
    ("s_creator_os", "I"),
    ("s_rev_level", "I"),
    ("s_def_resuid", "H"),
    ("s_def_resgid", "H"),
    ("s_first_ino", "I"),
    ("s_inode_size", "H"),
    ("s_block_group_nr", "H"),
    ("s_feature_compat", "I"),
    ("s_feature_incompat", "I"),
    ("s_feature_ro_compat", "I"),
    ("s_uuid", "16s"),
    ("s_volume_name", "16s"),
    ("s_last_mounted", "64s"),
    ("s_algorithm_usage_bitmap", "I"),
    ("s_prealloc_blocks", "B"),
    ("s_prealloc_dir_blocks", "B"),
    ("s_reserved_gdt_blocks", "H"),
    ("s_journal_uuid", "16s"),
    ("s_journal_inum", "I"),
    ("s_journal_dev", "I"),
    ("s_last_orphan", "I"),
    ("s_hash_seed", "16s"),
    ("s_def_hash_version", "B"),
    ("s_jnl_backup_type", "B"),
    ("s_desc_size", "H"),
    ("s_default_mount_opts", "I"),
    ("s_first_meta_bg", "I"),
    ("s_mkfs_time", "I"),
    ("s_jnl_blocks", "68s"),
    ("s_blocks_count_hi", "I"),
)

#: ``struct ext4_group_desc``: 32 bytes, 64 with the ``64bit`` feature (the ``_hi`` halves).
GROUP_DESC_FIELDS: Fields = (
    ("bg_block_bitmap_lo", "I"),
    ("bg_inode_bitmap_lo", "I"),
    ("bg_inode_table_lo", "I"),
    ("bg_free_blocks_count_lo", "H"),
    ("bg_free_inodes_count_lo", "H"),
    ("bg_used_dirs_count_lo", "H"),
    ("bg_flags", "H"),
    ("bg_exclude_bitmap_lo", "I"),
    ("bg_block_bitmap_csum_lo", "H"),
    ("bg_inode_bitmap_csum_lo", "H"),
    ("bg_itable_unused_lo", "H"),
    ("bg_checksum", "H"),
    ("bg_block_bitmap_hi", "I"),
    ("bg_inode_bitmap_hi", "I"),
    ("bg_inode_table_hi", "I"),
    ("bg_free_blocks_count_hi", "H"),
    ("bg_free_inodes_count_hi", "H"),
    ("bg_used_dirs_count_hi", "H"),
    ("bg_itable_unused_hi", "H"),
    ("bg_exclude_bitmap_hi", "I"),
    ("bg_block_bitmap_csum_hi", "H"),
    ("bg_inode_bitmap_csum_hi", "H"),
    ("bg_reserved", "I"),
)
GROUP_DESC_SIZE = 32
GROUP_DESC_SIZE_64BIT = 64

#: ``struct ext4_inode``, its first 128 bytes (larger inodes carry extra fields after them).
INODE_FIELDS: Fields = (
    ("i_mode", "H"),
    ("i_uid", "H"),
    ("i_size_lo", "I"),
    ("i_atime", "I"),
    ("i_ctime", "I"),
    ("i_mtime", "I"),
    ("i_dtime", "I"),
    ("i_gid", "H"),
    ("i_links_count", "H"),
    ("i_blocks_lo", "I"),
    ("i_flags", "I"),
    ("i_osd1", "I"),
    ("i_block", "60s"),  # an extent tree root (with EXTENTS_FL), or block map / inline data
    ("i_generation", "I"),
    ("i_file_acl_lo", "I"),
    ("i_size_high", "I"),
    ("i_obso_faddr", "I"),
    ("i_osd2", "12s"),
)

#: ``struct ext4_extent_header``: the start of every extent tree node.
EXTENT_HEADER_FIELDS: Fields = (
    ("eh_magic", "H"),
    ("eh_entries", "H"),
    ("eh_max", "H"),
    ("eh_depth", "H"),
    ("eh_generation", "I"),
)
#: ``struct ext4_extent``: an entry of a leaf node (``eh_depth`` 0).
EXTENT_FIELDS: Fields = (
    ("ee_block", "I"),
    ("ee_len", "H"),
    ("ee_start_hi", "H"),
    ("ee_start_lo", "I"),
)
#: ``struct ext4_extent_idx``: an entry of an index node, pointing at the node one level down.
EXTENT_IDX_FIELDS: Fields = (
    ("ei_block", "I"),
    ("ei_leaf_lo", "I"),
    ("ei_leaf_hi", "H"),
    ("ei_unused", "H"),
)


def _struct(fields: Fields) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _, code in fields))


def _offsets(fields: Fields) -> dict[str, int]:
    out, at = {}, 0
    for name, code in fields:
        out[name] = at
        at += struct.calcsize("<" + code)
    return out


def _dtype(fields: Fields, itemsize: int) -> np.dtype:
    """A numpy record of ``itemsize`` bytes holding the declared fields that fit in it."""
    names, formats, offsets = [], [], []
    where = _offsets(fields)
    for name, code in fields:
        at = where[name]
        width = struct.calcsize("<" + code)
        if at + width > itemsize:
            break
        names.append(name)
        formats.append(f"V{width}" if code.endswith("s") else np.dtype("<" + code))
        offsets.append(at)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize})


SUPERBLOCK_STRUCT = _struct(SUPERBLOCK_FIELDS)
EXTENT_HEADER_STRUCT = _struct(EXTENT_HEADER_FIELDS)
EXTENT_STRUCT = _struct(EXTENT_FIELDS)
EXTENT_IDX_STRUCT = _struct(EXTENT_IDX_FIELDS)
assert SUPERBLOCK_STRUCT.size == 0x154
assert EXTENT_HEADER_STRUCT.size == EXTENT_STRUCT.size == EXTENT_IDX_STRUCT.size == 12
assert _struct(GROUP_DESC_FIELDS).size == GROUP_DESC_SIZE_64BIT
assert _offsets(GROUP_DESC_FIELDS)["bg_block_bitmap_hi"] == GROUP_DESC_SIZE
assert _struct(INODE_FIELDS).size == MIN_INODE_SIZE
_SB_NAMES = tuple(name for name, _ in SUPERBLOCK_FIELDS)


# -- superblock ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Superblock:
    """The superblock fields that locate the metadata, validated (see :meth:`parse`)."""

    block_size: int
    blocks_count: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    feature_incompat: int
    feature_ro_compat: int
    #: ``s_journal_inum``: the inode of an internal journal (0: none)
    journal_inum: int = 0

    @classmethod
    def parse(cls, raw: bytes, *, path: str | None = None) -> Superblock:
        """The superblock in ``raw`` (its 1024 bytes, read at :data:`SUPERBLOCK_OFFSET`)."""
        if len(raw) < SUPERBLOCK_STRUCT.size:
            raise TruncatedError(
                f"{len(raw)} bytes, the superblock needs {SUPERBLOCK_STRUCT.size}",
                path=path,
                field="superblock",
            )
        f = dict(zip(_SB_NAMES, SUPERBLOCK_STRUCT.unpack_from(raw), strict=True))

        def bad(name: str, why: str, error: type[FormatError] | type[UnsupportedError] = FormatError) -> None:
            raise error(why, path=path, field=f"superblock.{name}", value=f[name])

        if f["s_magic"] != EXT4_MAGIC:
            bad("s_magic", "not an ext2/3/4 file system")
        if f["s_log_block_size"] > MAX_LOG_BLOCK_SIZE:
            bad("s_log_block_size", f"more than {MAX_LOG_BLOCK_SIZE} (blocks of 64 KiB)")
        block_size = 1024 << f["s_log_block_size"]
        if not f["s_blocks_per_group"]:
            bad("s_blocks_per_group", "zero")
        if not f["s_inodes_per_group"]:
            bad("s_inodes_per_group", "zero")
        isz = f["s_inode_size"]
        if isz < MIN_INODE_SIZE or isz > block_size or isz & (isz - 1):
            bad("s_inode_size", f"not a power of two from {MIN_INODE_SIZE} to the block size {block_size}")
        incompat = f["s_feature_incompat"]
        blocks = f["s_blocks_count_lo"]
        desc_size = GROUP_DESC_SIZE
        if incompat & INCOMPAT_64BIT:
            blocks |= f["s_blocks_count_hi"] << 32
            desc_size = f["s_desc_size"] or GROUP_DESC_SIZE
            if desc_size not in (GROUP_DESC_SIZE, GROUP_DESC_SIZE_64BIT):
                bad("s_desc_size", "group descriptors other than 32 or 64 bytes", UnsupportedError)
        if f["s_first_data_block"] >= blocks:
            bad("s_first_data_block", f"not below s_blocks_count {blocks}")
        return cls(
            block_size=block_size,
            blocks_count=blocks,
            first_data_block=f["s_first_data_block"],
            blocks_per_group=f["s_blocks_per_group"],
            inodes_per_group=f["s_inodes_per_group"],
            inode_size=isz,
            desc_size=desc_size,
            feature_incompat=incompat,
            feature_ro_compat=f["s_feature_ro_compat"],
            journal_inum=f["s_journal_inum"],
        )

    @property
    def groups(self) -> int:
        return -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)

    @property
    def size(self) -> int:
        """Bytes of the device the file system spans."""
        return self.blocks_count * self.block_size

    @property
    def meta_bg(self) -> bool:
        """Group descriptors are spread over the meta block groups instead of following the superblock."""
        return bool(self.feature_incompat & INCOMPAT_META_BG)

    @property
    def group_desc_offset(self) -> int:
        """Byte offset of the group descriptor table (the block after the superblock's; not meta_bg)."""
        return (self.first_data_block + 1) * self.block_size

    def backup_groups(self, limit: int = 64) -> list[int]:
        """Groups after group 0 that hold a backup superblock (at their first block): with
        ``sparse_super`` groups 1 and the powers of 3, 5 and 7, else every group (at most ``limit``)."""
        groups = self.groups
        if not self.feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return list(range(1, min(groups, limit + 1)))
        found = {1} if groups > 1 else set()
        for base in (3, 5, 7):
            g = base
            while g < groups:
                found.add(g)
                g *= base
        return sorted(found)[:limit]

    def group_offset(self, group: int) -> int:
        """Byte offset of the first block of ``group``."""
        return (self.first_data_block + group * self.blocks_per_group) * self.block_size

    @property
    def group_csum(self) -> bool:
        """Group descriptors carry checksums, so ``bg_flags`` and ``bg_itable_unused`` can be trusted."""
        return bool(self.feature_ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))


# -- group descriptors and inode tables ------------------------------------------------------------


@dataclass(frozen=True)
class GroupDescriptors:
    """Columns of a group descriptor table: one entry per block group."""

    inode_table: np.ndarray  # block number of the group's inode table
    flags: np.ndarray  # bg_flags
    itable_unused: np.ndarray  # inodes at the end of the table never used

    @classmethod
    def parse(cls, raw: bytes, sb: Superblock, *, path: str | None = None) -> GroupDescriptors:
        """The table of ``sb.groups`` descriptors of ``sb.desc_size`` bytes at the start of ``raw``."""
        need = sb.groups * sb.desc_size
        if len(raw) < need:
            raise TruncatedError(
                f"{len(raw)} bytes, {sb.groups} group descriptors need {need}", path=path, field="group_desc"
            )
        gd = np.frombuffer(raw, dtype=_dtype(GROUP_DESC_FIELDS, sb.desc_size), count=sb.groups)
        itable = gd["bg_inode_table_lo"].astype(np.uint64)
        unused = gd["bg_itable_unused_lo"].astype(np.uint32)
        if sb.desc_size >= GROUP_DESC_SIZE_64BIT:
            itable |= gd["bg_inode_table_hi"].astype(np.uint64) << np.uint64(32)
            unused |= gd["bg_itable_unused_hi"].astype(np.uint32) << np.uint32(16)
        return cls(itable, gd["bg_flags"].copy(), unused)


def inode_dtype(inode_size: int) -> np.dtype:
    """One inode table record of ``inode_size`` bytes (``i_mode``, ``i_flags``, ``i_block``...)."""
    if inode_size < MIN_INODE_SIZE:
        raise FormatError(f"less than {MIN_INODE_SIZE}", field="superblock.s_inode_size", value=inode_size)
    return _dtype(INODE_FIELDS, inode_size)


def parse_inodes(raw: bytes, inode_size: int, *, path: str | None = None) -> np.ndarray:
    """The inode records in ``raw`` (a run of an inode table) as a numpy record array."""
    if len(raw) % inode_size:
        raise TruncatedError(
            f"{len(raw)} bytes are not whole {inode_size}-byte inodes", path=path, field="inode_table"
        )
    return np.frombuffer(raw, dtype=inode_dtype(inode_size))


# -- extent trees ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """A leaf entry: ``length`` blocks from logical block ``block`` are at physical block ``start``."""

    block: int
    length: int
    start: int
    uninitialized: bool  # allocated but reading as zeros


@dataclass(frozen=True)
class ExtentNode:
    """One node of an extent tree: leaf extents (``depth`` 0) or the blocks of the nodes below."""

    depth: int
    extents: list[Extent]
    children: list[int]

    @classmethod
    def parse(cls, node: bytes, *, path: str | None = None) -> ExtentNode:
        """A node: an inode's 60-byte ``i_block`` or a whole tree block."""
        if len(node) < EXTENT_HEADER_STRUCT.size:
            raise TruncatedError(f"{len(node)} bytes", path=path, field="extent_header")
        magic, entries, _max, depth, _gen = EXTENT_HEADER_STRUCT.unpack_from(node)
        if magic != EXTENT_MAGIC:
            raise FormatError(
                "not an extent tree node", path=path, field="extent_header.eh_magic", value=magic
            )
        room = (len(node) - EXTENT_HEADER_STRUCT.size) // EXTENT_STRUCT.size
        if entries > room:
            raise FormatError(
                f"more entries than the {room} the node holds",
                path=path,
                field="extent_header.eh_entries",
                value=entries,
            )
        at = range(EXTENT_HEADER_STRUCT.size, EXTENT_HEADER_STRUCT.size + entries * EXTENT_STRUCT.size, 12)
        if depth == 0:
            extents = []
            for o in at:
                block, length, start_hi, start_lo = EXTENT_STRUCT.unpack_from(node, o)
                uninit = length > EXT_INIT_MAX_LEN
                extents.append(
                    Extent(
                        block,
                        length - EXT_INIT_MAX_LEN if uninit else length,
                        start_hi << 32 | start_lo,
                        uninit,
                    )
                )
            return cls(0, extents, [])
        children = []
        for o in at:
            _block, leaf_lo, leaf_hi, _unused = EXTENT_IDX_STRUCT.unpack_from(node, o)
            children.append(leaf_hi << 32 | leaf_lo)
        return cls(depth, [], children)


__all__ = [
    "BG_INODE_UNINIT",
    "EXT4_MAGIC",
    "EXTENTS_FL",
    "EXTENT_MAGIC",
    "INLINE_DATA_FL",
    "SUPERBLOCK_OFFSET",
    "SUPERBLOCK_SIZE",
    "S_IFDIR",
    "S_IFMT",
    "Extent",
    "ExtentNode",
    "GroupDescriptors",
    "Superblock",
    "inode_dtype",
    "parse_inodes",
]
