"""Prefetch what starting a program reads from an ext4 root, without a trace.

A container's first command is named by its image config (``Entrypoint``/``Cmd``, looked up in the
config's ``PATH``). Starting it, the guest kernel resolves its path (one directory and one inode
table block per component, symlinks followed), reads the ELF headers, then the dynamic loader named
by ``PT_INTERP`` maps itself and every ``DT_NEEDED`` library, found in the usual library
directories. All of that is a chain of dependent reads — each waits a round trip on a lazily fetched
disk — yet all of it can be found from the file system alone. :func:`startup_ranges` walks it the
way the kernel and ``ld.so`` would and returns the byte ranges (metadata, then the first
:data:`FILE_HEAD` of the program, the loader, each library and the :data:`COMMON_FILES` that start
most programs, then the rest of each of those files up to :data:`FILE_MAX`), which the server
reads concurrently while the guest kernel boots. Whole files, because a program's start pages most
of its text in through the guest's 128 KiB read-around, one dependent round trip each (python3.11:
40 round trips for 4.1 of its 6.6 MB), while the link is idle during the kernel's boot.

A prefetch is an optimisation: anything unexpected (not ext4, a path that does not resolve, a
corrupt field, not a 64-bit little-endian ELF) ends that part of the walk with what was found. The
ext4 structures are :mod:`obd.formats.ext4`'s; the directory entry and ELF structures used here
are declared below.
"""

from __future__ import annotations

import contextlib
import posixpath
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from obd.errors import ObdError
from obd.formats.ext4 import (
    EXTENTS_FL,
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
from obd.prefetch.ext4 import MAX_DEPTH, PrefetchResult, _merge

#: ``struct ext4_dir_entry_2`` without its name: inode, rec_len, name_len, file_type.
DIRENT = struct.Struct("<IHBB")
#: ``Elf64_Ehdr``: e_ident, e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
#: e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
#: ``Elf64_Phdr``: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
#: ``Elf64_Dyn``: d_tag, d_val.
ELF64_DYN = struct.Struct("<qQ")
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5

S_IFLNK = 0o120000
S_IFREG = 0o100000
ROOT_INODE = 2
#: Symlinks followed in one lookup (Linux's limit).
MAX_SYMLINKS = 40
#: Bytes of a program, loader or library read first: headers, dynamic section and first code pages.
FILE_HEAD = 1 << 20
#: Bytes of each such file read in all (the rest after every file's head).
FILE_MAX = 16 << 20
#: Never plan more than this many bytes.
DEFAULT_BUDGET = 32 << 20
#: A directory larger than this is not read (a huge or hostile file system).
MAX_DIRECTORY = 16 << 20
#: Libraries followed (DT_NEEDED of DT_NEEDED...).
MAX_LIBRARIES = 64
#: Where ``ld.so`` looks when neither ``LD_LIBRARY_PATH`` nor ``ld.so.cache`` says otherwise (glibc's
#: multiarch directories on Debian, then the traditional ones).
LIBRARY_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Small files read when nearly any program starts in a container, after its libraries: ld.so's
#: cache, what resolving the image's ``User`` and the time zone reads, glibc's locale and gconv
#: caches (``setlocale(LC_ALL, "")`` with a UTF-8 ``LANG``). Each is read up to :data:`FILE_HEAD`.
COMMON_FILES = (
    "/etc/ld.so.cache",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/usr/lib/locale/locale-archive",
    "/usr/lib/locale/C.utf8/LC_CTYPE",
    "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
    "/usr/lib/aarch64-linux-gnu/gconv/gconv-modules.cache",
)

Reader = Callable[[int, int], bytes]


def _quietly() -> contextlib.suppress:
    """An unexpected structure (a corrupt field, a short read) ends that part of the walk, silently."""
    return contextlib.suppress(ObdError, struct.error, ValueError)


class _Walk:
    """An ext4 file system read through ``read``, noting every byte range it reads in ``ranges``."""

    def __init__(self, read: Reader, size: int):
        self._read = read
        self.size = size
        self.ranges: list[tuple[int, int]] = []
        self.sb = Superblock.parse(self.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
        if self.sb.meta_bg or self.sb.size > size:
            raise ObdError("an ext4 layout this walk does not follow (meta_bg, or larger than the disk)")
        self.bs = self.sb.block_size
        gdt_len = self.sb.groups * self.sb.desc_size
        self.gdt = GroupDescriptors.parse(self.read(self.sb.group_desc_offset, gdt_len), self.sb)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ObdError("a read outside the disk", value=offset)
        self.ranges.append((offset, length))
        data = self._read(offset, length)
        if len(data) < length:
            raise ObdError("a short read", value=offset)
        return data

    def inode(self, ino: int) -> tuple[int, int, bytes]:
        """``(mode, size, i_block)`` of inode ``ino``; its whole inode table block is read (as the
        kernel does: the neighbours come along)."""
        group, index = divmod(ino - 1, self.sb.inodes_per_group)
        if ino < 1 or group >= len(self.gdt.inode_table):
            raise ObdError("inode number out of range", value=ino)
        at = int(self.gdt.inode_table[group]) * self.bs + index * self.sb.inode_size
        block = at - at % self.bs
        raw = self.read(block, self.bs)[at - block : at - block + self.sb.inode_size]
        rec = parse_inodes(raw, self.sb.inode_size)[0]
        size = int(rec["i_size_lo"]) | int(rec["i_size_high"]) << 32
        if not int(rec["i_flags"]) & EXTENTS_FL and int(rec["i_mode"]) & S_IFMT != S_IFLNK:
            raise ObdError("not an extent-mapped inode", value=ino)  # block maps: ext2/3 only
        return int(rec["i_mode"]), size, bytes(rec["i_block"])

    def extents(self, i_block: bytes) -> list[tuple[int, int, int]]:
        """``(logical byte, device byte, bytes)`` of a file's extents, index nodes read on the way."""
        out: list[tuple[int, int, int]] = []
        nodes = [i_block]
        for _ in range(MAX_DEPTH + 1):
            children: list[int] = []
            for raw in nodes:
                node = ExtentNode.parse(raw)
                out += [
                    (e.block * self.bs, e.start * self.bs, e.length * self.bs)
                    for e in node.extents
                    if not e.uninitialized and (e.start + e.length) * self.bs <= self.size
                ]
                children += node.children
            if not children:
                break
            nodes = [self.read(b * self.bs, self.bs) for b in children]
        return sorted(out)

    def file_range(self, i_block: bytes, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a file (holes read as zeros)."""
        out = bytearray(length)
        for logical, device, n in self.extents(i_block):
            lo, hi = max(offset, logical), min(offset + length, logical + n)
            if lo < hi:
                out[lo - offset : hi - offset] = self.read(device + lo - logical, hi - lo)
        return bytes(out)

    def file_ranges(self, i_block: bytes, length: int, start: int = 0) -> list[tuple[int, int]]:
        """Device ranges of bytes ``[start, length)`` of a file, without reading them here."""
        out = []
        for logical, device, n in self.extents(i_block):
            lo, hi = max(start, logical), min(length, logical + n)
            if lo < hi:
                out.append((device + lo - logical, hi - lo))
        return out

    def note_file(self, i_block: bytes, length: int, start: int = 0) -> None:
        """Plan bytes ``[start, length)`` of a file without reading them here."""
        self.ranges += self.file_ranges(i_block, length, start)

    def entries(self, i_block: bytes, size: int) -> dict[bytes, int]:
        """A directory's names → inode numbers (an htree's index blocks read as empty entries)."""
        if size > MAX_DIRECTORY:
            raise ObdError("directory too large to read for a prefetch", value=size)
        data = self.file_range(i_block, 0, size)
        names: dict[bytes, int] = {}
        pos = 0
        while pos + DIRENT.size <= len(data):
            ino, rec_len, name_len, _kind = DIRENT.unpack_from(data, pos)
            if rec_len < DIRENT.size or pos + rec_len > len(data):
                break
            if ino and name_len:
                names[data[pos + DIRENT.size : pos + DIRENT.size + name_len]] = ino
            pos += rec_len
        return names

    def lookup(self, path: str, cwd: str = "/") -> tuple[int, int, bytes] | None:
        """``(mode, size, i_block)`` of ``path`` (relative to ``cwd``), symlinks followed; None if absent."""
        todo = [c for c in posixpath.join(cwd, path).split("/") if c]
        stack: list[tuple[int, int, bytes]] = [self.inode(ROOT_INODE)]
        links = 0
        while todo:
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            mode, size, i_block = stack[-1]
            if mode & S_IFMT != S_IFDIR:
                return None
            ino = self.entries(i_block, size).get(part.encode())
            if ino is None:
                return None
            found = self.inode(ino)
            if found[0] & S_IFMT == S_IFLNK:
                links += 1
                if links > MAX_SYMLINKS:
                    return None
                target = self._link_target(*found)
                if target.startswith("/"):
                    stack = stack[:1]
                todo = [c for c in target.split("/") if c] + todo
                continue
            stack.append(found)
        return stack[-1]

    def _link_target(self, mode: int, size: int, i_block: bytes) -> str:
        if size < len(i_block) and not i_block.startswith(b"\x0a\xf3"):  # a fast symlink: in i_block
            return i_block[:size].decode("utf-8", "surrogateescape")
        return self.file_range(i_block, 0, size).decode("utf-8", "surrogateescape")


def elf_dependencies(head: bytes, read: Callable[[int, int], bytes]) -> tuple[str | None, list[str]]:
    """The ``PT_INTERP`` path and the ``DT_NEEDED`` names of a 64-bit little-endian ELF whose first
    bytes are ``head``; ``read(offset, length)`` reads the rest of the file. ``(None, [])`` for
    anything else (a script, a static or 32-bit binary)."""
    if len(head) < ELF64_HEADER.size or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None, []
    fields = ELF64_HEADER.unpack_from(head)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    if phentsize != ELF64_PHDR.size or phnum > 256:
        return None, []
    table = read(phoff, phnum * phentsize)
    phdrs = [ELF64_PHDR.unpack_from(table, i * phentsize) for i in range(phnum)]
    interp = None
    loads = [(p[3], p[2], p[5]) for p in phdrs if p[0] == PT_LOAD]  # vaddr, offset, filesz

    def offset_of(vaddr: int) -> int | None:
        for va, off, n in loads:
            if va <= vaddr < va + n:
                return off + vaddr - va
        return None

    needed: list[int] = []
    strtab = None
    for p_type, _flags, offset, _vaddr, _paddr, filesz, _memsz, _align in phdrs:
        if p_type == PT_INTERP and 0 < filesz <= 4096:
            interp = read(offset, filesz).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif p_type == PT_DYNAMIC and 0 < filesz <= 1 << 20:
            dyn = read(offset, filesz)
            for i in range(0, len(dyn) - ELF64_DYN.size + 1, ELF64_DYN.size):
                tag, value = ELF64_DYN.unpack_from(dyn, i)
                if tag == DT_NULL:
                    break
                if tag == DT_NEEDED:
                    needed.append(value)
                elif tag == DT_STRTAB:
                    strtab = offset_of(value)
    names = []
    if strtab is not None:
        for at in needed:
            raw = read(strtab + at, 256).split(b"\0", 1)[0]
            if raw:
                names.append(raw.decode("utf-8", "surrogateescape"))
    return interp, names


def startup_ranges(
    read: Reader,
    size: int,
    programs: Sequence[str],
    *,
    search_path: str = DEFAULT_PATH,
    workdir: str = "/",
    budget: int = DEFAULT_BUDGET,
    early: Callable[[list[tuple[int, int]]], None] | None = None,
) -> list[tuple[int, int]]:
    """Byte ranges of an ext4 device that starting ``programs`` reads: their paths (looked up in
    ``search_path`` when they hold no ``/``), ELF headers, dynamic loader and libraries, and
    ``workdir``. Empty if the device is not an ext4 file system this walk follows.

    ``early``, if given, is called with each file's head as soon as the walk finds the file, so
    that fetching it overlaps the rest of the walk (a chain of dependent reads); the returned
    ranges include those heads again."""
    try:
        fs = _Walk(read, size)
    except (ObdError, struct.error, ValueError):
        return []
    files: list[tuple[bytes, int]] = []  # (i_block, bytes to read ahead)
    seen: set[bytes] = set()

    def add(found: tuple[int, int, bytes] | None, limit: int) -> tuple[int, int, bytes] | None:
        if found is None or found[0] & S_IFMT != S_IFREG or found[2] in seen:
            return None
        seen.add(found[2])
        files.append((found[2], min(found[1], limit)))
        return found

    def send(found: tuple[int, int, bytes] | None) -> None:
        # only once the walk is done reading the file: its own reads would wait on the big fetch
        if early is not None and found is not None:
            with _quietly():
                early(fs.file_ranges(found[2], min(found[1], FILE_HEAD)))

    def elf(found: tuple[int, int, bytes]) -> tuple[str | None, list[str]]:
        i_block = found[2]
        head = fs.file_range(i_block, 0, min(found[1], 4096))

        def read_file(offset: int, length: int) -> bytes:
            return fs.file_range(i_block, offset, max(0, min(length, found[1] - offset)))

        return elf_dependencies(head, read_file)

    with _quietly():
        fs.lookup(workdir)
    libraries: list[str] = []
    for program in programs:
        with _quietly():
            dirs = [""] if "/" in program else [d or "." for d in search_path.split(":")]
            found = None
            for d in dirs:
                found = fs.lookup(posixpath.join(d, program) if d else program, workdir)
                if found is not None and found[0] & S_IFMT == S_IFREG:
                    break
            if add(found, FILE_MAX) is None:
                continue
            assert found is not None
            interp, needed = elf(found)
            send(found)
            if interp:
                send(add(fs.lookup(interp), FILE_MAX))
            libraries += needed
    done: set[str] = set()
    while libraries and len(done) < MAX_LIBRARIES:
        name = libraries.pop(0)
        if name in done:
            continue
        done.add(name)
        with _quietly():
            candidates = [name] if "/" in name else [posixpath.join(d, name) for d in LIBRARY_DIRS]
            for path in candidates:
                lib = fs.lookup(path)
                if lib is not None and lib[0] & S_IFMT == S_IFREG:
                    if add(lib, FILE_MAX) is not None:
                        libraries += elf(lib)[1]
                        send(lib)
                    break
    for path in COMMON_FILES if files else ():
        with _quietly():
            send(add(fs.lookup(path), FILE_HEAD))
    spent = sum(n for _, n in fs.ranges)
    heads = len(fs.ranges)
    for start, stop in ((0, FILE_HEAD), (FILE_HEAD, None)):  # every head first, then the rest
        for i_block, limit in files:
            with _quietly():
                before = len(fs.ranges)
                fs.note_file(i_block, limit if stop is None else min(limit, stop), start)
                more = sum(n for _, n in fs.ranges[before:])
                if spent + more > budget:
                    del fs.ranges[before:]
                    break
                spent += more
        if start == 0:
            heads = len(fs.ranges)
    # Read in this order: what the walk read and the files' heads, then their rest.
    return _merge(fs.ranges[:heads]) + _merge(fs.ranges[heads:])


def prefetch_startup(
    stack: object,
    programs: Iterable[str],
    *,
    search_path: str = DEFAULT_PATH,
    workdir: str = "/",
    workers: int = 16,
) -> PrefetchResult:
    """Plan :func:`startup_ranges` on ``stack`` (anything with ``size`` and ``readinto(buf, offset)``)
    and read them through it, ``workers`` reads at a time, each file's head while the walk goes on."""
    readinto = stack.readinto  # type: ignore[attr-defined]
    size = int(stack.size)  # type: ignore[attr-defined]

    def read(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = readinto(memoryview(buf), offset)
        return bytes(buf[:n])

    with _Prefetcher(readinto, workers) as fetch:
        # each file's head is fetched as soon as the walk is past it, the rest once the walk is done
        names = list(programs)
        plan = startup_ranges(read, size, names, search_path=search_path, workdir=workdir, early=fetch)
        fetch(plan)
    return fetch.result()


class _Prefetcher:
    """Reads byte ranges through ``readinto`` in the background as they are handed in (each byte
    once, in pieces of at most 1 MiB), ``workers`` at a time; leaving the ``with`` block waits."""

    PIECE = 1 << 20

    def __init__(self, readinto: Callable[[memoryview, int], int], workers: int):
        self._readinto = readinto
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="obd-prefetch")
        self._local = threading.local()
        self._done: list[tuple[int, int]] = []
        self._jobs: list[Future[int]] = []

    def __call__(self, ranges: Iterable[tuple[int, int]]) -> None:
        for a, n in ranges:
            for lo, hi in self._new_parts(a, a + n):
                for p in range(lo, hi, self.PIECE):
                    job = (p, min(self.PIECE, hi - p))
                    self._jobs.append(self._pool.submit(self._one, job))

    def _new_parts(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of ``[lo, hi)`` not handed in before, now marked as handed in."""
        parts = []
        for a, b in self._done:  # sorted, disjoint
            if b <= lo or a >= hi:
                continue
            if a > lo:
                parts.append((lo, a))
            lo = max(lo, b)
        if lo < hi:
            parts.append((lo, hi))
        self._done = sorted(self._done + parts)
        return parts

    @background_reads()  # nobody waits on these reads yet: Dragonfly's prefetch priority
    def _one(self, job: tuple[int, int]) -> int:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.PIECE))
        return self._readinto(buf[: job[1]], job[0])

    def result(self) -> PrefetchResult:
        return PrefetchResult(len(self._jobs), sum(j.result() for j in self._jobs))

    def __enter__(self) -> _Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)


__all__ = ["elf_dependencies", "prefetch_startup", "startup_ranges"]
