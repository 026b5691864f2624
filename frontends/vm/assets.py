"""The microVM's kernel and initramfs: fetched from Debian, built once, cached.

obd boots images as disks of a QEMU ``microvm``. That needs a kernel and a small initramfs:

* the kernel is Debian's cloud kernel (``linux-image-<version>-cloud-amd64``), the version the
  ``linux-image-cloud-amd64`` meta-package currently depends on, fetched with ``apt-get download``;
  its compressed payload is unpacked into the ELF ``vmlinux`` QEMU boots through PVH (it skips the
  in-guest decompression), and the ``bzImage`` is kept as a fallback;
* the initramfs is built here: busybox-static, the virtio modules the cloud kernel builds as modules
  (with their dependencies, found in each module's ``.modinfo``), and ``initramfs_init.sh`` as
  ``/init``, written as a deterministic cpio "newc" archive (uncompressed: it boots faster).

Everything lives under ``$XDG_CACHE_HOME/obd/vm`` (default ``~/.cache/obd/vm``)::

    resolved.json                    meta-package -> kernel package, valid while the apt lists are unchanged
    <kernel-version>/kernel.deb      the downloaded package (re-extracted when other modules are wanted)
    <kernel-version>/kernel/         vmlinuz, vmlinux (PVH), config, meta.json
    <kernel-version>/initramfs-<key>.cpio (+ .json)

``<key>`` hashes the init script, the module list, the busybox binary and the archive layout, so a
changed init gets a new initramfs. Builders hold a lock file and publish every file or directory
with an atomic rename, so concurrent callers never see a half-written cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from obd.errors import ObdError

#: Top-level modules the init loads (dependencies are added automatically): the microvm's virtio-mmio
#: transport, the PCI transport (q35/pc machines) and the block driver.
BASE_MODULES: tuple[str, ...] = ("virtio_mmio", "virtio_pci", "virtio_blk")

#: The Debian meta-package whose dependency names the current cloud kernel.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"

#: Bumped whenever the archive layout changes, so old cached initramfs files are not reused.
LAYOUT_VERSION = 2

INIT_SCRIPT = Path(__file__).with_name("initramfs_init.sh")

_STATIC_BUSYBOX_PACKAGE = "busybox-static"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Assets:
    """What a microVM boot needs; see :func:`ensure_assets`."""

    kernel: Path
    """What QEMU boots (``-kernel``): the PVH ``vmlinux`` if it could be unpacked, else ``bzimage``."""
    initramfs: Path
    cmdline_base: str
    """Kernel command line every boot starts with (console, quiet, ``tsc_early_khz=`` under TCG...)."""
    kernel_version: str
    bzimage: Path
    modules: tuple[str, ...]
    """Module file names in the order the init loads them."""
    cache_dir: Path
    """The cache root (``.../obd/vm``); the KVM probe result is kept here too."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/obd/vm``, or ``~/.cache/obd/vm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "obd" / "vm"


def ensure_assets(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: Progress | None = None,
    kernel_package: str | None = None,
    extra_modules: Iterable[str] = (),
) -> Assets:
    """Return the cached kernel + initramfs, downloading and building whatever is missing.

    ``kernel_package`` pins a kernel package (``linux-image-6.1.0-56-cloud-amd64``); by default the one
    ``linux-image-cloud-amd64`` depends on is used. ``extra_modules`` (module names such as
    ``"overlay"``) are loaded by the init after the virtio ones. ``progress`` receives one line per
    step that does real work; a fully cached call takes milliseconds and runs no program.

    Raises :class:`~obd.errors.ObdError` naming the package when apt cannot provide it.
    """
    say = progress or (lambda _msg: None)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    package = kernel_package or _resolve_kernel_package(root, say)
    if not package.startswith("linux-image-"):
        raise ObdError("not a Debian kernel image package", field="kernel_package", value=package)
    version = package[len("linux-image-") :]
    kdir = root / version
    kdir.mkdir(exist_ok=True)

    wanted = tuple(dict.fromkeys((*BASE_MODULES, *(_modname(m) for m in extra_modules))))
    busybox = _find_static_busybox(root, say)
    init_text = INIT_SCRIPT.read_bytes()
    key = _initramfs_key(init_text, wanted, busybox)
    initramfs = kdir / f"initramfs-{key}.cpio"
    sidecar = initramfs.with_suffix(".json")

    kernel_meta = _load_json(kdir / "kernel" / "meta.json")
    if kernel_meta is None or not initramfs.is_file() or _load_json(sidecar) is None:
        with _locked(kdir / ".lock"):
            _build(kdir, package, version, wanted, busybox, init_text, initramfs, sidecar, say)
        kernel_meta = _load_json(kdir / "kernel" / "meta.json")
    side = _load_json(sidecar)
    if kernel_meta is None or side is None:
        raise ObdError("the VM asset cache is inconsistent after a build", path=kdir)

    bzimage = kdir / "kernel" / "vmlinuz"
    kernel = kdir / "kernel" / "vmlinux" if kernel_meta.get("pvh") else bzimage
    return Assets(
        kernel=kernel,
        initramfs=initramfs,
        cmdline_base=base_cmdline(),
        kernel_version=version,
        bzimage=bzimage,
        modules=tuple(side["modules"]),
        cache_dir=root,
    )


def base_cmdline(tsc_khz: int | None = None) -> str:
    """The kernel command line every obd boot starts with.

    ``quiet`` keeps kernel messages off the serial console; ``panic=-1`` turns a panic into a reboot,
    which ``-no-reboot`` turns into a QEMU exit; ``tsc_early_khz=`` (the host TSC rate, which is what
    the guest sees under TCG) avoids the TSC calibration that hangs some TCG boots on ``microvm``,
    which has neither HPET nor PM timer (PLATFORM.md §2).
    """
    khz = tsc_khz if tsc_khz is not None else host_tsc_khz()
    parts = ["console=ttyS0", "quiet", "panic=-1"]
    if khz:
        parts.append(f"tsc_early_khz={khz}")
    return " ".join(parts)


# --- the host TSC rate ---------------------------------------------------------------------------


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz (what a TCG guest's TSC runs at), or None when unknown.

    Tried in order: ``$OBD_TSC_KHZ``; ``/sys/devices/system/cpu/cpu0/tsc_freq_khz`` (some kernels);
    the kernel log's ``tsc: Refined TSC clocksource calibration`` / ``tsc: Detected`` lines (``dmesg``
    is often restricted to root); a direct measurement of ``rdtsc`` against the monotonic clock
    (x86-64 only); ``/proc/cpuinfo``'s ``cpu MHz`` (exact in VMs, the current clock on bare metal).
    """
    env = os.environ.get("OBD_TSC_KHZ", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    with contextlib.suppress(OSError, ValueError):
        khz = int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text().strip())
        if khz > 0:
            return khz
    for source in (_tsc_khz_from_dmesg, _tsc_khz_measured, _tsc_khz_from_cpuinfo):
        khz = source()
        if khz:
            return khz
    return None


def parse_tsc_khz_from_log(text: str) -> int | None:
    """kHz from kernel log lines: the refined calibration wins over the early detection."""
    for pattern in (
        r"Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz",
        r"tsc: Detected (\d+)\.(\d{3}) MHz",
    ):
        found = re.findall(pattern, text)
        if found:
            mhz, frac = found[-1]
            return int(mhz) * 1000 + int(frac)
    return None


def _tsc_khz_from_dmesg() -> int | None:
    exe = shutil.which("dmesg") or shutil.which("dmesg", path=os.pathsep.join(("/bin", *_SBIN)))
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_tsc_khz_from_log(proc.stdout) if proc.returncode == 0 else None


def _tsc_khz_measured() -> int | None:
    """Count TSC ticks over a few 20 ms windows with a 10-byte rdtsc routine called through ctypes."""
    import ctypes
    import mmap
    import platform
    import statistics

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    # rdtsc; shl rdx, 32; or rax, rdx; ret
    code = bytes.fromhex("0f3148c1e2204809d0c3")
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None  # W^X policies (SELinux execmem, PaX) forbid it
    try:
        page.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
        rates = []
        for _ in range(3):
            t0, c0 = time.perf_counter_ns(), rdtsc()
            time.sleep(0.02)
            c1, t1 = rdtsc(), time.perf_counter_ns()
            if t1 > t0 and c1 > c0:
                rates.append((c1 - c0) * 1_000_000 / (t1 - t0))
        del rdtsc
        return round(statistics.median(rates)) if rates else None
    finally:
        with contextlib.suppress(BufferError):
            page.close()


def _tsc_khz_from_cpuinfo() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(r"^cpu MHz\s*:\s*(\d+)(?:\.(\d+))?", text, re.M)
    if not found:
        return None
    frac = (found.group(2) or "0")[:3].ljust(3, "0")
    return int(found.group(1)) * 1000 + int(frac)


# --- kernel package resolution -------------------------------------------------------------------


def _apt_lists_stamp() -> str:
    """Changes whenever ``apt-get update`` changes the package lists."""
    h = hashlib.sha256()
    lists = Path("/var/lib/apt/lists")
    try:
        entries = sorted(os.scandir(lists), key=lambda e: e.name)
    except OSError:
        return "no-lists"
    for entry in entries:
        if entry.is_file():
            st = entry.stat()
            h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _resolve_kernel_package(root: Path, say: Progress) -> str:
    """The kernel package ``linux-image-cloud-amd64`` depends on, remembered per apt-lists state."""
    stamp = _apt_lists_stamp()
    memo = root / "resolved.json"
    known = _load_json(memo)
    if known and known.get("meta") == KERNEL_META_PACKAGE and known.get("stamp") == stamp:
        return str(known["package"])
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        cached = _newest_cached_kernel(root)
        if cached:
            return cached
        raise ObdError(
            "apt-cache is not available to find the current cloud kernel, and none is cached",
            path=root,
            field="package",
            value=KERNEL_META_PACKAGE,
        )
    say(f"resolving {KERNEL_META_PACKAGE}")
    proc = subprocess.run(
        [apt_cache, "depends", "--important", KERNEL_META_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    names = re.findall(r"^\s*\|?Depends:\s*(linux-image-\S+)", proc.stdout, re.M)
    if proc.returncode != 0 or not names:
        cached = _newest_cached_kernel(root)
        if cached:
            return cached
        raise ObdError(
            f"apt-cache does not know it (run apt-get update?): {_tail(proc.stderr or proc.stdout)}",
            field="package",
            value=KERNEL_META_PACKAGE,
        )
    package = names[0]
    _write_json(memo, {"meta": KERNEL_META_PACKAGE, "stamp": stamp, "package": package})
    return package


def _newest_cached_kernel(root: Path) -> str | None:
    found = []
    for meta_file in root.glob("*/kernel/meta.json"):
        meta = _load_json(meta_file)
        if meta and meta.get("package"):
            found.append((meta_file.stat().st_mtime, meta["package"]))
    return max(found)[1] if found else None


def _apt_download(package: str, dest_dir: Path, say: Progress) -> Path:
    """``apt-get download PACKAGE`` into ``dest_dir``; return the .deb."""
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise ObdError("apt-get is not available to download it", field="package", value=package)
    say(f"downloading {package}")
    cmd = [apt_get, "-q", "download", package]
    if os.geteuid() == 0:
        # apt would drop to the _apt user, which cannot write into our private temp dir.
        cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
    proc = subprocess.run(cmd, cwd=dest_dir, capture_output=True, text=True, check=False)
    debs = sorted(dest_dir.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise ObdError(
            f"apt-get download failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}",
            field="package",
            value=package,
        )
    return debs[0]


# --- the build -------------------------------------------------------------------------------------


def _build(
    kdir: Path,
    package: str,
    version: str,
    wanted: tuple[str, ...],
    busybox: Path,
    init_text: bytes,
    initramfs: Path,
    sidecar: Path,
    say: Progress,
) -> None:
    """Fill in whatever of ``kdir`` is missing (called with the lock held)."""
    kernel_done = _load_json(kdir / "kernel" / "meta.json") is not None
    if kernel_done and initramfs.is_file() and _load_json(sidecar) is not None:
        return  # another builder finished while we waited for the lock
    deb = kdir / "kernel.deb"
    if not deb.is_file():
        with tempfile.TemporaryDirectory(dir=kdir, prefix=".dl-") as tmp:
            got = _apt_download(package, Path(tmp), say)
            os.replace(got, deb)
    with tempfile.TemporaryDirectory(dir=kdir, prefix=".build-") as tmp_name:
        tmp = Path(tmp_name)
        tree = tmp / "deb"
        say(f"unpacking {deb.name} ({package})")
        _run(["dpkg-deb", "-x", str(deb), str(tree)], "dpkg-deb -x", package)
        if not kernel_done:
            _publish_kernel(tmp, tree, kdir / "kernel", package, version, say)
        if not (initramfs.is_file() and _load_json(sidecar) is not None):
            say(f"building {initramfs.name}")
            mod_dir = tree / "lib" / "modules" / version
            if not mod_dir.is_dir():
                raise ObdError("the package has no lib/modules for its version", path=deb, value=version)
            order = resolve_modules(mod_dir, wanted)
            files = []
            for name, path in order:
                files.append((f"{name}.ko", _read_module(path)))
            data = build_initramfs(init_text, busybox, files)
            _write_json(sidecar, {"modules": [f for f, _ in files], "kernel_version": version})
            _publish_bytes(initramfs, data)


def _publish_kernel(tmp: Path, tree: Path, target: Path, package: str, version: str, say: Progress) -> None:
    boot = tree / "boot"
    vmlinuz = boot / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        candidates = sorted(boot.glob("vmlinuz-*"))
        if not candidates:
            raise ObdError("the package holds no boot/vmlinuz-*", field="package", value=package)
        vmlinuz = candidates[0]
    out = tmp / "kernel"
    out.mkdir()
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    config = boot / f"config-{version}"
    if config.is_file():
        shutil.copyfile(config, out / "config")
    say("extracting the PVH vmlinux")
    pvh = False
    try:
        raw = extract_vmlinux(vmlinuz.read_bytes(), name=str(vmlinuz.name))
        pvh = elf_has_pvh_note(raw)
        if pvh:
            (out / "vmlinux").write_bytes(raw)
    except ObdError as exc:
        say(f"no PVH vmlinux ({exc}); booting the bzImage")
    meta = {"package": package, "kernel_version": version, "pvh": pvh, "built": time.time()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    try:
        os.rename(out, target)
    except OSError:
        if _load_json(target / "meta.json") is None:
            raise


# --- modules ---------------------------------------------------------------------------------------


def _modname(name: str) -> str:
    base = os.path.basename(name)
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def resolve_modules(mod_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``(name, file)`` of ``wanted`` and their dependencies, dependencies first; built-ins skipped.

    Dependencies come from each module's ``.modinfo`` ``depends=`` entry, so ``depmod`` is not needed.
    Raises ObdError for a module that is neither a ``.ko`` file nor built in.
    """
    files: dict[str, Path] = {}
    for path in (mod_dir / "kernel").rglob("*.ko*"):
        files.setdefault(_modname(path.name), path)
    builtin: set[str] = set()
    builtin_list = mod_dir / "modules.builtin"
    if builtin_list.is_file():
        builtin = {_modname(line) for line in builtin_list.read_text().split() if line}

    order: list[tuple[str, Path]] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2 or name in builtin:
            return
        if state.get(name) == 1:
            raise ObdError("circular module dependency", field="modules", value=" -> ".join((*chain, name)))
        path = files.get(name)
        if path is None:
            raise ObdError("module is neither a .ko file nor built into the kernel", path=mod_dir, value=name)
        state[name] = 1
        info = modinfo(_read_module(path), name=str(path))
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(_modname(dep), (*chain, name))
        state[name] = 2
        order.append((name, path))

    for name in wanted:
        visit(_modname(name), ())
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def modinfo(elf: bytes, *, name: str = "module") -> dict[str, list[str]]:
    """The ``key=value`` entries of a kernel module's ``.modinfo`` section (values listed per key)."""
    sections = _elf64_sections(elf, name)
    blob = sections.get(".modinfo")
    if blob is None:
        raise ObdError("no .modinfo section: not a kernel module", path=name)
    info: dict[str, list[str]] = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info.setdefault(key.decode("ascii", "replace"), []).append(value.decode("utf-8", "replace"))
    return info


def _elf64_sections(elf: bytes, name: str) -> dict[str, bytes]:
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ObdError("not a 64-bit little-endian ELF file", path=name, field="e_ident", value=elf[:6])
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize < 64 or shnum == 0 or shstrndx >= shnum or shoff + shnum * shentsize > len(elf):
        raise ObdError("bad section header table", path=name, field="e_shoff", value=shoff)
    heads = []
    for i in range(shnum):
        sh_name, _typ, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        if off + size > len(elf) and _typ != 8:  # SHT_NOBITS has no file bytes
            raise ObdError("section beyond the end of the file", path=name, field="sh_offset", value=off)
        heads.append((sh_name, _typ, off, size))
    _n, _t, str_off, str_size = heads[shstrndx]
    names = elf[str_off : str_off + str_size]
    out = {}
    for sh_name, typ, off, size in heads:
        end = names.find(b"\0", sh_name)
        label = names[sh_name : end if end >= 0 else None].decode("ascii", "replace")
        out[label] = b"" if typ == 8 else elf[off : off + size]
    return out


# --- the PVH vmlinux -------------------------------------------------------------------------------

_LZ4_LEGACY_MAGIC = 0x184C2102
_MAX_VMLINUX = 512 << 20


def extract_vmlinux(bzimage: bytes, *, name: str = "vmlinuz") -> bytes:
    """Unpack the ELF kernel inside an x86 bzImage (setup header ``payload_offset``/``payload_length``).

    Handles the payload compressions Debian uses (LZ4 legacy, gzip, xz, zstd). Raises ObdError for
    anything else; callers then boot the bzImage itself.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ObdError("not a bzImage (no HdrS setup header)", path=name)
    (protocol,) = struct.unpack_from("<H", bzimage, 0x206)
    if protocol < 0x208:
        raise ObdError("boot protocol too old to locate the payload", path=name, value=hex(protocol))
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        raise ObdError("payload beyond the end of the file", path=name, field="payload_offset", value=start)
    if payload[:4] == struct.pack("<I", _LZ4_LEGACY_MAGIC):
        out = _lz4_legacy(payload, name)
    elif payload[:2] == b"\x1f\x8b":
        out = zlib.decompressobj(31).decompress(payload, _MAX_VMLINUX)
    elif payload[:6] == b"\xfd7zXZ\x00":
        out = lzma.LZMADecompressor().decompress(payload, _MAX_VMLINUX)
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        out = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    else:
        raise ObdError("unsupported kernel payload compression", path=name, value=payload[:6])
    if out[:4] != b"\x7fELF":
        raise ObdError("the unpacked payload is not an ELF file", path=name, value=out[:4])
    return out


def _lz4_legacy(payload: bytes, name: str) -> bytes:
    import lz4.block

    pieces = []
    total = 0
    pos = 4
    # Blocks are <u32 compressed size><data>; the kernel appends the unpacked size as a 4-byte
    # trailer, which shows up as a "block" running past the end.
    while pos + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, pos)
        if size == _LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if pos + 4 + size > len(payload):
            break
        try:
            block = lz4.block.decompress(payload[pos + 4 : pos + 4 + size], uncompressed_size=8 << 20)
        except lz4.block.LZ4BlockError as exc:
            raise ObdError(f"corrupt LZ4 block: {exc}", path=name, field="payload", value=pos) from exc
        total += len(block)
        if total > _MAX_VMLINUX:
            raise ObdError("unpacked kernel too large", path=name, value=total)
        pieces.append(block)
        pos += 4 + size
    return b"".join(pieces)


def elf_has_pvh_note(elf: bytes) -> bool:
    """True when an ELF kernel carries the Xen ``PHYS32_ENTRY`` note QEMU's PVH loader needs."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            note_name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if note_name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


# --- busybox ---------------------------------------------------------------------------------------


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a ``PT_INTERP`` program header (needs no dynamic loader)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 4 > len(head):
            return False
        if struct.unpack_from("<I", head, base)[0] == 3:  # PT_INTERP
            return False
    return True


def _find_static_busybox(root: Path, say: Progress) -> Path:
    """The host's busybox when it is static (package busybox-static), else one downloaded into the cache."""
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and is_static_elf(Path(candidate)):
            return Path(candidate).resolve()
    cached = root / "busybox-static" / "busybox"
    if is_static_elf(cached):
        return cached
    with _locked(root / ".busybox.lock"):
        if is_static_elf(cached):
            return cached
        with tempfile.TemporaryDirectory(dir=root, prefix=".bb-") as tmp:
            deb = _apt_download(_STATIC_BUSYBOX_PACKAGE, Path(tmp), say)
            tree = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(deb), str(tree)], "dpkg-deb -x", _STATIC_BUSYBOX_PACKAGE)
            found = tree / "bin" / "busybox"
            if not is_static_elf(found):
                raise ObdError(
                    "the package holds no static bin/busybox", field="package", value=_STATIC_BUSYBOX_PACKAGE
                )
            cached.parent.mkdir(exist_ok=True)
            tmp_bin = cached.parent / ".busybox.part"
            shutil.copyfile(found, tmp_bin)
            tmp_bin.chmod(0o755)
            os.replace(tmp_bin, cached)
    return cached


def _busybox_applets(busybox: Path) -> list[str]:
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ObdError(f"busybox --list failed: {_tail(proc.stderr)}", path=busybox)
    return sorted({a for a in proc.stdout.split() if a and "/" not in a and a != "busybox"})


# --- the initramfs ---------------------------------------------------------------------------------


def _initramfs_key(init_text: bytes, modules: tuple[str, ...], busybox: Path) -> str:
    h = hashlib.sha256()
    h.update(f"obd-initramfs-layout-{LAYOUT_VERSION}\n".encode())
    h.update(hashlib.sha256(init_text).digest())
    h.update(("\n".join(modules) + "\n").encode())
    h.update(_file_sha256(busybox))
    return h.hexdigest()[:16]


def build_initramfs(init_text: bytes, busybox: Path, modules: list[tuple[str, bytes]]) -> bytes:
    """The cpio newc archive: ``/init``, busybox and its applet links, the modules.

    ``modules`` are ``(file name, bytes)`` in load order; ``/obd/modules`` lists them in that order.
    The archive is left uncompressed (about 2.3 MB): gunzip in the emulated guest CPU costs about
    0.1 s of every TCG boot, reading 1.2 MB more on the host costs nothing measurable.
    """
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "newroot", "obd", "proc", "root", "sys", "tmp"):
        cpio.add_dir(d)
    cpio.add_device("dev/console", 0o600, 5, 1, char=True)
    cpio.add_device("dev/null", 0o666, 1, 3, char=True)
    cpio.add_file("init", init_text, 0o755)
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        cpio.add_symlink(f"bin/{applet}", "busybox")
    for fname, data in modules:
        cpio.add_file(f"lib/modules/{fname}", data, 0o644)
    cpio.add_file("obd/modules", "".join(f"{f}\n" for f, _ in modules).encode(), 0o644)
    return cpio.finish()


class CpioWriter:
    """A deterministic cpio "newc" archive (what the kernel's initramfs unpacker reads).

    Owners are root, times are zero and inode numbers sequential, so the same input always gives the
    same bytes; device nodes need no privileges to write.
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode("utf-8") + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if mode & 0o170000 == 0o040000 else 1,  # nlink
            0,  # mtime
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        out = self._buf
        out.write(header)
        out.write(encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, 0o040000 | perm)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode("utf-8"))

    def add_device(self, name: str, perm: int, major: int, minor: int, *, char: bool) -> None:
        self._entry(name, (0o020000 if char else 0o060000) | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the archive (padded to 512 bytes)."""
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        data = self._buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


# --- small helpers ---------------------------------------------------------------------------------


def _run(cmd: list[str], what: str, package: str) -> None:
    exe = shutil.which(cmd[0]) or shutil.which(cmd[0], path=os.pathsep.join(_SBIN))
    if exe is None:
        raise ObdError(f"{cmd[0]} is not installed (Debian package dpkg)", field="package", value=package)
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ObdError(f"{what} failed: {_tail(proc.stderr)}", field="package", value=package)


def _tail(text: str, lines: int = 4) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept) or "(no output)"


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _load_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    _publish_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def _publish_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` atomically: a temp file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (one builder at a time, across processes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
