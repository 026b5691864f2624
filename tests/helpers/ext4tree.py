"""Read the file tree of a raw ext4 image without mounting it, through e2fsprogs' ``debugfs``.

:func:`read_tree` yields exactly the structure of ``fixtures/overlaybd/facts/ext4_*.tree.json``: a list
of dicts sorted by path, one per entry below ``/`` (``/lost+found`` left out), each with ``path``,
``type`` (``dir``/``file``/``symlink``/``chr``/``blk``/``fifo``/``sock``), ``mode`` (4-digit octal
string of the permission bits, e.g. ``"4755"``), ``uid``, ``gid``, ``ino``, ``nlink``; plus ``size``
and ``sha256`` for files, ``target`` for symlinks, ``dev`` ([major, minor]) for devices, and
``xattrs`` (debugfs' rendering, e.g. ``'user.comment (5) = "hello"   user.empty (0)'``) when the
inode has any. :func:`compare_trees` turns two such trees into readable differences.

debugfs runs in batch mode (``-f``): one process per directory depth for the listing, one for all
``stat`` calls and a few for the file contents, never one per file. Entries are addressed by inode
number (``<ino>``), so no file name is ever parsed by debugfs' command line.

It also builds reference images: :func:`extract_layer_tar` unpacks an OCI layer tar the way a first
layer lands on an empty file system, and :func:`mke2fs_from_dir` turns a directory into an ext4 image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_TIMEOUT = 900
_ROOT_INO = 2
_BANNER = re.compile(r"^debugfs \S+ \(.*\)$|^\s*Using EXT2FS Library version .*$")
# One `ls -p` record: /ino/mode/uid/gid/name/size/ — a name cannot hold '/', but it may hold a newline.
_LS_RECORD = re.compile(r"/(\d+)/([0-7]{6})/(-?\d+)/(-?\d+)/([^/]*)/(\d*)/\n")
_TYPES = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}
# Dump at most this many bytes / files per debugfs run before hashing and deleting them.
_DUMP_BATCH_BYTES = 256 << 20
_DUMP_BATCH_FILES = 2000


class Ext4ToolError(RuntimeError):
    """An e2fsprogs program is missing, failed, or printed something this module cannot parse."""


def tool(name: str) -> str:
    """Full path of e2fsprogs program ``name`` (sbin included), or raise :class:`Ext4ToolError`."""
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))
    if not found:
        raise Ext4ToolError(f"{name} not found: install Debian package e2fsprogs (./setup.sh does)")
    return found


# --- reading ----------------------------------------------------------------------------------------


def read_tree(
    image: str | os.PathLike[str], *, skip: Iterable[str] = ("/lost+found",)
) -> list[dict[str, Any]]:
    """Return the file tree of the ext4 image ``image`` (see the module docstring for the shape).

    ``skip`` names whole subtrees to leave out. Regular files are dumped and hashed; a dumped size that
    disagrees with the inode size raises :class:`Ext4ToolError`.
    """
    skipped = set(skip)
    listing = _walk(image, skipped)
    inodes = sorted({ent["ino"] for ent in listing})
    stats = dict(zip(inodes, _debugfs(image, [f"stat <{ino}>" for ino in inodes]), strict=True))

    details: dict[int, dict[str, Any]] = {}
    slow_links: list[int] = []
    for ino, text in stats.items():
        details[ino] = info = _parse_stat(text, ino)
        if info["type"] == "symlink" and "target" not in info:
            slow_links.append(ino)
    sizes = {ent["ino"]: ent["size"] for ent in listing}
    files = sorted({ino for ino, info in details.items() if info["type"] == "file"})
    digests = _dump_and_hash(image, files, sizes)
    for ino, raw in _dump_small(image, slow_links, sizes).items():
        details[ino]["target"] = raw.decode("utf-8", "surrogateescape")

    tree = []
    for ent in listing:
        info = details[ent["ino"]]
        if info["type"] != ent["type"]:
            raise Ext4ToolError(f"{ent['path']}: ls says {ent['type']}, stat says {info['type']}")
        row: dict[str, Any] = {
            "path": ent["path"],
            "type": ent["type"],
            "mode": ent["mode"],
            "uid": ent["uid"],
            "gid": ent["gid"],
            "ino": ent["ino"],
            "nlink": info["nlink"],
        }
        if ent["type"] == "file":
            row["size"] = ent["size"]
            row["sha256"] = digests[ent["ino"]]
        elif ent["type"] == "symlink":
            row["target"] = info["target"]
        elif ent["type"] in ("chr", "blk"):
            row["dev"] = info["dev"]
        if info.get("xattrs"):
            row["xattrs"] = info["xattrs"]
        tree.append(row)
    tree.sort(key=lambda r: r["path"])
    return tree


def dump_file(image: str | os.PathLike[str], path: str, out: str | os.PathLike[str]) -> Path:
    """Copy the bytes of file ``path`` (absolute, inside the image) to ``out`` with ``debugfs dump``."""
    if not path.startswith("/") or any(c in path for c in '"\n'):
        raise ValueError(f"dump_file needs an absolute path without quotes or newlines, got {path!r}")
    out = Path(out)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    _debugfs(image, [f"dump {_quote(path)} {_quote(str(out))}"])
    if not out.is_file():
        raise Ext4ToolError(f"debugfs dump of {path} in {image} produced no file")
    return out


def read_file(image: str | os.PathLike[str], path: str) -> bytes:
    """The bytes of file ``path`` inside the image (via :func:`dump_file` into a temporary file)."""
    with tempfile.TemporaryDirectory(prefix="ext4tree-") as tmp:
        return dump_file(image, path, Path(tmp) / "out").read_bytes()


def e2fsck_clean(image: str | os.PathLike[str]) -> tuple[bool, str]:
    """Run ``e2fsck -fn`` (forced, read-only) on ``image``; return (clean, combined output)."""
    proc = subprocess.run(
        [tool("e2fsck"), "-fn", os.fspath(image)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=_TIMEOUT,
        check=False,
    )
    return proc.returncode == 0, proc.stdout + proc.stderr


# --- comparing --------------------------------------------------------------------------------------


class TreeDiff(NamedTuple):
    """One difference between two trees. ``key`` is a field name, ``"entry"`` when the path exists on
    one side only (the other side's value is None), or ``"hardlinks"`` when the set of paths sharing
    the inode differs."""

    path: str
    key: str
    actual: Any
    expected: Any

    def __str__(self) -> str:
        if self.key == "entry":
            return f"{self.path}: only in {'expected' if self.actual is None else 'actual'}"
        absent = "<absent>"
        a = absent if self.actual is None else repr(self.actual)
        e = absent if self.expected is None else repr(self.expected)
        return f"{self.path}: {self.key} is {a}, expected {e}"


def diff_trees(
    actual: Sequence[dict[str, Any]], expected: Sequence[dict[str, Any]], ignore: Iterable[str] = ("ino",)
) -> list[TreeDiff]:
    """Structured differences between two trees, sorted by path then key.

    Fields named in ``ignore`` are not compared; when ``ino`` is ignored, hard-link structure still is
    (which paths share an inode), so a lost or extra hard link is reported as a ``hardlinks`` diff.
    """
    ignored = set(ignore) | {"path"}
    a_by = {row["path"]: row for row in actual}
    e_by = {row["path"]: row for row in expected}
    diffs = [TreeDiff(p, "entry", None, e_by[p]) for p in e_by.keys() - a_by.keys()]
    diffs += [TreeDiff(p, "entry", a_by[p], None) for p in a_by.keys() - e_by.keys()]
    for path in a_by.keys() & e_by.keys():
        a, e = a_by[path], e_by[path]
        for key in (a.keys() | e.keys()) - ignored:
            if a.get(key) != e.get(key):
                diffs.append(TreeDiff(path, key, a.get(key), e.get(key)))
    if "ino" in ignored:
        a_links, e_links = _link_groups(actual), _link_groups(expected)
        for path in a_by.keys() & e_by.keys():
            if a_links.get(path) != e_links.get(path):
                diffs.append(TreeDiff(path, "hardlinks", a_links.get(path), e_links.get(path)))
    return sorted(diffs, key=lambda d: (d.path, d.key))


def compare_trees(
    actual: Sequence[dict[str, Any]], expected: Sequence[dict[str, Any]], ignore: Iterable[str] = ("ino",)
) -> list[str]:
    """Readable differences between two trees (empty when they match); see :func:`diff_trees`."""
    return [str(d) for d in diff_trees(actual, expected, ignore)]


def _link_groups(tree: Sequence[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    by_ino: dict[int, list[str]] = {}
    for row in tree:
        if row["type"] != "dir":
            by_ino.setdefault(row["ino"], []).append(row["path"])
    return {p: tuple(sorted(paths)) for paths in by_ino.values() if len(paths) > 1 for p in paths}


# --- building reference images ---------------------------------------------------------------------


def extract_layer_tar(tar_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Unpack an OCI layer tar into ``dest`` as a first layer lands on an empty tree (run as root).

    Owners, modes (setuid included), device nodes, fifos, symlinks, hard links and PAX
    ``SCHILY.xattr.*`` records are preserved. Whiteouts (``.wh.*``, ``.wh..wh..opq``) have nothing below
    them to hide, so they are dropped. A hard-link entry only adds a name: its own header mode and
    owner are *not* applied to the shared inode (that is what a plain ``link()`` does; overlaybd-apply
    differs, see MANIFEST §3 "Semantics observed").
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./").rstrip("/")
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{tar_path}: refusing member name {member.name!r}")
            if Path(name).name.startswith(".wh."):
                continue
            member.name = name
            # Trusted fixture: devices, setuid bits and absolute symlinks are the point of the test.
            extra: dict[str, Any] = (
                {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
            )
            tar.extract(member, dest, set_attrs=not member.islnk(), numeric_owner=True, **extra)
            target = dest / name
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    raw = value.encode("utf-8", "surrogateescape")
                    os.setxattr(target, key[len("SCHILY.xattr.") :], raw, follow_symlinks=False)


def mke2fs_from_dir(src: str | os.PathLike[str], image: str | os.PathLike[str], size: str = "64M") -> Path:
    """Create an ext4 image of ``size`` at ``image`` populated from directory ``src`` (``mke2fs -d``)."""
    proc = subprocess.run(
        [tool("mke2fs"), "-q", "-F", "-t", "ext4", "-d", os.fspath(src), os.fspath(image), size],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise Ext4ToolError(f"mke2fs -d {src} {image} failed (rc {proc.returncode}): {proc.stderr.strip()}")
    return Path(image)


# --- debugfs plumbing -------------------------------------------------------------------------------


def _quote(arg: str) -> str:
    if '"' in arg or "\n" in arg:
        raise ValueError(f"cannot pass {arg!r} to debugfs")
    return f'"{arg}"'


def _debugfs(image: str | os.PathLike[str], commands: Sequence[str]) -> list[str]:
    """Run ``commands`` in one ``debugfs -f`` process; return each command's stdout, in order.

    Any stderr output besides the version banner is an error (debugfs itself exits 0 regardless).
    """
    if not commands:
        return []
    with tempfile.NamedTemporaryFile("w", prefix="debugfs-", suffix=".cmds", encoding="utf-8") as script:
        script.write("".join(cmd + "\n" for cmd in commands))
        script.flush()
        env = {**os.environ, "DEBUGFS_PAGER": "__none__", "PAGER": "__none__"}
        proc = subprocess.run(
            [tool("debugfs"), "-f", script.name, os.fspath(image)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=_TIMEOUT,
            check=False,
        )
    out = proc.stdout.decode("utf-8", "surrogateescape")
    err = proc.stderr.decode("utf-8", "replace")
    noise = [line for line in err.splitlines() if line.strip() and not _BANNER.match(line)]
    if proc.returncode != 0 or noise:
        raise Ext4ToolError(f"debugfs on {image} failed (rc {proc.returncode}): " + " | ".join(noise[:20]))
    results = []
    pos = 0
    marks = [f"debugfs: {cmd}\n" for cmd in commands]
    for i, mark in enumerate(marks):
        start = out.find(mark, pos)
        if start < 0:
            raise Ext4ToolError(f"debugfs output lacks the echo of command {commands[i]!r}")
        body = start + len(mark)
        end = out.find(marks[i + 1], body) if i + 1 < len(marks) else len(out)
        if end < 0:
            raise Ext4ToolError(f"debugfs output lacks the echo of command {commands[i + 1]!r}")
        results.append(out[body:end])
        pos = end
    return results


def _walk(image: str | os.PathLike[str], skipped: set[str]) -> list[dict[str, Any]]:
    """List every entry with ``ls -p``, one debugfs run per directory depth."""
    entries: list[dict[str, Any]] = []
    level: list[tuple[int, str]] = [(_ROOT_INO, "")]
    seen_dirs = {_ROOT_INO}
    while level:
        outputs = _debugfs(image, [f"ls -p <{ino}>" for ino, _ in level])
        next_level: list[tuple[int, str]] = []
        for (dir_ino, prefix), text in zip(level, outputs, strict=True):
            for rec in _parse_ls(text, dir_ino):
                if rec["name"] in (".", ".."):
                    continue
                path = f"{prefix}/{rec['name']}"
                if path in skipped:
                    continue
                rec["path"] = path
                entries.append(rec)
                if rec["type"] == "dir":
                    if rec["ino"] in seen_dirs:
                        raise Ext4ToolError(f"{path}: directory inode {rec['ino']} reached twice (loop)")
                    seen_dirs.add(rec["ino"])
                    next_level.append((rec["ino"], path))
        level = next_level
    return entries


def _parse_ls(text: str, dir_ino: int) -> list[dict[str, Any]]:
    records = []
    pos = 0
    while pos < len(text):
        if text[pos] == "\n":
            pos += 1
            continue
        m = _LS_RECORD.match(text, pos)
        if not m:
            raise Ext4ToolError(f"cannot parse `ls -p <{dir_ino}>` output near {text[pos : pos + 80]!r}")
        ino, mode, uid, gid, name, size = m.groups()
        mode_i = int(mode, 8)
        kind = _TYPES.get(stat.S_IFMT(mode_i))
        if kind is None:
            raise Ext4ToolError(f"entry {name!r} in directory <{dir_ino}> has unknown mode {mode}")
        records.append(
            {
                "name": name,
                "type": kind,
                "mode": f"{stat.S_IMODE(mode_i):04o}",
                "uid": int(uid) & 0xFFFFFFFF,
                "gid": int(gid) & 0xFFFFFFFF,
                "ino": int(ino),
                "size": int(size) if size else 0,
            }
        )
        pos = m.end()
    return records


_STAT_TYPES = {
    "directory": "dir",
    "regular": "file",
    "symlink": "symlink",
    "character special": "chr",
    "block special": "blk",
    "FIFO": "fifo",
    "socket": "sock",
}


def _parse_stat(text: str, ino: int) -> dict[str, Any]:
    m = re.search(r"^Inode: (\d+)\s+Type: (.+?)\s+Mode:", text, re.M)
    if not m or int(m.group(1)) != ino or m.group(2) not in _STAT_TYPES:
        raise Ext4ToolError(f"cannot parse `stat <{ino}>` output: {text[:200]!r}")
    info: dict[str, Any] = {"type": _STAT_TYPES[m.group(2)]}
    links = re.search(r"^Links: (\d+)", text, re.M)
    if not links:
        raise Ext4ToolError(f"`stat <{ino}>` shows no link count")
    info["nlink"] = int(links.group(1))
    dev = re.search(r"Device major/minor number: (\d+):(\d+)", text)
    if dev:
        info["dev"] = [int(dev.group(1)), int(dev.group(2))]
    link = re.search(r'^\s*Fast link dest: "(.*)"$', text, re.M)
    if link:
        info["target"] = link.group(1)
    lines = text.splitlines()
    if "Extended attributes:" in lines:
        attrs = []
        for line in lines[lines.index("Extended attributes:") + 1 :]:
            if not line.startswith("  "):
                break
            attrs.append(line)
        info["xattrs"] = " ".join(attrs).strip()
    return info


def _dump_batches(inodes: Sequence[int], sizes: dict[int, int]) -> Iterable[list[int]]:
    batch: list[int] = []
    total = 0
    for ino in inodes:
        if batch and (total + sizes[ino] > _DUMP_BATCH_BYTES or len(batch) >= _DUMP_BATCH_FILES):
            yield batch
            batch, total = [], 0
        batch.append(ino)
        total += sizes[ino]
    if batch:
        yield batch


def _dump_and_hash(
    image: str | os.PathLike[str], inodes: Sequence[int], sizes: dict[int, int]
) -> dict[int, str]:
    digests: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="ext4tree-") as tmp:
        for batch in _dump_batches(inodes, sizes):
            outs = {ino: Path(tmp) / str(ino) for ino in batch}
            _debugfs(image, [f"dump <{ino}> {_quote(str(out))}" for ino, out in outs.items()])
            for ino, out in outs.items():
                if not out.is_file() or out.stat().st_size != sizes[ino]:
                    got = out.stat().st_size if out.is_file() else None
                    raise Ext4ToolError(f"dump of inode {ino} gave {got} bytes, inode says {sizes[ino]}")
                digests[ino] = _sha256(out)
                out.unlink()
    return digests


def _dump_small(
    image: str | os.PathLike[str], inodes: Sequence[int], sizes: dict[int, int]
) -> dict[int, bytes]:
    """Contents of a few small inodes (slow symlinks, whose target lives in a data block)."""
    if not inodes:
        return {}
    with tempfile.TemporaryDirectory(prefix="ext4tree-") as tmp:
        outs = {ino: Path(tmp) / str(ino) for ino in inodes}
        _debugfs(image, [f"dump <{ino}> {_quote(str(out))}" for ino, out in outs.items()])
        data = {ino: out.read_bytes() if out.is_file() else b"" for ino, out in outs.items()}
    for ino, raw in data.items():
        if len(raw) != sizes[ino]:
            raise Ext4ToolError(f"symlink inode {ino}: read {len(raw)} target bytes, inode says {sizes[ino]}")
    return data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
