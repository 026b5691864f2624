"""``obd mount``: every fixture stack as a FUSE disk file, loop-mounted ext4, registry images, errors.

Real FUSE mounts, as root (``require_tool("root")`` fails the test loudly otherwise). Also the
harness the other test_fuse_* modules share: :class:`Mounted` starts ``obd mount`` through the CLI
(background server, readiness handshake) and unmounts it with ``obd umount``; :func:`mounted_tree`
reads a mounted file system into the tree shape of ``facts/ext4_*.tree.json``.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ext4tree import compare_trees
from registry_server import RegistryServer

from fixtures import expected, fixture_path, materialize, require_tool, resolved_config, sha256_file
from frontends.fuse import FSTYPE, mount_entry, mounts, server_pid
from obd.cli import main
from obd.image.local import open_layers

SMALL = [s for s in expected()["stacks"] if s["vsize"] <= 1 << 30]
EXT4 = [s for s in expected()["stacks"] if s["name"].startswith("ext4/")]
L012 = "L0L1L2/lz4"
_TYPES = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


# --- harness --------------------------------------------------------------------------------------
def need_fuse() -> None:
    require_tool("root")
    require_tool("fusermount3")


def image_args(entry: dict[str, Any]) -> list[str]:
    if entry["config"]:
        return ["--config", str(resolved_config(entry["config"]))]
    return [str(materialize(rel)) for rel in entry["layers"]]


def force_unmount(mnt: Path) -> None:
    """Last-resort cleanup: lazily detach the mount and kill its server."""
    pid = server_pid(mnt)
    subprocess.run([require_tool("fusermount3"), "-u", "-z", str(mnt)], capture_output=True, check=False)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


class Mounted:
    """``obd mount ARGS... MNT`` in the background for the duration of a ``with`` block."""

    def __init__(self, mnt: Path, *args: str, name: str = "disk.img"):
        need_fuse()
        self.mnt = Path(mnt)
        self.args = [*args, "--name", name] if name != "disk.img" else list(args)
        self.disk = self.mnt / name
        self.pid: int | None = None

    def mount(self) -> Mounted:
        self.mnt.mkdir(parents=True, exist_ok=True)
        assert main(["mount", *self.args, str(self.mnt)]) == 0
        entry = mount_entry(self.mnt)
        assert entry is not None and entry.fstype == FSTYPE, entry
        self.pid = server_pid(self.mnt)
        assert self.pid is not None
        return self

    def umount(self) -> None:
        assert main(["umount", str(self.mnt)]) == 0
        assert mount_entry(self.mnt) is None
        assert self.pid is not None and wait_gone(self.pid, 1)  # obd umount waited for it

    def __enter__(self) -> Mounted:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        if mount_entry(self.mnt) is not None:
            if exc[0] is None:
                self.umount()
            else:
                force_unmount(self.mnt)


@pytest.fixture(autouse=True)
def _no_mount_left_behind(tmp_path):
    yield
    for entry in mounts():
        if entry.fstype == FSTYPE and entry.mountpoint.startswith(str(tmp_path)):
            force_unmount(Path(entry.mountpoint))


def sha256_range(path: Path, offset: int, length: int, *, direct: bool = False) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        pos = offset
        while pos < offset + length:
            chunk = os.pread(fd, min(8 << 20, offset + length - pos), pos)
            assert chunk, f"short read at {pos}"
            h.update(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def render_xattrs(path: str) -> str | None:
    """Extended attributes as ``debugfs stat`` shows them (the tree facts' rendering)."""
    parts = []
    for name in os.listxattr(path, follow_symlinks=False):
        value = os.getxattr(path, name, follow_symlinks=False)
        parts.append(f"{name} ({len(value)})" + (f' = "{value.decode()}"' if value else ""))
    return "   ".join(parts) or None


def mounted_tree(root: Path, skip: tuple[str, ...] = ("/lost+found",)) -> list[dict[str, Any]]:
    """The tree of a mounted file system in the shape of ``tests/helpers/ext4tree.py``'s :func:`read_tree`."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else "/" + rel
        dirnames[:] = [d for d in dirnames if f"{prefix}/{d}" not in skip]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            row: dict[str, Any] = {
                "path": f"{prefix}/{name}",
                "type": _TYPES[stat.S_IFMT(st.st_mode)],
                "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                "uid": st.st_uid,
                "gid": st.st_gid,
                "ino": st.st_ino,
                "nlink": st.st_nlink,
            }
            if row["type"] == "file":
                row["size"] = st.st_size
                row["sha256"] = sha256_file(full)
            elif row["type"] == "symlink":
                row["target"] = os.readlink(full)
            elif row["type"] in ("chr", "blk"):
                row["dev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            xattrs = render_xattrs(full)
            if xattrs:
                row["xattrs"] = xattrs
            rows.append(row)
    return sorted(rows, key=lambda r: r["path"])


@contextlib.contextmanager
def loop_mounted(disk: Path, where: Path):
    """``losetup -r`` on ``disk`` and a read-only ext4 mount of the loop device on ``where``."""
    losetup = require_tool("losetup")
    dev = subprocess.run(
        [losetup, "-r", "-f", "--show", str(disk)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", dev, str(where)], check=True)
        try:
            yield dev
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        subprocess.run([losetup, "-d", dev], check=True)


# --- every fixture stack --------------------------------------------------------------------------
@pytest.mark.parametrize("entry", SMALL, ids=[s["name"] for s in SMALL])
def test_fixture_stack_file_is_the_exported_device(tmp_path, entry):
    with Mounted(tmp_path / "mnt", *image_args(entry)) as m:
        st = os.stat(m.disk)
        assert st.st_size == entry["vsize"] and stat.S_ISREG(st.st_mode)
        assert sha256_file(m.disk) == entry["sha256"]


def test_mounted_file_is_byte_identical_to_obd_export(tmp_path):
    """``cmp`` of the FUSE file against ``obd export`` of the same stack (mixed codecs, tar envelope)."""
    entry = next(s for s in SMALL if s["name"] == "L0L1L2/cfg-mixed")
    out = tmp_path / "export.img"
    assert main(["export", *image_args(entry), "-o", str(out), "-q"]) == 0
    with Mounted(tmp_path / "mnt", *image_args(entry)) as m:
        subprocess.run(["cmp", str(m.disk), str(out)], check=True)
        subprocess.run(
            ["dd", f"if={m.disk}", f"of={tmp_path / 'direct.img'}", "bs=1M", "iflag=direct"], check=True
        )
    subprocess.run(["cmp", str(tmp_path / "direct.img"), str(out)], check=True)


def data_extents(entry: dict[str, Any]) -> list[tuple[int, int, str | None]]:
    """(offset, length, sha256) of the data runs: overlaybd's own facts, else the engine's extents."""
    if entry.get("extents"):
        raw = fixture_path(entry["extents"]).read_bytes()
        facts = json.loads(bz2.decompress(raw) if entry["extents"].endswith(".bz2") else raw)
        return [(e["offset"] * 512, e["length"] * 512, e["sha256"]) for e in facts if not e["zeroed"]]
    stack = open_layers([materialize(r) for r in entry["layers"]])
    try:
        return [
            (e.offset, e.length, hashlib.sha256(stack.pread(e.offset, e.length)).hexdigest())
            for e in stack.extents()
            if e.kind == "data"
        ]
    finally:
        stack.close()


@pytest.mark.parametrize("entry", EXT4, ids=[s["name"] for s in EXT4])
def test_ext4_stack_file_has_the_devices_data(tmp_path, entry):
    """64 GiB devices: every data run hashes the same through the file; the space after them reads zero."""
    runs = data_extents(entry)
    with Mounted(tmp_path / "mnt", *image_args(entry)) as m:
        assert os.stat(m.disk).st_size == entry["vsize"]
        for offset, length, digest in runs:
            assert sha256_range(m.disk, offset, length) == digest, (offset, length)
        end = max(o + n for o, n, _ in runs)
        with open(m.disk, "rb") as f:
            for off in (end, entry["vsize"] - (1 << 20)):
                if off + (1 << 20) <= entry["vsize"] and not any(
                    o < off + (1 << 20) and off < o + n for o, n, _ in runs
                ):
                    f.seek(off)
                    assert f.read(1 << 20) == bytes(1 << 20)
            f.seek(entry["vsize"])
            assert f.read(4096) == b""


# --- a loop device on the file -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ext4/L1L2/tar-lz4", "ext4/L1/plain"])
def test_loop_mounted_ext4_has_the_expected_tree(tmp_path, name):
    """losetup on the FUSE file, a read-only ext4 mount of the loop device: overlaybd's tree facts."""
    entry = next(s for s in EXT4 if s["name"] == name)
    want = json.loads(fixture_path(entry["tree"]).read_text())
    with Mounted(tmp_path / "mnt", *image_args(entry)) as m, loop_mounted(m.disk, tmp_path / "fs") as dev:
        assert dev.startswith("/dev/loop")
        tree = mounted_tree(tmp_path / "fs")
        assert compare_trees(tree, want) == []
        assert any("xattrs" in row for row in want) == (name == "ext4/L1/plain")  # both kinds covered


# --- a registry image, read lazily ----------------------------------------------------------------
def test_registry_image_mounts_lazily(tmp_path):
    need_fuse()
    reg = RegistryServer(tmp_path / "registry", "noauth").start()
    try:
        entry = next(s for s in SMALL if s["name"] == "L0L1L2/cfg-mixed")
        ref = f"{reg.host}/obd/mixed:v1"
        assert (
            main(
                [
                    "push",
                    *[str(materialize(r)) for r in entry["layers"]],
                    ref,
                    "--insecure-registry",
                    reg.host,
                ]
            )
            == 0
        )
        cache = tmp_path / "cache"
        remote = ["--insecure-registry", reg.host, "--cache-dir", str(cache)]
        with Mounted(tmp_path / "mnt", ref, *remote) as m:
            opened = cache_bytes(cache)
            with open(m.disk, "rb") as f:
                f.seek(32 << 20)
                f.read(4096)
            one_read = cache_bytes(cache)
            assert one_read - opened <= 256 << 10  # one read fetched a few blocks, not the layers
            assert sha256_file(m.disk) == entry["sha256"]
            assert cache_bytes(cache) - one_read > 1 << 20  # reading everything fetched the rest
    finally:
        reg.stop()


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in cache.rglob("*") if p.is_file())


# --- the file ---------------------------------------------------------------------------------------
def test_file_attributes_and_what_a_disk_refuses(tmp_path):
    entry = next(s for s in SMALL if s["name"] == L012)
    layers = [materialize(r) for r in entry["layers"]]
    stack = open_layers(layers)
    mapped = sum(e.length for e in stack.extents() if e.kind == "data")
    stack.close()
    with Mounted(tmp_path / "mnt", *map(str, layers), name="vm.raw") as m:
        assert os.listdir(m.mnt) == ["vm.raw"]
        st = os.stat(m.disk)
        assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_nlink) == (entry["vsize"], 0o444, 1)
        assert st.st_blocks * 512 == mapped  # du shows the mapped data
        assert not (m.mnt / "disk.img").exists()
        with pytest.raises(OSError) as e:
            open(m.disk, "r+b")  # noqa: SIM115
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            (m.mnt / "new").write_bytes(b"x")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        assert int(os.getxattr(m.mnt, "user.obd.pid")) == m.pid
        assert b"3 layer(s), read-only" in os.getxattr(m.mnt, "user.obd.description")
        fs = os.statvfs(m.mnt)
        assert fs.f_blocks * fs.f_frsize == entry["vsize"]


def test_writable_file_keeps_its_size(tmp_path):
    entry = next(s for s in SMALL if s["name"] == L012)
    with Mounted(tmp_path / "mnt", *image_args(entry), "--upper", str(tmp_path / "up")) as m:
        assert stat.S_IMODE(os.stat(m.disk).st_mode) == 0o644
        for size in (0, entry["vsize"] + 4096):
            with pytest.raises(OSError) as e:
                os.truncate(m.disk, size)
            assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            open(m.disk, "wb")  # noqa: SIM115 - O_TRUNC
        assert e.value.errno == errno.EPERM
        os.truncate(m.disk, entry["vsize"])  # the size it has: fine
        fd = os.open(m.disk, os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"x" * 8192, entry["vsize"] - 4096) == 4096  # cut at the end
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x", entry["vsize"])
            assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
        finally:
            os.close(fd)
        os.chmod(m.disk, 0o600)
        os.chown(m.disk, 1234, 5678)
        st = os.stat(m.disk)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (
            0o600,
            1234,
            5678,
            entry["vsize"],
        )
        with open(m.disk, "rb") as f:
            f.seek(entry["vsize"] - 4096)
            assert f.read() == b"x" * 4096


def test_concurrent_reads_of_every_size(tmp_path):
    """Many threads, buffered and O_DIRECT, sizes up to 3 MiB at any alignment: every byte right."""
    entry = next(s for s in SMALL if s["name"] == L012)
    out = tmp_path / "export.img"
    assert main(["export", *image_args(entry), "-o", str(out), "-q"]) == 0
    want = out.read_bytes()
    errors: list[str] = []
    with Mounted(tmp_path / "mnt", *image_args(entry), "--threads", "4") as m:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            direct = seed % 2 == 0
            fd = os.open(m.disk, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            try:
                for _ in range(150):
                    if direct:
                        off = rng.randrange(0, len(want) // 4096) * 4096
                        n = rng.choice([4096, 65536, 1 << 20, 3 << 20])
                    else:
                        off = rng.randrange(0, len(want))
                        n = rng.randrange(1, 3 << 20)
                    got = os.pread(fd, n, off)
                    if got != want[off : off + n]:
                        errors.append(f"seed {seed}: {n} bytes at {off} differ")
                        return
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_corrupt_block_is_eio_and_the_server_carries_on(tmp_path, capfd):
    """A block failing its CRC: that read gets EIO (logged), every other read still works."""
    lsmt = "overlaybd/lsmt/commit/"
    bad = tmp_path / "L1.lz4.commit"
    raw = bytearray(materialize(lsmt + "L1.lz4.commit").read_bytes())
    for pos in range(len(raw) // 4, len(raw) // 2, 4096):
        raw[pos] ^= 0xFF
    bad.write_bytes(raw)
    log = tmp_path / "server.log"
    with Mounted(
        tmp_path / "mnt", str(materialize(lsmt + "L0.lz4.commit")), str(bad), "--log", str(log)
    ) as m:
        fd = os.open(m.disk, os.O_RDONLY | os.O_DIRECT)
        failed = ok = 0
        try:
            for off in range(0, os.fstat(fd).st_size, 1 << 20):
                try:
                    os.pread(fd, 1 << 20, off)
                    ok += 1
                except OSError as e:
                    assert e.errno == errno.EIO
                    failed += 1
        finally:
            os.close(fd)
        assert failed and ok
        assert os.stat(m.disk).st_size == 64 << 20  # still serving
    text = log.read_text()
    assert "obd: ERROR: read" in text and "[EIO]" in text and "Traceback" not in text


# --- errors -----------------------------------------------------------------------------------------
def test_busy_mount_point_and_upper_in_use(tmp_path, capfd):
    entry = next(s for s in SMALL if s["name"] == L012)
    up = ["--upper", str(tmp_path / "up")]
    with Mounted(tmp_path / "mnt", *image_args(entry), *up):
        assert main(["mount", *image_args(entry), str(tmp_path / "mnt")]) == 1
        err = capfd.readouterr().err
        assert "mount point is busy: an obd disk is mounted there" in err and "Traceback" not in err
        (tmp_path / "mnt2").mkdir()
        assert main(["mount", *image_args(entry), *up, str(tmp_path / "mnt2")]) == 1
        err = capfd.readouterr().err
        assert "in use by another process" in err and "Traceback" not in err
        assert mount_entry(tmp_path / "mnt2") is None
        assert main(["mount", *image_args(entry), str(tmp_path / "missing")]) == 1
        assert "mount point does not exist" in capfd.readouterr().err


def test_fuse_unavailable_is_a_clear_error(tmp_path, capfd, monkeypatch):
    import frontends.fuse

    entry = next(s for s in SMALL if s["name"] == L012)
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(frontends.fuse, "FUSE_DEVICE", str(tmp_path / "no-fuse"))
    for mode in ([], ["--foreground"]):
        assert main(["mount", *image_args(entry), str(tmp_path / "mnt"), *mode]) == 1
        err = capfd.readouterr().err
        assert "FUSE is not available" in err and "no-fuse" in err and "Traceback" not in err
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "pyfuse3", None)
    monkeypatch.delitem(sys.modules, "frontends.fuse.fs", raising=False)
    monkeypatch.delattr(frontends.fuse, "fs", raising=False)
    assert main(["mount", *image_args(entry), str(tmp_path / "mnt"), "--foreground"]) == 1
    err = capfd.readouterr().err
    assert "needs pyfuse3 and trio" in err and "setup.sh" in err
    assert mount_entry(tmp_path / "mnt") is None


def test_umount_refuses_a_busy_mount_and_lazy_detaches(tmp_path, capfd):
    entry = next(s for s in SMALL if s["name"] == L012)
    assert main(["umount", str(tmp_path)]) == 1
    assert "not mounted" in capfd.readouterr().err
    m = Mounted(tmp_path / "mnt", *image_args(entry)).mount()
    with open(m.disk, "rb") as f:
        assert main(["umount", str(m.mnt)]) == 1
        assert "mount is busy" in capfd.readouterr().err
        assert mount_entry(m.mnt) is not None
        assert main(["umount", "--lazy", str(m.mnt)]) == 0
        assert mount_entry(m.mnt) is None
        assert len(f.read(1 << 20)) == 1 << 20  # the open file is still served
        assert not wait_gone(m.pid, 0.3)
    assert wait_gone(m.pid, 10)  # gone with the last user
