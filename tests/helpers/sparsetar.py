"""Sparse files and the tars GNU tar makes of them (``tar --sparse``), for the sparse-member tests.

:func:`make_sparse_files` writes a few files with holes; :func:`gnu_sparse_tar` archives them with
the real GNU tar in one of the formats it writes sparse members in (:data:`FORMATS`): the old GNU
``S`` type (``--format=gnu``, more than four segments spill into extension blocks) and the PAX
formats 0.0, 0.1 and 1.0 (``--format=posix --sparse-version=V``). ``raw`` hole detection scans for
zero 512-byte blocks instead of asking the file system, so segments need not be 4 KiB aligned.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

#: (--format, --sparse-version, --hole-detection), with a short id for test names
FORMATS = {
    "gnu": ("gnu", None, None),
    "gnu-raw": ("gnu", None, "raw"),
    "pax0.0": ("posix", "0.0", None),
    "pax0.1": ("posix", "0.1", "raw"),
    "pax1.0": ("posix", "1.0", None),
}
MTIME = 1700000000


def _write(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """A file of ``size`` bytes holding ``pieces`` (offset, bytes) and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            os.pwrite(f.fileno(), data, offset)
    return path.read_bytes()


def make_sparse_files(root: Path) -> dict[str, bytes]:
    """Write the test's sparse files under ``root``; returns name -> content.

    ``big``: 10 MiB with a 5-byte run inside a block, 9000 bytes across block edges and a 3-byte
    tail; ``many``: 40 runs of 4 KiB (extension blocks in the old GNU format) and a trailing hole;
    ``holes``: 1 MiB with no data at all; ``dense``: an ordinary file in the same archive.
    """
    rnd = random.Random(1034)
    root.mkdir(parents=True, exist_ok=True)
    out = {
        "big": _write(
            root / "big",
            (10 << 20) + 3,
            [(100_000, b"hello"), (5_000_000, rnd.randbytes(9000)), (10 << 20, b"end")],
        ),
        "many": _write(
            root / "many", 40 * 65536 + 70_000, [(i * 65536 + 8192, rnd.randbytes(4096)) for i in range(40)]
        ),
        "holes": _write(root / "holes", 1 << 20, []),
        "dense": _write(root / "dense", 10_000, [(0, rnd.randbytes(10_000))]),
    }
    return out


def gnu_sparse_tar(root: Path, out: Path, fmt: str, names: list[str] | None = None) -> bytes:
    """The tar GNU tar writes of ``names`` (default: every file of ``root``) in format ``fmt``
    (a key of :data:`FORMATS`), with owner 0 and a fixed mtime; returns its bytes."""
    tar = shutil.which("tar")
    assert tar, "GNU tar (Debian's essential package 'tar') is missing"
    form, version, holes = FORMATS[fmt]
    cmd = [tar, "--sparse", f"--format={form}", "--owner=0", "--group=0", "--numeric-owner"]
    cmd += [f"--mtime=@{MTIME}", "-C", str(root), "-cf", str(out)]
    if version:
        cmd.append(f"--sparse-version={version}")
    if holes:
        cmd.append(f"--hole-detection={holes}")
    cmd += sorted(names if names is not None else os.listdir(root))
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out.read_bytes()


__all__ = ["FORMATS", "MTIME", "gnu_sparse_tar", "make_sparse_files"]
