"""Writing through ``obd mount --upper``: dd with fsync, unmount, remount, commit, snapshot, fork, signals.

The same upper directories as the NBD frontend (``obd.image.upper``): what is written through the
FUSE file is an ordinary overlaybd RW layer that ``obd commit`` seals into a layer that stacks.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fuse_mount import Mounted, _no_mount_left_behind, image_args, need_fuse, wait_gone  # noqa: F401

from fixtures import materialize, require_tool, stack
from frontends.fuse import mount_entry, server_pid
from obd.cli import main

ENTRY = stack("L0L1L2/lz4")


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def exported(tmp_path: Path, *args: str) -> bytes:
    out = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}.img"
    assert main(["export", *args, "-o", str(out), "-q"]) == 0
    return out.read_bytes()


def dd(src: Path, disk: Path, *, seek_bytes: int, bs: int) -> None:
    """``dd conv=notrunc,fsync`` of ``src`` into the disk at a byte offset (any alignment)."""
    subprocess.run(
        [
            "dd",
            f"if={src}",
            f"of={disk}",
            f"bs={bs}",
            f"seek={seek_bytes}",
            "oflag=seek_bytes",
            "conv=notrunc,fsync",
            "status=none",
        ],
        check=True,
    )


@pytest.mark.parametrize("flavour", ["append", "sparse"])
def test_writes_survive_remount_and_commit_into_a_layer_that_stacks(tmp_path, flavour):
    need_fuse()
    layers = image_args(ENTRY)
    model = bytearray(exported(tmp_path, *layers))
    upper = tmp_path / "up"
    rng = random.Random(7)
    writes = [(5 << 20, 1 << 20), (12345, 1000), ((64 << 20) - 4096, 4096), (3 * 4096 + 100, 70000)]
    extra = ["--sparse"] if flavour == "sparse" else []
    with Mounted(tmp_path / "mnt", *layers, "--upper", str(upper), *extra) as m:
        for i, (off, n) in enumerate(writes):
            data = rng.randbytes(n)
            src = tmp_path / f"w{i}"
            src.write_bytes(data)
            dd(src, m.disk, seek_bytes=off, bs=n)
            model[off : off + n] = data
        fd = os.open(m.disk, os.O_WRONLY)
        try:  # plain pwrite + fsync too, a few hundred small ones
            for _ in range(300):
                off, n = rng.randrange(0, len(model) - 9000), rng.randrange(1, 9000)
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off : off + n] = data
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(m.disk, "rb") as f:
            assert sha(f.read()) == sha(model)  # read back at once, before any remount
    assert (upper / "config.v1.json").is_file()
    with Mounted(tmp_path / "mnt", "--upper", str(upper)) as m:  # the upper alone reopens it
        with open(m.disk, "rb") as f:
            assert sha(f.read()) == sha(model)
        assert os.stat(m.disk).st_blocks > 0
    rw = sorted((upper / "rw").iterdir())
    data_file = next(p for p in rw if p.suffix == ".data")
    out = tmp_path / "upper.commit"
    files = (
        [str(data_file), str(data_file.with_suffix(".index"))] if flavour == "append" else [str(data_file)]
    )
    assert main(["commit", *files, str(out), "-q"]) == 0
    assert sha(exported(tmp_path, *layers, str(out))) == sha(model)  # the committed layer stacks
    # a snapshot, then a fork over it: both read the same device
    assert main(["snapshot", str(upper), "-q"]) == 0
    assert main(["fork", str(upper), str(tmp_path / "fork")]) == 0
    with Mounted(tmp_path / "mnt", "--upper", str(tmp_path / "fork")) as m, open(m.disk, "rb") as f:
        assert sha(f.read()) == sha(model)


def start_foreground(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``obd mount … --foreground`` as a child process; returns once its file is served."""
    need_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "obd", "mount", *args, str(mnt), "--foreground"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()  # the readiness line
    assert line.startswith("obd: serving ") and "disk.img" in line, line + proc.stderr.read().decode()
    return proc, mnt


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly_and_keeps_the_writes(tmp_path, sig):
    layers = image_args(ENTRY)
    upper = str(tmp_path / "up")
    proc, mnt = start_foreground(tmp_path, *layers, "--upper", upper)
    try:
        with open(mnt / "disk.img", "r+b") as f:  # no fsync: a clean stop still writes everything
            f.seek(1 << 20)
            f.write(b"written before the signal" * 1000)
        proc.send_signal(sig)
        assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
        assert mount_entry(mnt) is None
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    with Mounted(mnt, "--upper", upper) as m, open(m.disk, "rb") as f:
        f.seek(1 << 20)
        assert f.read(25000) == b"written before the signal" * 1000


def test_sigterm_to_the_background_server(tmp_path):
    m = Mounted(tmp_path / "mnt", *image_args(ENTRY), "--upper", str(tmp_path / "up")).mount()
    assert m.pid is not None and server_pid(m.mnt) == m.pid
    os.kill(m.pid, signal.SIGTERM)
    assert wait_gone(m.pid, 30)
    deadline = time.monotonic() + 5
    while mount_entry(m.mnt) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mount_entry(m.mnt) is None
    with Mounted(tmp_path / "mnt", "--upper", str(tmp_path / "up")):  # the lock went with it
        pass


def test_background_server_errors_reach_the_caller(tmp_path):
    """A bad image: `obd mount` (a separate process, as a user runs it) fails with the reason."""
    need_fuse()
    (tmp_path / "mnt").mkdir()
    bad = tmp_path / "bad.commit"
    bad.write_bytes(b"\0" * 8192)
    proc = subprocess.run(
        [sys.executable, "-m", "obd", "mount", str(bad), str(tmp_path / "mnt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("obd: error: ") and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr and mount_entry(tmp_path / "mnt") is None
    # and the success case returns (does not keep the caller's pipes open) with the server running
    ok = subprocess.run(
        [sys.executable, "-m", "obd", "mount", str(materialize(ENTRY["layers"][0])), str(tmp_path / "mnt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "is ready" in ok.stderr, ok.stderr
    pid = server_pid(tmp_path / "mnt")
    assert pid is not None
    require_tool("fusermount3")
    assert main(["umount", str(tmp_path / "mnt")]) == 0
    assert wait_gone(pid, 1)
