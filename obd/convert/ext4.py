"""Applying a layer tar to an ext4 image the way overlaybd-apply does, through one debugfs session.

The file system is modelled lazily: a directory of the image is listed (``ls -p``) only when the
layer touches a path below it, and a subtree only when the layer removes it. Planning walks the
entries in archive order against that model and produces debugfs commands; nothing is sent until the
whole layer has been planned, so every query sees the image as it was before the layer and any error
found while planning leaves the image untouched.

Semantics (docs/formats.md §9, overlaybd ``UnTar``):

* missing parent directories are created (mode 0755, owner 0:0); a parent that exists but is not a
  directory — a symlink included: nothing is ever followed — is an error, as in overlaybd;
* ``<dir>/.wh.<name>`` removes ``<dir>/<name>`` recursively and ``<dir>/.wh..wh..opq`` empties
  ``<dir>``, sparing whatever this layer itself unpacked (whiteouts only hide lower layers); the
  markers are never created, and a whiteout in a directory that does not exist does nothing;
* an entry over an existing non-directory replaces it; a non-directory over a directory removes the
  directory recursively; a directory over a directory only takes the new mode, owner and times;
* a hard link entry re-applies its own mode, owner and times to the shared inode (overlaybd's quirk,
  kept on purpose: ``bin/tool`` of the fixture layer ends up 0644 because its link says so);
* directory times are set after every entry, as ``extract_all`` does.

Every new inode gets the entry's owner, mode, times (atime = mtime = ctime = crtime) and
``SCHILY.xattr`` attributes; ``E2FSPROGS_FAKE_TIME`` pins everything else libext2fs stamps, so the same
image and tar always give the same bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from obd.convert.debugfs import Debugfs, Ext4Error, find_tool, quote, run_tool
from obd.convert.layertar import BLK, CHR, DIR, FIFO, FILE, HARDLINK, SYMLINK, ParsedLayer, TarEntry
from obd.errors import FormatError

ROOT_INO = 2
SOCK = "sock"
_KIND_OF_TYPE = {
    0o040000: DIR,
    0o100000: FILE,
    0o120000: SYMLINK,
    0o020000: CHR,
    0o060000: BLK,
    0o010000: FIFO,
    0o140000: SOCK,
}
_TYPE_OF_KIND = {v: k for k, v in _KIND_OF_TYPE.items()}
OPAQUE = b".wh..wh..opq"
WHITEOUT = b".wh."
WHITEOUT_META = b".wh..wh."


class _Inode:
    """Link-count bookkeeping for one inode: ``nlink`` is None for a lower inode not queried yet,
    and ``delta`` counts the names removed from it meanwhile."""

    __slots__ = ("delta", "ino", "nlink")

    def __init__(self, ino: int | None = None, nlink: int | None = None):
        self.ino = ino
        self.nlink = nlink
        self.delta = 0


class FsNode:
    """One name in the model: its kind, its inode, and for a directory its (lazily listed) children.

    ``new`` marks paths this layer unpacked: whiteouts and opaque markers spare them.
    """

    __slots__ = ("children", "inode", "kind", "new")

    def __init__(self, kind: str, inode: _Inode, *, new: bool, children: dict[bytes, FsNode] | None = None):
        self.kind = kind
        self.inode = inode
        self.new = new
        self.children = children


@dataclass
class ApplyStats:
    """What applying one layer did."""

    entries: int = 0
    created: int = 0
    replaced: int = 0
    removed: int = 0
    whiteouts: int = 0
    listed_dirs: int = 0
    commands: int = 0
    plan_seconds: float = 0.0
    write_seconds: float = 0.0


def debugfs_path(parts: Sequence[bytes]) -> bytes:
    """An absolute debugfs path. A top-level name is written ``/./name``: debugfs' ``rm`` and
    ``rmdir`` cut a path at its last slash, and an empty directory part would mean the cwd."""
    if len(parts) == 1:
        return b"/./" + parts[0]
    return b"/" + b"/".join(parts)


def _show(parts: Sequence[bytes]) -> str:
    return "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in parts)


def _time_arg(t: int) -> bytes:
    # debugfs reads "@-1" as its own parse-error value; one second does not matter there
    return b"@%d" % (0 if t == -1 else t)


class LayerApplier:
    """Plans one layer against an image and runs the plan through ``fs`` (a writable session)."""

    def __init__(self, fs: Debugfs, layer: ParsedLayer, spool_dir: str, *, epoch: int):
        self.fs = fs
        self.layer = layer
        self.spool = spool_dir
        self.epoch = epoch
        self.inodes: dict[int, _Inode] = {}
        self.root = FsNode(DIR, self._lower_inode(ROOT_INO), new=False)
        self.cmds: list[bytes] = []
        self.stats = ApplyStats()
        self._cwd: tuple[bytes, ...] | None = None
        self._dir_times: list[tuple[tuple[bytes, ...], FsNode, int]] = []
        self._xattr_files = 0

    # -- the lower file system, listed on demand ---------------------------------------------------

    def _lower_inode(self, ino: int) -> _Inode:
        node = self.inodes.get(ino)
        if node is None:
            node = self.inodes[ino] = _Inode(ino)
        return node

    def _load(self, dirs: Sequence[FsNode]) -> None:
        todo = [d for d in dirs if d.children is None]
        if not todo:
            return
        listings = self.fs.listdirs([d.inode.ino for d in todo])  # type: ignore[misc]
        self.stats.listed_dirs += len(todo)
        for d, entries in zip(todo, listings, strict=True):
            children: dict[bytes, FsNode] = {}
            for name, ino, mode in entries:
                kind = _KIND_OF_TYPE.get(mode & 0o170000)
                if kind is None:
                    raise Ext4Error(f"inode {ino} ({name!r}) has an unknown type, mode {mode:o}")
                children[name] = FsNode(kind, self._lower_inode(ino), new=False)
            d.children = children

    def _children(self, node: FsNode) -> dict[bytes, FsNode]:
        if node.children is None:
            self._load([node])
        assert node.children is not None
        return node.children

    def _load_subtree(self, node: FsNode) -> None:
        level = [node]
        while level:
            self._load(level)
            level = [c for d in level for c in (d.children or {}).values() if c.kind == DIR]

    def _prefetch(self, entries: Sequence[TarEntry]) -> None:
        """List, level by level, every lower directory on the way to a path the layer names."""
        wanted: dict[tuple[bytes, ...], set[bytes]] = {}
        for e in entries:
            for target in (e.parts, e.link.split(b"/") if e.kind == HARDLINK else ()):
                for i in range(len(target) - 1):
                    wanted.setdefault(tuple(target[:i]), set()).add(target[i])
                if len(target):
                    wanted.setdefault(tuple(target[:-1]), set())
        level: list[tuple[tuple[bytes, ...], FsNode]] = [((), self.root)]
        while level:
            self._load([n for _, n in level])
            nxt = []
            for parts, node in level:
                for name in wanted.get(parts, ()):
                    child = (node.children or {}).get(name)
                    if child is not None and child.kind == DIR and (*parts, name) in wanted:
                        nxt.append(((*parts, name), child))
            level = nxt
        # link counts of the lower inodes hard links will point at
        targets = []
        for e in entries:
            if e.kind == HARDLINK:
                linked = self._find(tuple(e.link.split(b"/")), load=False)
                if linked is not None and not linked.new and linked.inode.nlink is None:
                    targets.append(linked.inode)
        if targets:
            unique = list({id(i): i for i in targets}.values())
            for inode, n in zip(unique, self.fs.links([i.ino for i in unique]), strict=True):  # type: ignore[misc]  # lower inodes have numbers
                inode.nlink = n

    def _nlink(self, inode: _Inode) -> int:
        if inode.nlink is None:
            inode.nlink = self.fs.links([inode.ino])[0]  # type: ignore[list-item]
        return inode.nlink + inode.delta

    def _find(self, parts: tuple[bytes, ...], *, load: bool = True) -> FsNode | None:
        node = self.root
        for name in parts:
            if node.kind != DIR:
                return None
            if node.children is None and not load:
                return None
            node = self._children(node).get(name)  # type: ignore[assignment]
            if node is None:
                return None
        return node

    # -- command emission --------------------------------------------------------------------------

    def _emit(self, *words: bytes) -> None:
        self.cmds.append(b" ".join(words))

    def _cd(self, parts: tuple[bytes, ...]) -> None:
        if self._cwd != parts:
            self._emit(b"cd", quote(debugfs_path(parts)))
            self._cwd = parts

    def _sif(self, parts: tuple[bytes, ...], field: bytes, value: bytes) -> None:
        self._emit(b"sif", quote(debugfs_path(parts)), field, value)

    def _times(self, parts: tuple[bytes, ...], t: int) -> None:
        arg = _time_arg(t)
        for field in (b"atime", b"mtime", b"ctime", b"crtime"):
            self._sif(parts, field, arg)

    def _owner_mode(self, parts: tuple[bytes, ...], kind: str, e: TarEntry, *, mode: bool = True) -> None:
        if mode and kind != SYMLINK:
            self._sif(parts, b"mode", b"0%o" % (_TYPE_OF_KIND[kind] | e.mode))
        self._sif(parts, b"uid", b"%d" % e.uid)
        self._sif(parts, b"gid", b"%d" % e.gid)

    def _xattrs(self, parts: tuple[bytes, ...], e: TarEntry) -> None:
        for name, value in e.xattrs.items():
            self._xattr_files += 1
            path = os.path.join(self.spool, f"x{self._xattr_files}")
            with open(path, "wb") as f:
                f.write(value)
            self._emit(b"ea_set", b"-f", quote(os.fsencode(path)), quote(debugfs_path(parts)), quote(name))

    # -- removal -----------------------------------------------------------------------------------

    def _unlink(self, parts: tuple[bytes, ...], parent: FsNode, name: bytes, node: FsNode) -> None:
        self._emit(b"rm", quote(debugfs_path(parts)))
        if node.inode.nlink is None:
            node.inode.delta -= 1
        else:
            node.inode.nlink -= 1
        del parent.children[name]  # type: ignore[union-attr]
        self.stats.removed += 1

    def _remove(
        self, parts: tuple[bytes, ...], parent: FsNode, name: bytes, node: FsNode, *, lower_only: bool
    ) -> None:
        """Remove ``node`` and what is below it; with ``lower_only`` spare what this layer unpacked."""
        if node.kind != DIR:
            if not (lower_only and node.new):
                self._unlink(parts, parent, name, node)
            return
        self._load_subtree(node)
        for cname, child in list(self._children(node).items()):
            self._remove((*parts, cname), node, cname, child, lower_only=lower_only)
        if (lower_only and node.new) or node.children:
            return
        self._emit(b"rmdir", quote(debugfs_path(parts)))
        self._cwd = None  # the session's cwd may have been inside it
        del parent.children[name]  # type: ignore[union-attr]
        self.stats.removed += 1

    # -- entries -----------------------------------------------------------------------------------

    def _parent(self, e: TarEntry) -> FsNode:
        """The directory an entry goes into, created with its ancestors as needed."""
        node = self.root
        parts = e.parts
        for i, name in enumerate(parts[:-1]):
            children = self._children(node)
            child = children.get(name)
            if child is None:
                here = parts[: i + 1]
                self._cd(parts[:i])
                self._emit(b"mkdir", quote(name))
                self._sif(here, b"mode", b"040755")
                self._times(here, self.epoch)
                child = children[name] = FsNode(DIR, _Inode(nlink=2), new=True, children={})
                self.stats.created += 1
            elif child.kind != DIR:
                raise FormatError(
                    f"{e.display}: parent {_show(parts[: i + 1])} is a {child.kind}, not a directory "
                    "(overlaybd-apply refuses this too; nothing is followed)",
                    path=self.layer.name,
                    field=f"entry[{e.index}].name",
                )
            node = child
        return node

    def _whiteout(self, e: TarEntry) -> None:
        self.stats.whiteouts += 1
        parts = e.parts
        marker = parts[-1]
        parent = self._find(parts[:-1])
        if parent is None or parent.kind != DIR:
            return  # nothing below to hide
        if marker == OPAQUE:
            for cname, cnode in list(self._children(parent).items()):
                self._remove((*parts[:-1], cname), parent, cname, cnode, lower_only=True)
            return
        if marker.startswith(WHITEOUT_META):
            return  # reserved for other markers; docker ignores them too
        name = marker[len(WHITEOUT) :]
        if name in (b"", b".", b".."):
            raise FormatError(
                f"{e.display}: whiteout of nothing", path=self.layer.name, field=f"entry[{e.index}].name"
            )
        child = self._children(parent).get(name)
        if child is not None:
            self._remove((*parts[:-1], name), parent, name, child, lower_only=True)

    def apply_entry(self, e: TarEntry) -> None:
        self.stats.entries += 1
        parts = e.parts
        if not parts:
            if e.kind != DIR:
                raise FormatError(
                    f"the root entry is a {e.kind}, not a directory",
                    path=self.layer.name,
                    field=f"entry[{e.index}]",
                )
            self._owner_mode((), DIR, e)
            self._xattrs((), e)
            self.root.new = True
            self._dir_times.append(((), self.root, e.mtime))
            return
        if parts[-1].startswith(WHITEOUT):
            self._whiteout(e)
            return
        parent = self._parent(e)
        name = parts[-1]
        children = self._children(parent)
        existing = children.get(name)
        if existing is not None:
            if existing.kind == DIR and e.kind == DIR:
                existing.new = True
                self._owner_mode(parts, DIR, e)
                self._xattrs(parts, e)
                self._dir_times.append((parts, existing, e.mtime))
                return
            self.stats.replaced += 1
            self._remove(parts, parent, name, existing, lower_only=False)
        if e.kind == HARDLINK:
            self._hardlink(e, parts, parent)
            return
        self._cd(parts[:-1])
        q = quote(name)
        if e.kind == FILE:
            assert e.data is not None
            self._emit(b"write", quote(os.fsencode(e.data)), q)
        elif e.kind == DIR:
            self._emit(b"mkdir", q)
        elif e.kind == SYMLINK:
            self._emit(b"symlink", q, quote(e.link))
        elif e.kind == FIFO:
            self._emit(b"mknod", q, b"p")
        elif e.kind in (CHR, BLK):
            self._emit(b"mknod", q, b"c" if e.kind == CHR else b"b", b"%d" % e.devmajor, b"%d" % e.devminor)
        else:  # pragma: no cover - the tar reader admits no other kind
            raise AssertionError(e.kind)
        node = FsNode(e.kind, _Inode(nlink=2 if e.kind == DIR else 1), new=True)
        if e.kind == DIR:
            node.children = {}
        children[name] = node
        self.stats.created += 1
        self._owner_mode(parts, e.kind, e)
        self._xattrs(parts, e)
        if e.kind == DIR:
            self._dir_times.append((parts, node, e.mtime))
        else:
            self._times(parts, e.mtime)

    def _hardlink(self, e: TarEntry, parts: tuple[bytes, ...], parent: FsNode) -> None:
        target_parts = tuple(e.link.split(b"/"))
        target = self._find(target_parts)
        if target is None:
            raise FormatError(
                f"{e.display}: hard link target /{e.link.decode('utf-8', 'backslashreplace')} does not exist",
                path=self.layer.name,
                field=f"entry[{e.index}].linkname",
            )
        if target.kind == DIR:
            raise FormatError(
                f"{e.display}: hard link to a directory",
                path=self.layer.name,
                field=f"entry[{e.index}].linkname",
            )
        name = parts[-1]
        self._cd(parts[:-1])
        q = quote(name)
        # debugfs' ln does not grow a full directory; a placeholder made and removed first leaves
        # exactly the room the new name needs
        self._emit(b"mknod", q, b"p")
        self._emit(b"rm", quote(debugfs_path(parts)))
        self._emit(b"ln", quote(debugfs_path(target_parts)), q)
        links = self._nlink(target.inode) + 1
        target.inode.nlink, target.inode.delta = links, 0
        self._sif(parts, b"links_count", b"%d" % links)
        # overlaybd re-applies the link entry's own metadata to the shared inode
        self._owner_mode(parts, target.kind, e)
        self._times(parts, e.mtime)
        self._xattrs(parts, e)
        self._children(parent)[name] = FsNode(target.kind, target.inode, new=True)
        self.stats.created += 1

    # -- running -----------------------------------------------------------------------------------

    def plan(self) -> list[bytes]:
        t0 = time.monotonic()
        self._prefetch(self.layer.entries)
        for e in self.layer.entries:
            self.apply_entry(e)
        for parts, node, t in self._dir_times:
            if self._find(parts) is node:  # not replaced later in the layer
                self._times(parts, t)
        self.stats.commands = len(self.cmds)
        self.stats.plan_seconds = time.monotonic() - t0
        return self.cmds

    def run(self) -> ApplyStats:
        cmds = self.plan()
        t0 = time.monotonic()
        self.fs.execute(cmds)
        self.stats.write_seconds = time.monotonic() - t0
        return self.stats


def apply_layer(
    image: str | os.PathLike[str], layer: ParsedLayer, spool_dir: str, *, epoch: int | None = None
) -> ApplyStats:
    """Apply a parsed layer tar to the ext4 file system in the raw image file ``image``.

    ``epoch`` (default: the newest mtime in the layer) is what libext2fs stamps where the tar says
    nothing (superblock write time, implicit parent directories).
    """
    stamp = max(1, layer.max_mtime if epoch is None else epoch)
    fs = Debugfs(image, writable=True, epoch=stamp)
    try:
        stats = LayerApplier(fs, layer, spool_dir, epoch=stamp).run()
    except BaseException:
        fs.abort()
        raise
    fs.close()
    return stats


#: mke2fs settings of overlaybd's base layer (MANIFEST §3): 4 KiB blocks, 256-byte inodes, one inode
#: per 16 KiB, and exactly its feature list, whatever this host's /etc/mke2fs.conf prefers.
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 5.0
\tlazy_itable_init = 1

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,uninit_bg,64bit,dir_nlink,extra_isize
\t\tinode_size = 256
\t}
"""


#: The journal takes at most this share of a small file system (mke2fs refuses one over half of it):
#: 512 MiB from 4 GiB up, 128 MiB on a 1 GiB device.
JOURNAL_SHARE = 8
#: The smallest journal mke2fs makes (1024 blocks of 4 KiB); the device must hold JOURNAL_SHARE of them.
MIN_JOURNAL_MIB = 4
MIN_MKFS_SIZE = JOURNAL_SHARE * MIN_JOURNAL_MIB << 20


def mkfs_ext4(
    image: str | os.PathLike[str], size: int, *, uuid: str, epoch: int = 1, journal_mib: int = 512
) -> None:
    """Make a fresh ext4 file system filling the sparse file ``image`` of ``size`` bytes.

    Features match the base layer's; the file system uuid and directory hash seed are ``uuid`` and
    timestamps ``epoch``, so the result is the same bytes every time. Inode tables and the journal
    are left unwritten (they read as zeros from the sparse file, which is what they must hold).
    The journal is ``journal_mib`` MiB, or 1/:data:`JOURNAL_SHARE` of a device too small for that.
    """
    if size < MIN_MKFS_SIZE:
        raise Ext4Error(
            f"a device of {size} bytes is too small for an ext4 file system with a journal: "
            f"mkfs needs at least {MIN_MKFS_SIZE >> 20} MiB",
            field="vsize",
            value=size,
        )
    journal_mib = min(journal_mib, (size >> 20) // JOURNAL_SHARE)
    path = os.fspath(image)
    with open(path, "wb") as f:
        f.truncate(size)
    conf = path + ".mke2fs.conf"
    with open(conf, "w", encoding="ascii") as f:
        f.write(MKE2FS_CONF)
    try:
        run_tool(
            [
                find_tool("mke2fs"),
                "-q",
                "-F",
                "-t",
                "ext4",
                "-U",
                uuid,
                "-E",
                f"hash_seed={uuid},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                "-J",
                f"size={journal_mib}",
                path,
                str(size // 1024) + "k",
            ],
            env={"MKE2FS_CONFIG": conf, "E2FSPROGS_FAKE_TIME": str(max(1, epoch))},
        )
    finally:
        os.unlink(conf)


def fsck(image: str | os.PathLike[str]) -> None:
    """``e2fsck -fn``: raise :class:`Ext4Error` with its report unless the file system is clean."""
    run_tool([find_tool("e2fsck"), "-fn", os.fspath(image)])


__all__ = ["ApplyStats", "LayerApplier", "apply_layer", "fsck", "mkfs_ext4"]
