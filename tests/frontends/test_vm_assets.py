"""VM assets (kernel from apt, initramfs built here) and the host side of the guest protocol, without booting.

Booting is covered by ``test_vm_boot.py``. The asset build test downloads the Debian cloud kernel
through the configured apt mirror, as ``ensure_assets`` does on a fresh machine.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from fixtures import require_tool
from frontends.run.vm import assets as vm_assets
from frontends.run.vm import cmdline as vm_cmdline
from frontends.run.vm import ensure_assets
from frontends.run.vm.cmdline import parse_tsc_khz_from_log
from frontends.run.vm.cpio import CpioWriter
from frontends.run.vm.kernel import elf_has_pvh_note, extract_vmlinux
from frontends.run.vm.modules import modinfo
from frontends.run.vm.qemu import (
    DEFAULT_PATH,
    ConsoleScanner,
    NbdDisk,
    _disk_args,
    decode_command,
    encode_command,
)
from obd.errors import ConfigError, ObdError

# --- a tiny cpio newc reader, to check what the writer produced -------------------------------------


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """``{name: (mode, data, (rdevmajor, rdevminor))}`` of a newc archive (first archive only)."""
    out = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        body_at = name_at + namesize + (-(110 + namesize) % 4)
        body = data[body_at : body_at + filesize]
        pos = body_at + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_cpio_writer_round_trip_is_deterministic():
    def make():
        w = CpioWriter()
        w.add_dir("obd")
        w.add_file("obd/cmd", b"1,abc", 0o600)
        w.add_file("odd", b"12345", 0o755)  # length not a multiple of 4: padding
        w.add_symlink("bin/sh", "busybox")
        w.add_device("dev/console", 0o600, 5, 1, char=True)
        return w.finish()

    data = make()
    assert data == make()
    assert len(data) % 512 == 0
    entries = read_cpio(data)
    assert entries["obd"][0] == 0o040755
    assert entries["obd/cmd"] == (0o100600, b"1,abc", (0, 0))
    assert entries["odd"] == (0o100755, b"12345", (0, 0))
    assert entries["bin/sh"] == (0o120777, b"busybox", (0, 0))
    assert entries["dev/console"] == (0o020600, b"", (5, 1))


# --- the command encoding -------------------------------------------------------------------------

TRICKY = [
    "printf",
    "a b",
    "it's",
    'say "hi"',
    "$(reboot) `id` ${HOME} $$",
    "*",
    "",
    "-n",
    "line1\nline2\n",
    "tab\there",
    "ünïcødé ✓",
    "a,b=c",
]


def test_encode_command_round_trips_every_byte_that_matters():
    spec = encode_command(
        TRICKY, env={"A": "x y", "EMPTY": "", "Q": "'\"\n"}, workdir="/w d", user="alice:staff"
    )
    assert " " not in spec and "'" not in spec and '"' not in spec and "\n" not in spec
    got = decode_command(spec)
    assert got["argv"] == [a.encode() for a in TRICKY]
    assert got["env"] == [b"PATH=" + DEFAULT_PATH.encode(), b"A=x y", b"EMPTY=", b"Q='\"\n"]
    assert got["workdir"] == b"/w d"
    assert got["user"] == b"alice:staff"


def test_encode_command_keeps_an_explicit_path_and_accepts_env_lists():
    got = decode_command(encode_command(["x"], env=["PATH=/opt/bin", "B=1=2"]))
    assert got["env"] == [b"PATH=/opt/bin", b"B=1=2"]
    assert got["workdir"] == b"/" and got["user"] == b""


@pytest.mark.parametrize(
    "kwargs",
    [
        {"argv": []},
        {"argv": ["a\0b"]},
        {"argv": ["ls"], "workdir": "relative"},
        {"argv": ["ls"], "env": {"A=B": "1"}},
        {"argv": ["ls"], "env": {"": "1"}},
        {"argv": ["ls"], "env": ["NOEQUALS"]},
        {"argv": ["ls"], "env": ["=value"]},
        {"argv": ["ls"], "user": "a\0"},
    ],
)
def test_encode_command_rejects_what_cannot_be_passed(kwargs):
    argv = kwargs.pop("argv")
    with pytest.raises(ConfigError):
        encode_command(argv, **kwargs)


# --- the console protocol ---------------------------------------------------------------------------

NONCE = "0123456789abcdef"
STREAM = (
    b"[    0.25] PCI: Fatal: No config space access function found\r\n"
    b"obd-init: uptime 1.02 init\n"
    b"OBD-START-" + NONCE.encode() + b"\n"
    b"hello\nOBD-EXIT-ffffffffffffffff: 9\nOBD-EXIT-0123\npartial OBD-EX"
    b"\x00\xff binary\r\nno newline at the end"
    b"OBD-EXIT-" + NONCE.encode() + b": 42\n"
    b"[    2.00] reboot: Power down\r\n"
)
OUTPUT = (
    b"hello\nOBD-EXIT-ffffffffffffffff: 9\nOBD-EXIT-0123\npartial OBD-EX"
    b"\x00\xff binary\r\nno newline at the end"
)


@pytest.mark.parametrize("chunking", ["whole", "bytes", "random"])
def test_console_scanner_splits_output_for_any_chunking(chunking):
    streamed = []
    scanner = ConsoleScanner(NONCE, streamed.append)
    if chunking == "whole":
        pieces = [STREAM]
    elif chunking == "bytes":
        pieces = [STREAM[i : i + 1] for i in range(len(STREAM))]
    else:
        rng = random.Random(7)
        pieces, at = [], 0
        while at < len(STREAM):
            n = rng.randint(1, 40)
            pieces.append(STREAM[at : at + n])
            at += n
    for piece in pieces:
        scanner.feed(piece)
    assert scanner.exit_code == 42
    assert bytes(scanner.output) == OUTPUT
    assert b"".join(streamed) == OUTPUT
    assert b"PCI: Fatal" in scanner.console and b"hello" not in scanner.console
    assert b"Power down" in scanner.tail
    assert scanner.error is None


def test_console_scanner_reports_guest_errors_and_probe_answers():
    scanner = ConsoleScanner(NONCE)
    scanner.feed(b"noise\nOBD-ERROR-" + NONCE.encode() + b": cannot mount the root\r\nOBD-EXIT-")
    assert scanner.error == "cannot mount the root"
    assert scanner.state == "boot" and scanner.exit_code is None
    probe = ConsoleScanner(NONCE)
    probe.feed(b"OBD-PROBE-OK-" + NONCE.encode() + b"\n")
    assert probe.probe_ok
    forged = ConsoleScanner(NONCE)
    forged.feed(b"OBD-START-ffffffffffffffff\nOBD-PROBE-OK-ffffffffffffffff\n")
    assert forged.state == "boot" and not forged.probe_ok


# --- disks ------------------------------------------------------------------------------------------


def test_nbd_uris_and_blockdev_json():
    unix = NbdDisk.parse("nbd+unix:///exp%20a?socket=/run/x.sock", reconnect_delay=5)
    assert unix == NbdDisk(socket="/run/x.sock", export="exp a", reconnect_delay=5)
    node = unix.blockdev(readonly=True)
    assert node == {
        "driver": "nbd",
        "server": {"type": "unix", "path": "/run/x.sock"},
        "read-only": True,
        "export": "exp a",
        "reconnect-delay": 5,
    }
    tcp = NbdDisk.parse("nbd://127.0.0.1:10810/")
    assert tcp.blockdev(readonly=False)["server"] == {"type": "inet", "host": "127.0.0.1", "port": "10810"}
    for bad in ("nbd+unix:///x", "http://x/", "nbd:///x"):
        with pytest.raises(ConfigError):
            NbdDisk.parse(bad)


def test_disk_args_for_files_with_awkward_names(tmp_path):
    img = tmp_path / "a,b c.img"
    img.write_bytes(b"\0" * 4096)
    args = _disk_args(str(img), readonly=False, extra={"cache": {"direct": True}})
    assert args[0] == "-blockdev" and args[2:] == ["-device", "virtio-blk-device,drive=d0"]
    import json

    node = json.loads(args[1])
    assert node["file"]["filename"] == str(img)  # JSON needs no comma escaping
    assert node["read-only"] is False and node["cache"] == {"direct": True} and node["node-name"] == "d0"
    with pytest.raises(ObdError):
        _disk_args(str(tmp_path / "missing.img"), readonly=True, extra=None)


# --- host facts -------------------------------------------------------------------------------------


def test_tsc_rate_from_kernel_log_lines():
    log = (
        "[0.0] tsc: Detected 2596.136 MHz processor\n"
        "[1.2] tsc: Refined TSC clocksource calibration: 2596.149 MHz\n"
    )
    assert parse_tsc_khz_from_log(log) == 2596149
    assert parse_tsc_khz_from_log("[0.0] tsc: Detected 2596.136 MHz processor\n") == 2596136
    assert parse_tsc_khz_from_log("nothing here") is None


def test_host_tsc_rate_is_plausible_and_reaches_the_cmdline(monkeypatch):
    khz = vm_cmdline.host_tsc_khz()
    assert khz is None or 100_000 < khz < 10_000_000
    assert "tsc_early_khz=1234567" in vm_cmdline.base_cmdline(1234567)
    line = vm_cmdline.base_cmdline()
    assert line.startswith("console=ttyS0 quiet panic=-1")
    assert (f"tsc_early_khz={khz}" in line) == (khz is not None)


# --- building the assets ----------------------------------------------------------------------------


def test_ensure_assets_builds_once_caches_and_rebuilds_a_changed_init(tmp_path, monkeypatch):
    """Two concurrent builders on an empty cache, a cached call with apt gone, then a changed init."""
    require_tool("busybox")
    cache = tmp_path / "vm-cache"
    results, errors = [], []

    def build():
        try:
            results.append(ensure_assets(cache))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    first, second = results
    assert first == second
    a = first
    assert a.kernel_version.endswith("-cloud-amd64")
    assert a.kernel.name == "vmlinux" and a.bzimage.name == "vmlinuz"
    kernel = a.kernel.read_bytes()
    assert kernel[:4] == b"\x7fELF" and elf_has_pvh_note(kernel)
    assert extract_vmlinux(a.bzimage.read_bytes()) == kernel
    assert a.modules[-1] == "virtio_blk.ko"
    order = list(a.modules)
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_mmio.ko")
    assert {"virtio_pci.ko", "virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko"} <= set(order)

    entries = read_cpio(a.initramfs.read_bytes())
    assert entries["init"] == (0o100755, vm_assets.INIT_SCRIPT.read_bytes(), (0, 0))
    assert entries["dev/console"] == (0o020600, b"", (5, 1))
    assert entries["bin/sh"][1] == b"busybox" and entries["bin/busybox"][0] == 0o100755
    assert entries["obd/modules"][1].decode().split() == order
    for name in order:
        info = modinfo(entries[f"lib/modules/{name}"][1])
        assert info["name"] == [name.removesuffix(".ko")]
    leftovers = [p.name for p in (cache / a.kernel_version).iterdir() if p.name.startswith(".")]
    assert leftovers == [".lock"]  # no temporary directories left

    # Cached: no program runs (apt-get/dpkg-deb are unreachable), the same files come back untouched.
    stamps = {p: p.stat().st_mtime_ns for p in (a.kernel, a.initramfs, a.bzimage)}
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setattr(vm_assets.shutil, "which", lambda *args, **kw: None)
    again = ensure_assets(cache)
    assert again == a
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    monkeypatch.undo()

    # A different init script gets a new initramfs; the kernel is reused, the old initramfs stays.
    changed = tmp_path / "init.sh"
    changed.write_bytes(vm_assets.INIT_SCRIPT.read_bytes() + b"# changed\n")
    monkeypatch.setattr(vm_assets, "INIT_SCRIPT", changed)
    rebuilt = ensure_assets(cache)
    assert rebuilt.initramfs != a.initramfs and a.initramfs.is_file()
    assert rebuilt.kernel == a.kernel and rebuilt.kernel.stat().st_mtime_ns == stamps[a.kernel]
    assert read_cpio(rebuilt.initramfs.read_bytes())["init"][1] == changed.read_bytes()

    # Extra modules join the list after their dependencies.
    with_console = ensure_assets(cache, extra_modules=["virtio_console"])
    assert with_console.modules[-1] == "virtio_console.ko"
    assert with_console.initramfs not in (a.initramfs, rebuilt.initramfs)


def test_ensure_assets_names_the_package_apt_cannot_provide(tmp_path):
    bogus = "linux-image-0.0.0-0-obd-nonexistent-amd64"
    with pytest.raises(ObdError) as info:
        ensure_assets(tmp_path / "c", kernel_package=bogus)
    assert bogus in str(info.value)
    assert not [p for p in (tmp_path / "c" / bogus.removeprefix("linux-image-")).iterdir() if p.is_dir()]
    with pytest.raises(ObdError):
        ensure_assets(tmp_path / "c", kernel_package="busybox-static")


def test_extract_vmlinux_and_modinfo_reject_garbage():
    with pytest.raises(ObdError):
        extract_vmlinux(b"\0" * 4096)
    with pytest.raises(ObdError):
        modinfo(b"not an elf file at all, certainly not a module" * 2)
    assert not elf_has_pvh_note(b"\x7fELF" + b"\0" * 60)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert vm_assets.default_cache_dir() == tmp_path / "obd" / "vm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert vm_assets.default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "obd" / "vm"
