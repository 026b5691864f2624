"""Real microVM boots (QEMU, TCG on machines without usable KVM) of a small busybox ext4 root.

Each boot takes a few seconds under TCG. The root is made here with ``mke2fs -d`` from a directory
holding the host's busybox-static, an ``/etc/passwd`` with a user, and a helper that prints its
arguments one per line in brackets.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from ext4tree import e2fsck_clean, mke2fs_from_dir, read_file

from fixtures import require_tool
from frontends.run.vm import GuestError, NbdDisk, VMError, VMTimeoutError, boot, resolve_accel
from frontends.run.vm import qemu as vm_qemu

APPLETS = ("sh", "echo", "cat", "printf", "env", "id", "pwd", "sleep", "ls", "true", "mkdir", "rm")
ARGS_SCRIPT = '#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\n'
# Binary output the console must pass unchanged: CR/LF, NUL, 0xff, text that looks like a marker.
BLOB = bytes(random.Random(5).randbytes(60_000)) + b"\r\n\n\r\0\xffOBD-EXIT-0: 1\nOBD-START-x\n" * 50


@pytest.fixture(scope="module")
def root_image(tmp_path_factory):
    """A 16 MiB ext4 image of a busybox root (read-only boots share it; writers take a copy)."""
    require_tool("mke2fs")
    base = tmp_path_factory.mktemp("vmroot")
    tree = base / "tree"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "data", "work dir", "home/alice"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(require_tool("busybox"), tree / "bin" / "busybox")
    for applet in APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "bin" / "args").write_text(ARGS_SCRIPT)
    (tree / "bin" / "args").chmod(0o755)
    (tree / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
    )
    (tree / "etc" / "group").write_text("root:x:0:\nalice:x:1000:\nstaff:x:50:\n")
    os.chmod(tree / "tmp", 0o1777)
    (tree / "data" / "blob").write_bytes(BLOB)
    return mke2fs_from_dir(tree, base / "root.ext4", "16M")


@pytest.fixture
def writable_copy(root_image, tmp_path):
    copy = tmp_path / "rw.ext4"
    shutil.copyfile(root_image, copy)
    return copy


def run(assets, disk, argv, **kwargs):
    kwargs.setdefault("timeout", 120)
    kwargs.setdefault("accel", "tcg")
    return boot(assets, disk, argv, **kwargs)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (to prove no QEMU was left behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


def test_command_prints_and_exits_zero(assets, root_image):
    streamed = []
    result = run(assets, root_image, ["echo", "hello from the VM"], on_output=streamed.append)
    assert result.exit_code == 0
    assert result.output == b"hello from the VM\n"
    assert b"".join(streamed) == result.output
    assert result.accel == "tcg"
    assert set(result.timings) >= {"boot", "command", "shutdown", "total"}
    assert b"obd-init: uptime" in result.console and b"hello" not in result.console
    print(f"\nboot-to-exit {result.timings['total']:.2f} s (boot {result.timings['boot']:.2f} s)")


def test_exit_code_comes_back(assets, root_image):
    result = run(assets, root_image, ["sh", "-c", "echo bye; exit 3"])
    assert (result.exit_code, result.output) == (3, b"bye\n")


def test_argv_with_spaces_quotes_and_newlines_survives(assets, root_image):
    tricky = ["a b", "it's", 'say "hi"', "$(id) `id` ${HOME}", "*", "", "-n", "x\ny\n", "ünï ✓", "a,b=c"]
    result = run(assets, root_image, ["args", *tricky])
    assert result.exit_code == 0
    assert result.output == "".join(f"[{a}]\n" for a in tricky).encode()


def test_env_workdir_and_user_are_honoured(assets, root_image):
    script = 'echo "$GREETING"; pwd; id -u; id -g; echo "$HOME"; echo "$PATH"'
    env = {"GREETING": "hi 'there' \"you\"", "PATH": "/bin"}
    result = run(assets, root_image, ["sh", "-c", script], env=env, workdir="/work dir", user="alice")
    assert result.exit_code == 0
    expected = [env["GREETING"], "/work dir", "1000", "1000", "/home/alice", "/bin"]
    assert result.output.decode().splitlines() == expected
    numeric = run(assets, root_image, ["sh", "-c", "id -u; id -g; echo $HOME"], user="4242:staff")
    assert numeric.output.decode().splitlines() == ["4242", "50", "/"]


def test_binary_output_arrives_byte_exact(assets, root_image):
    result = run(assets, root_image, ["cat", "/data/blob"])
    assert result.exit_code == 0
    assert result.output == BLOB


def test_unknown_user_is_a_clear_error(assets, root_image):
    with pytest.raises(GuestError) as info:
        run(assets, root_image, ["true"], user="mallory")
    assert "user mallory is not in the image's /etc/passwd" in str(info.value)


def test_missing_command_gives_127(assets, root_image):
    result = run(assets, root_image, ["no-such-program", "x"])
    assert result.exit_code == 127
    assert b"no-such-program: command not found" in result.output


def test_command_too_long_for_the_kernel_command_line(assets, root_image, tmp_path, monkeypatch):
    """A 3000-byte variable cannot go on the 2048-byte command line: it travels in the initramfs."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    big = "x" * 3000
    result = run(assets, root_image, ["sh", "-c", 'echo "${#BIG}"'], env={"BIG": big})
    assert (result.exit_code, result.output) == (0, b"3000\n")
    assert list(tmp_path.iterdir()) == []  # the per-boot initrd is gone


def test_writable_root_persists_between_boots(assets, writable_copy):
    first = run(assets, writable_copy, ["sh", "-c", "echo persisted > /data/note; echo done"], readonly=False)
    assert (first.exit_code, first.output) == (0, b"done\n")
    clean, report = e2fsck_clean(writable_copy)
    assert clean, report
    assert read_file(writable_copy, "/data/note") == b"persisted\n"
    second = run(assets, writable_copy, ["cat", "/data/note"])
    assert (second.exit_code, second.output) == (0, b"persisted\n")


def test_readonly_root_refuses_writes_but_tmp_is_writable(assets, root_image):
    script = "{ echo x > /data/f; } 2>/dev/null; echo $?; echo ok > /tmp/t && cat /tmp/t"
    result = run(assets, root_image, ["sh", "-c", script])
    assert result.exit_code == 0
    first, second = result.output.decode().splitlines()
    assert first != "0" and second == "ok"


def test_unmountable_root_is_a_clear_error(assets, tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * (4 << 20))
    with pytest.raises(GuestError) as info:
        run(assets, blank, ["true"])
    assert "cannot mount the root filesystem" in str(info.value)


def test_qemu_refusing_to_start_is_a_vm_error(assets, root_image):
    with pytest.raises(VMError) as info:
        run(assets, root_image, ["true"], extra_drive_opts={"no-such-option": 1})
    assert "QEMU failed" in str(info.value) and "no-such-option" in str(info.value)
    assert not isinstance(info.value, GuestError)


def test_timeout_kills_qemu_and_leaves_nothing_behind(assets, root_image, tmp_path):
    disk = tmp_path / "unique-timeout-disk.ext4"
    shutil.copyfile(root_image, disk)
    started = time.monotonic()
    with pytest.raises(VMTimeoutError):
        run(assets, disk, ["sleep", "1000"], timeout=5)
    assert time.monotonic() - started < 60
    assert processes_mentioning(str(disk)) == []


def test_interrupt_while_streaming_kills_qemu(assets, root_image, tmp_path):
    """An exception in the output callback (Ctrl-C arrives the same way) stops QEMU before it propagates."""
    disk = tmp_path / "unique-interrupt-disk.ext4"
    shutil.copyfile(root_image, disk)

    def interrupt(_chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(assets, disk, ["sh", "-c", "echo tick; sleep 1000"], on_output=interrupt)
    assert processes_mentioning(str(disk)) == []


@pytest.fixture
def nbd_socket(root_image, tmp_path):
    nbdkit = require_tool("nbdkit")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [nbdkit, "-f", "-r", "-U", str(sock), "file", str(root_image)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "nbdkit did not create its socket"
            time.sleep(0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_boot_from_an_nbd_export(assets, nbd_socket):
    by_uri = run(assets, f"nbd+unix:///?socket={nbd_socket}", ["cat", "/etc/group"])
    assert by_uri.exit_code == 0 and b"staff:x:50:" in by_uri.output
    by_object = run(assets, NbdDisk(socket=str(nbd_socket), reconnect_delay=2), ["args", "nbd ok"])
    assert (by_object.exit_code, by_object.output) == (0, b"[nbd ok]\n")


def test_auto_accel_probes_once_and_boots(assets, root_image, monkeypatch):
    vm_qemu._accel_memo.clear()
    (assets.cache_dir / "accel-probe.json").unlink(missing_ok=True)
    chosen = resolve_accel(assets, "auto")
    assert chosen in ("kvm", "tcg")
    assert (assets.cache_dir / "accel-probe.json").is_file()

    def no_more_probes(*args, **kwargs):
        raise AssertionError("the KVM probe ran again")

    monkeypatch.setattr(vm_qemu, "probe_kvm", no_more_probes)
    assert resolve_accel(assets, "auto") == chosen  # remembered in this process
    vm_qemu._accel_memo.clear()
    assert resolve_accel(assets, "auto") == chosen  # remembered on disk for this host boot
    result = boot(assets, root_image, ["echo", "auto"], accel="auto", timeout=120)
    assert (result.exit_code, result.output, result.accel) == (0, b"auto\n", chosen)
