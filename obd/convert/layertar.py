"""Reading OCI layer tars: every header validated, names cleaned, file data spooled, hostile input refused.

A layer tar is read once, as a stream (gzip and zstd are undone on the fly), before anything is
written to the image. The result is a list of :class:`TarEntry` in archive order plus the layer's
``diff_id`` (SHA-256 of the uncompressed stream); each regular file's bytes go to its own file in a
private spool directory, so the ext4 writer never reads the tar again and nothing in the tar ever
names a host path.

Parsing follows overlaybd's ``TarCore`` (docs/formats.md §9): two zero blocks (or the end of the stream)
end the archive; PAX ``x`` records give ``path``, ``linkpath``, ``size`` (and here also ``uid``,
``gid``, ``mtime``) and ``SCHILY.xattr.*``; ``g`` headers are ignored; GNU ``L``/``K`` long names are
honoured; the ustar ``prefix`` counts only with the POSIX magic; names are cleaned Plan 9 style.

Sparse members, in every format GNU tar writes (``--sparse``; their maps are read and validated by
:mod:`obd.convert.tarsparse`): the spooled file gets the real size with holes, and
:attr:`TarEntry.sparse` says where each data segment lies so turboOCI can map the segments onto the
tar. Header numbers and PAX records are parsed by :mod:`obd.convert.tarfields`.

What overlaybd would follow blindly is refused with a :class:`HostileTarError` naming the entry:
absolute names, names or hard-link targets that climb out of the root with ``..``, sizes beyond the
device (or beyond what an extension header may hold), more entries than the file system has inodes.
Malformed archives (bad checksums, bad numbers, data cut short) raise :class:`~obd.errors.FormatError`
/ :class:`~obd.errors.TruncatedError`; entry kinds and names an ext4 image cannot take, or that
debugfs cannot be told about (a newline in a name), raise :class:`~obd.errors.UnsupportedError`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from obd.convert.tarfields import (
    BLK,
    BLOCK,
    CHR,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    HostileTarError,
    checksum_ok,
    cstr,
    header_number,
    parse_pax,
    parse_pax_list,
    pax_int,
    show,
)
from obd.convert.tarsparse import (
    MAX_SPARSE_SEGMENTS,
    SPARSE_PAIR_KEYS,
    SparseHeader,
    check_segments,
    sparse_header,
    sparse_map_v1,
    sparse_old,
)
from obd.errors import FormatError, ObdError, TruncatedError, UnsupportedError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


_KINDS = {
    b"0": FILE,
    b"\x00": FILE,
    b"7": FILE,
    b"S": FILE,  # GNU sparse: a regular file whose data is stored as segments (see sparse_old)
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": CHR,
    b"4": BLK,
    b"5": DIR,
    b"6": FIFO,
}
_NAMES_OF_UNSUPPORTED = {
    b"M": "GNU multi-volume continuation",
    b"N": "GNU old long name",
    b"V": "GNU volume label",
    b"D": "GNU dump directory",
}

#: Linux path and name limits an ext4 image (and debugfs' 8 KiB command lines) can take.
MAX_PATH = 4095
MAX_COMPONENT = 255
MAX_SYMLINK = 4095
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1
#: Largest PAX or GNU long-name payload read into memory.
MAX_EXTENSION = 1 << 20
#: ext4 times: a signed 32-bit second count plus two epoch bits.
MIN_TIME = -(1 << 31)
MAX_TIME = (1 << 34) + (1 << 31) - 1

_PIECE = 1 << 20


@dataclass(frozen=True)
class TarLimits:
    """Bounds a layer must respect; the defaults are those of a 64 GiB ext4 device (the base layer's)."""

    max_entries: int = 4194304  # inodes of the base layer's file system
    max_bytes: int = 64 << 30  # file data, one file or all together
    max_xattr_bytes: int = 64 << 10
    #: spooled file data beyond this fails (the free space of the spool's file system, say)
    max_spool: int | None = None


@dataclass(slots=True)
class TarEntry:
    """One archive member, resolved and validated (extension headers folded in)."""

    index: int
    offset: int  # of the entry's first header block in the uncompressed stream
    name: bytes  # cleaned, relative, no trailing slash; b"" is the root directory
    kind: str
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    mtime: int
    size: int = 0
    link: bytes = b""  # symlink: target as stored; hard link: cleaned path of the target
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data: str | None = None  # spool file holding a regular file's bytes
    data_offset: int = 0  # of a regular file's bytes in the uncompressed stream (turboOCI maps it)
    #: a sparse file's data segments ``(file offset, length)``, stored one after the other from
    #: ``data_offset``; None for a plain file (its bytes are stored whole)
    sparse: tuple[tuple[int, int], ...] | None = None

    @property
    def parts(self) -> tuple[bytes, ...]:
        return tuple(self.name.split(b"/")) if self.name else ()

    @property
    def display(self) -> str:
        return "/" + self.name.decode("utf-8", "backslashreplace")


@dataclass
class ParsedLayer:
    """A whole layer tar read and spooled."""

    name: str
    entries: list[TarEntry]
    diff_id: str  # sha256 of the uncompressed stream
    tar_bytes: int
    data_bytes: int
    compression: str
    max_mtime: int


class Spool:
    """Where a layer's file data waits for the ext4 writer: one file per regular file.

    Small files go to ``ram_dir`` (a tmpfs such as ``/dev/shm``) while ``ram_budget`` bytes last:
    creating thousands of small files is what reading a layer costs most on a disk file system. The
    rest goes to ``disk_dir``. :meth:`cleanup` removes what the spool made.
    """

    def __init__(
        self,
        disk_dir: str | os.PathLike[str],
        *,
        ram_dir: str | None = None,
        ram_budget: int = 256 << 20,
        small: int = 1 << 20,
    ):
        self.disk_dir = os.fspath(disk_dir)
        self.ram_dir = ram_dir
        self.ram_left = ram_budget if ram_dir else 0
        self.small = small
        self.made: list[str] = []

    @classmethod
    def auto(cls, disk_dir: str | os.PathLike[str], *, ram_budget: int = 256 << 20) -> Spool:
        """A spool using ``/dev/shm`` for small files when it is a tmpfs with room to spare."""
        ram_dir = None
        shm = "/dev/shm"
        try:
            st = os.statvfs(shm)
            if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 4 * ram_budget:
                import tempfile

                ram_dir = tempfile.mkdtemp(prefix="obd-spool-", dir=shm)
        except OSError:
            ram_dir = None
        spool = cls(disk_dir, ram_dir=ram_dir, ram_budget=ram_budget)
        return spool

    def path(self, name: str, size: int) -> str:
        if self.ram_dir and size <= self.small and size <= self.ram_left:
            self.ram_left -= size
            return os.path.join(self.ram_dir, name)
        return os.path.join(self.disk_dir, name)

    def cleanup(self) -> None:
        import shutil

        if self.ram_dir:
            shutil.rmtree(self.ram_dir, ignore_errors=True)
            self.ram_dir = None


# -- names ------------------------------------------------------------------------------------------


def clean_name(name: bytes) -> bytes:
    """Plan 9 ``cleanname``: fold ``//``, drop ``.``, resolve ``..``; a rooted ``/..`` stays ``/``.

    The result has no trailing slash; an empty result is ``.``. A non-rooted name may keep leading
    ``..`` elements (the caller decides whether that escapes).
    """
    rooted = name.startswith(b"/")
    out: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out and out[-1] != b"..":
                out.pop()
            elif not rooted:
                out.append(b"..")
            continue
        out.append(part)
    text = b"/".join(out)
    if rooted:
        return b"/" + text
    return text or b"."


def _check_name(raw: bytes, *, path: str, where: str, what: str) -> bytes:
    """The cleaned, root-relative form of an entry name or hard-link target; refuse escapes."""
    if b"\x00" in raw:
        raise HostileTarError(f"{what} contains a NUL byte", path=path, field=where, value=show(raw))
    if raw.startswith(b"/"):
        raise HostileTarError(
            f"{what} is an absolute path; layer tars name files relative to the root",
            path=path,
            field=where,
            value=show(raw),
        )
    cleaned = clean_name(raw)
    if cleaned == b".." or cleaned.startswith(b"../"):
        raise HostileTarError(
            f"{what} climbs out of the image root with '..'", path=path, field=where, value=show(raw)
        )
    if cleaned == b".":
        return b""
    if len(cleaned) > MAX_PATH:
        raise UnsupportedError(
            f"{what} is {len(cleaned)} bytes long; at most {MAX_PATH} are supported",
            path=path,
            field=where,
            value=show(raw[:64]),
        )
    for part in cleaned.split(b"/"):
        if len(part) > MAX_COMPONENT:
            raise UnsupportedError(
                f"{what} has a {len(part)}-byte component; ext4 names hold at most {MAX_COMPONENT}",
                path=path,
                field=where,
                value=show(raw[:64]),
            )
    if b"\n" in cleaned or b"\r" in cleaned:
        raise UnsupportedError(
            f"{what} contains a line break, which the ext4 writer (debugfs) cannot take",
            path=path,
            field=where,
            value=show(raw),
        )
    return cleaned


# -- stream plumbing --------------------------------------------------------------------------------


class _Input:
    """The uncompressed tar bytes: hashed as they pass (the diff_id), counted, read in place."""

    def __init__(self, raw: BinaryIO, name: str):
        self.raw = raw
        self.name = name
        self.hash = hashlib.sha256()
        self.pos = 0
        self.buf = bytearray(_PIECE)
        self.view = memoryview(self.buf)

    def _readinto(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            try:
                n = self.raw.readinto(view[got:])  # type: ignore[attr-defined]
            except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise FormatError(f"cannot decompress the layer: {e}", path=self.name) from None
            except Exception as e:  # zstandard.ZstdError and friends
                if type(e).__module__.startswith("zstandard"):
                    raise FormatError(f"cannot decompress the layer: {e}", path=self.name) from None
                raise
            if not n:
                break
            got += n
        self.hash.update(view[:got])
        self.pos += got
        return got

    def block(self) -> bytes | None:
        """The next 512-byte block, or None at a clean end of stream."""
        view = self.view[:BLOCK]
        n = self._readinto(view)
        if n == 0:
            return None
        if n < BLOCK:
            raise TruncatedError(
                f"stream ends {n} bytes into a header block", path=self.name, field="header", value=self.pos
            )
        return bytes(view)

    def read(self, n: int, what: str) -> bytes:
        out = bytearray(n)
        got = self._readinto(memoryview(out))
        if got < n:
            raise TruncatedError(f"stream ends inside {what}", path=self.name, field=what, value=self.pos)
        return bytes(out)

    def copy(self, fd: int | None, n: int, what: str) -> None:
        """Move ``n`` bytes to ``fd`` (or drop them), then skip the padding to the next block."""
        self._move(fd, n, what)
        self._pad(n, what)

    def copy_sparse(self, fd: int, segments: tuple[tuple[int, int], ...], size: int, what: str) -> None:
        """Move a sparse member's stored segments to their offsets in ``fd``, which gets ``size``
        bytes (the holes between segments stay holes); then skip the padding."""
        stored = 0
        for offset, length in segments:
            os.lseek(fd, offset, os.SEEK_SET)
            self._move(fd, length, what)
            stored += length
        os.ftruncate(fd, size)
        self._pad(stored, what)

    def _move(self, fd: int | None, n: int, what: str) -> None:
        left = n
        while left:
            k = min(left, _PIECE)
            got = self._readinto(self.view[:k])
            if got < k:
                raise TruncatedError(
                    f"stream ends inside {what} ({n - left + got} of {n} bytes)", path=self.name, field=what
                )
            if fd is not None:
                view = self.view[:k]
                done = 0
                while done < k:
                    done += os.write(fd, view[done:])
            left -= k

    def _pad(self, n: int, what: str) -> None:
        pad = -n % BLOCK
        if pad and self._readinto(self.view[:pad]) < pad:
            raise TruncatedError(f"stream ends inside the padding of {what}", path=self.name, field=what)

    def drain(self) -> None:
        while self._readinto(self.view):
            pass


def detect_compression(head: bytes) -> str:
    """``gzip``, ``zstd`` or ``none`` from a stream's first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def open_stream(path: str | os.PathLike[str]) -> tuple[BinaryIO, BinaryIO, str]:
    """``(uncompressed stream, underlying file, compression)`` for a layer blob on disk.

    The underlying file's position tells how much compressed input was consumed (for progress).
    """
    f = open(path, "rb")  # noqa: SIM115 - handed to the caller
    try:
        kind = detect_compression(f.read(4))
        f.seek(0)
        if kind == "gzip":
            return gzip.GzipFile(fileobj=f, mode="rb"), f, kind  # type: ignore[return-value]
        if kind == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            return reader, f, kind
        return f, f, kind
    except BaseException:
        f.close()
        raise


# -- the reader -------------------------------------------------------------------------------------


def read_layer(
    stream: BinaryIO,
    spool_dir: str | os.PathLike[str] | Spool,
    *,
    name: str,
    compression: str = "none",
    limits: TarLimits = TarLimits(),
    progress: Callable[[], None] | None = None,
) -> ParsedLayer:
    """Read a whole uncompressed layer tar from ``stream``; spool file data into ``spool_dir``
    (a directory, or a :class:`Spool`).

    Raises before returning if any entry is malformed or hostile; nothing but spool files is
    written. ``progress()`` is called after each regular file.
    """
    spool = spool_dir if isinstance(spool_dir, Spool) else Spool(spool_dir)
    inp = _Input(stream, name)
    entries: list[TarEntry] = []
    total_data = 0
    max_mtime = 0
    zeros = bytes(BLOCK)
    pending: dict[bytes, bytes] = {}
    pending_pairs: list[tuple[bytes, bytes]] = []  # GNU sparse 0.0 map records, in order
    long_name: bytes | None = None
    long_link: bytes | None = None
    chain_start: int | None = None
    index = 0
    while True:
        start = inp.pos
        block = inp.block()
        if block is None:
            break
        if block == zeros:
            nxt = inp.block()
            if nxt is None or nxt == zeros:
                break
            raise FormatError(
                "a single zero block inside the archive", path=name, field="header", value=inp.pos - BLOCK
            )
        where = f"entry[{index}]@{start}"
        if not checksum_ok(block):
            raise FormatError("header checksum is wrong (not a tar, or corrupt)", path=name, field=where)
        if chain_start is None:
            chain_start = start
        typeflag = block[156:157]
        size = header_number(block[124:136], path=name, where=f"{where}.size")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENSION:
                raise HostileTarError(
                    f"extension header of {size} bytes (at most {MAX_EXTENSION} accepted)",
                    path=name,
                    field=f"{where}.size",
                    value=size,
                )
            data = inp.read(size, f"{where} extension data")
            pad = -size % BLOCK
            if pad:
                inp.read(pad, f"{where} padding")
            if typeflag == b"x":
                records = parse_pax_list(data, path=name, where=where)
                pending.update(records)
                pending_pairs += [(k, v) for k, v in records if k in SPARSE_PAIR_KEYS]
            elif typeflag == b"L":
                long_name = cstr(data)
            elif typeflag == b"K":
                long_link = cstr(data)
            continue  # 'g': read and ignored, as overlaybd does
        old_map = sparse_old(block, inp, path=name, where=where) if typeflag == b"S" else None
        entry_offset = chain_start
        chain_start = None
        pax, pending = pending, {}
        pairs, pending_pairs = pending_pairs, []
        gnu_name, long_name = long_name, None
        gnu_link, long_link = long_link, None
        if len(entries) >= limits.max_entries:
            raise HostileTarError(
                f"more than {limits.max_entries} entries (the file system's inode count)",
                path=name,
                field=where,
                value=len(entries),
            )
        entry, data_size, sparse = _entry(
            block,
            typeflag,
            size,
            pax,
            pairs,
            old_map,
            gnu_name,
            gnu_link,
            name,
            where,
            index,
            entry_offset,
            limits,
        )
        if sparse is not None:
            segments = sparse.segments
            if segments is None:  # format 1.0: the map opens the member's data
                segments, map_bytes = sparse_map_v1(inp, data_size, path=name, field=sparse.field)
                data_size -= map_bytes
            entry.sparse = check_segments(
                segments, entry.size, data_size, path=name, field=sparse.field, shown=entry.display
            )
        if entry.kind == FILE:
            total_data += data_size
            if total_data > limits.max_bytes:
                raise HostileTarError(
                    f"file data adds up to more than the {limits.max_bytes}-byte device",
                    path=name,
                    field=f"{where}.size",
                    value=total_data,
                )
            if limits.max_spool is not None and total_data > limits.max_spool:
                raise ObdError(
                    f"not enough free space to spool the layer's files (more than {limits.max_spool} "
                    "bytes); point --workdir at a larger file system",
                    path=name,
                    field=f"{where}.size",
                    value=total_data,
                )
            entry.data_offset = inp.pos
            out = spool.path(f"f{index}", data_size)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                if entry.sparse is not None:
                    inp.copy_sparse(fd, entry.sparse, entry.size, f"{entry.display} data")
                else:
                    inp.copy(fd, data_size, f"{entry.display} data")
            finally:
                os.close(fd)
            entry.data = out
            if progress is not None:
                progress()
        elif data_size:
            # hard links, directories, devices with a size: the bytes are not theirs to keep
            inp.copy(None, data_size, f"{entry.display} data")
        max_mtime = max(max_mtime, entry.mtime)
        entries.append(entry)
        index += 1
    if pending or pending_pairs or long_name is not None or long_link is not None:
        raise TruncatedError("archive ends after an extension header", path=name, field="header")
    inp.drain()
    return ParsedLayer(
        name=name,
        entries=entries,
        diff_id="sha256:" + inp.hash.hexdigest(),
        tar_bytes=inp.pos,
        data_bytes=total_data,
        compression=compression,
        max_mtime=max_mtime,
    )


def _entry(
    block: bytes,
    typeflag: bytes,
    size: int,
    pax: dict[bytes, bytes],
    pairs: list[tuple[bytes, bytes]],
    old_map: tuple[int, list[tuple[int, int]]] | None,
    gnu_name: bytes | None,
    gnu_link: bytes | None,
    path: str,
    where: str,
    index: int,
    offset: int,
    limits: TarLimits,
) -> tuple[TarEntry, int, SparseHeader | None]:
    """The entry a header chain describes, how many data bytes follow its header, and what its
    headers say of a sparse map (None for a member stored whole)."""
    # the name
    if b"GNU.sparse.name" in pax:  # GNU sparse 0.1/1.0: the ustar name is a decoy
        raw_name = pax[b"GNU.sparse.name"]
    elif b"path" in pax:
        raw_name = pax[b"path"]
    elif gnu_name is not None:
        raw_name = gnu_name
    else:
        raw_name = cstr(block[0:100])
        if block[257:263] == b"ustar\x00" and block[345] != 0:
            raw_name = cstr(block[345:500]) + b"/" + raw_name
    kind = _KINDS.get(typeflag)
    if kind is None:
        what = _NAMES_OF_UNSUPPORTED.get(typeflag, f"type {typeflag!r}")
        raise UnsupportedError(
            f"{what} entries are not supported", path=path, field=f"{where}.typeflag", value=show(raw_name)
        )
    if kind == FILE and typeflag == b"\x00" and raw_name.endswith(b"/"):
        kind = DIR  # old-style directory entry, as overlaybd's get_mode reads it
    name = _check_name(raw_name, path=path, where=f"{where}.name", what="entry name")
    shown = "/" + show(name)
    if b"size" in pax:
        size = pax_int(pax[b"size"], path=path, where=f"{where}.pax.size")
    if size < 0 or size > limits.max_bytes:
        raise HostileTarError(
            f"{shown}: size {size} does not fit the {limits.max_bytes}-byte device",
            path=path,
            field=f"{where}.size",
            value=size,
        )
    mode = header_number(block[100:108], path=path, where=f"{where}.mode") & 0o7777
    uid = header_number(block[108:116], path=path, where=f"{where}.uid")
    gid = header_number(block[116:124], path=path, where=f"{where}.gid")
    mtime = header_number(block[136:148], path=path, where=f"{where}.mtime")
    if b"uid" in pax:
        uid = pax_int(pax[b"uid"], path=path, where=f"{where}.pax.uid")
    if b"gid" in pax:
        gid = pax_int(pax[b"gid"], path=path, where=f"{where}.pax.gid")
    if b"mtime" in pax:
        mtime = pax_int(pax[b"mtime"], path=path, where=f"{where}.pax.mtime", allow_fraction=True)
    for what, ident in (("uid", uid), ("gid", gid)):
        if not 0 <= ident <= 0xFFFFFFFF:
            raise FormatError(
                f"{shown}: {what} does not fit 32 bits", path=path, field=f"{where}.{what}", value=ident
            )
    mtime = min(max(mtime, MIN_TIME), MAX_TIME)
    sparse = sparse_header(pax, pairs, old_map, kind, path=path, where=where, shown=shown)
    real_size = size
    if sparse is not None:
        real_size = sparse.real_size
        if real_size > limits.max_bytes:
            raise HostileTarError(
                f"{shown}: sparse file of {real_size} bytes does not fit the {limits.max_bytes}-byte device",
                path=path,
                field=sparse.size_field,
                value=real_size,
            )
    entry = TarEntry(index, offset, name, kind, mode, uid, gid, mtime, real_size if kind == FILE else 0)
    # link targets
    raw_link = pax.get(b"linkpath", gnu_link if gnu_link is not None else cstr(block[157:257]))
    if kind == HARDLINK:
        target = _check_name(
            raw_link, path=path, where=f"{where}.linkname", what=f"{shown}: hard link target"
        )
        if not target:
            raise HostileTarError(
                f"{shown}: hard link to the root directory", path=path, field=f"{where}.linkname"
            )
        if target == name:
            raise FormatError(f"{shown}: hard link to itself", path=path, field=f"{where}.linkname")
        entry.link = target
    elif kind == SYMLINK:
        if not raw_link:
            raise FormatError(f"{shown}: symlink with an empty target", path=path, field=f"{where}.linkname")
        if len(raw_link) > MAX_SYMLINK or b"\x00" in raw_link:
            raise FormatError(
                f"{shown}: symlink target of {len(raw_link)} bytes (at most {MAX_SYMLINK}, no NUL)",
                path=path,
                field=f"{where}.linkname",
            )
        if b"\n" in raw_link or b"\r" in raw_link:
            raise UnsupportedError(
                f"{shown}: symlink target contains a line break, which debugfs cannot take",
                path=path,
                field=f"{where}.linkname",
            )
        entry.link = raw_link
    elif kind in (CHR, BLK):
        major = header_number(block[329:337], path=path, where=f"{where}.devmajor")
        minor = header_number(block[337:345], path=path, where=f"{where}.devminor")
        if major > MAX_MAJOR or minor > MAX_MINOR:
            raise FormatError(
                f"{shown}: device {major}:{minor} is out of Linux's range",
                path=path,
                field=f"{where}.devmajor",
            )
        entry.devmajor, entry.devminor = major, minor
    # extended attributes
    xattrs: dict[bytes, bytes] = {}
    xattr_bytes = 0
    for key, value in pax.items():
        if key.startswith(b"SCHILY.xattr."):
            xname = key[len(b"SCHILY.xattr.") :]
            if not xname or b"\x00" in xname or b"\n" in xname or b"\r" in xname or xname.startswith(b"-"):
                raise FormatError(
                    f"{shown}: malformed xattr name", path=path, field=f"{where}.pax", value=show(xname)
                )
            xattrs[xname] = value
            xattr_bytes += len(xname) + len(value)
    if xattr_bytes > limits.max_xattr_bytes:
        raise HostileTarError(
            f"{shown}: {xattr_bytes} bytes of extended attributes",
            path=path,
            field=f"{where}.pax",
            value=xattr_bytes,
        )
    entry.xattrs = xattrs
    return entry, size, sparse


__all__ = [
    "BLK",
    "CHR",
    "DIR",
    "FIFO",
    "FILE",
    "HARDLINK",
    "MAX_SPARSE_SEGMENTS",
    "SYMLINK",
    "HostileTarError",
    "ParsedLayer",
    "Spool",
    "TarEntry",
    "TarLimits",
    "clean_name",
    "detect_compression",
    "open_stream",
    "parse_pax",
    "parse_pax_list",
    "read_layer",
]
