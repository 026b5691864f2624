"""Prefetch without a trace: the program an image starts, its dynamic loader and its libraries.

The root is a real ext4 file system (``mke2fs -d``) holding this machine's own ``/usr/bin/true``,
``ld-linux-x86-64.so.2`` and ``libc.so.6`` laid out as on Debian (merged /usr: ``/bin``, ``/lib`` and
``/lib64`` are symlinks, the loader one absolute symlink through another).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from fixtures import require_tool
from frontends.run.images import mkfs_ext4
from obd.io.priority import PRIORITY_PREFETCH, read_priority
from obd.prefetch.ext4 import _merge
from obd.prefetch.startup import FILE_HEAD, elf_dependencies, prefetch_startup, startup_ranges

LIBDIR = "usr/lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"


def host_file(name: str) -> Path:
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"):
        if os.path.exists(os.path.join(d, name)):
            return Path(os.path.realpath(os.path.join(d, name)))
    pytest.fail(f"{name} not found on this (x86_64 Debian) machine")


@pytest.fixture(scope="module")
def root_image(tmp_path_factory):
    require_tool("mke2fs")
    tmp = tmp_path_factory.mktemp("startup")
    root = tmp / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / LIBDIR).mkdir(parents=True)
    (root / "usr/lib64").mkdir(parents=True)
    (root / "srv/app").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n" + "#" * 5000 + "\n")
    shutil.copy(os.path.realpath("/usr/bin/true"), root / "usr/bin/true")
    shutil.copy(host_file(LOADER), root / LIBDIR / LOADER)
    shutil.copy(host_file("libc.so.6"), root / LIBDIR / "libc.so.6")
    for i in range(300):  # a directory of several blocks
        (root / "usr/bin" / f"filler-with-a-long-name-{i:04d}").write_bytes(b"x")
    os.symlink("usr/bin", root / "bin")
    os.symlink("usr/lib", root / "lib")
    os.symlink("usr/lib64", root / "lib64")
    os.symlink(f"/lib/x86_64-linux-gnu/{LOADER}", root / "usr/lib64" / LOADER)  # absolute, via /lib
    deep = "/usr/bin/" + "./" * 40 + "true"  # longer than 60 bytes: a symlink with a data block
    os.symlink(deep, root / "srv/app/run")
    image = mkfs_ext4(root, tmp / "root.ext4")
    return root, image


def reader(image: Path):
    f = open(image, "rb")  # noqa: SIM115 - kept open for the module's reads

    def read(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)

    return read


def covered(image: Path, ranges: list[tuple[int, int]]) -> bytes:
    read = reader(image)
    return b"\0".join(read(a, n) for a, n in ranges)


def test_elf_dependencies_of_a_real_binary():
    data = Path(os.path.realpath("/usr/bin/true")).read_bytes()
    interp, needed = elf_dependencies(data[:4096], lambda o, n: data[o : o + n])
    assert interp == f"/lib64/{LOADER}" and "libc.so.6" in needed
    assert elf_dependencies(b"#!/bin/sh\n", lambda o, n: b"") == (None, [])


@pytest.mark.parametrize("program", ["true", "/srv/app/run"])
def test_startup_ranges_hold_the_program_its_loader_and_its_libraries(root_image, program):
    root, image = root_image
    ranges = startup_ranges(reader(image), image.stat().st_size, [program], search_path="/sbin:/bin")
    data = covered(image, ranges)
    for path in ("usr/bin/true", f"{LIBDIR}/{LOADER}", f"{LIBDIR}/libc.so.6", "etc/passwd"):
        head = (root / path).read_bytes()[:4096]
        assert head in data, path
    loader = (root / LIBDIR / LOADER).read_bytes()
    assert loader[-4096:] in data  # the loader whole
    libc = (root / LIBDIR / "libc.so.6").read_bytes()
    assert len(libc) > FILE_HEAD and libc[-4096:] in data  # libraries whole too
    assert sum(n for _, n in ranges) < 8 << 20
    # every file's head is planned before any file's rest: what starts first is fetched first
    read = reader(image)
    tail_at = next(i for i, (a, n) in enumerate(ranges) if libc[-4096:] in read(a, n))
    head_at = next(i for i, (a, n) in enumerate(ranges) if libc[:4096] in read(a, n))
    assert head_at < tail_at


def test_a_missing_program_or_a_disk_that_is_not_ext4_plans_little_or_nothing(root_image, tmp_path):
    _, image = root_image
    size = image.stat().st_size
    few = startup_ranges(reader(image), size, ["no-such-program"])
    assert 0 < sum(n for _, n in few) < 1 << 20  # the lookups' metadata only
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(1 << 20))
    assert startup_ranges(reader(junk), 1 << 20, ["true"]) == []


def test_prefetch_startup_reads_every_planned_byte_once_in_the_background(root_image):
    _, image = root_image
    size = image.stat().st_size
    plan = startup_ranges(reader(image), size, ["true"], search_path="/sbin:/bin")
    fd = os.open(image, os.O_RDONLY)
    lock = threading.Lock()
    background: list[tuple[int, int]] = []  # the prefetcher's reads (the walk's own are foreground)

    class Disk:
        def __init__(self) -> None:
            self.size = size

        def readinto(self, buf: memoryview, offset: int) -> int:
            if read_priority() == PRIORITY_PREFETCH:
                with lock:
                    background.append((offset, len(buf)))
            return os.preadv(fd, [buf], offset)

    try:
        res = prefetch_startup(Disk(), ["true"], search_path="/sbin:/bin")
    finally:
        os.close(fd)
    # every planned byte is read in the background, and only once
    assert len(background) == res.ranges
    assert _merge(background) == _merge(plan)
    assert sum(n for _, n in _merge(plan)) == sum(n for _, n in background) == res.bytes
