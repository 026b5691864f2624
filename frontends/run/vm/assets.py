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

This module is the cache and its build; the parts live beside it: :mod:`~frontends.run.vm.apt` (the
packages), :mod:`~frontends.run.vm.kernel` (bzImage -> vmlinux), :mod:`~frontends.run.vm.modules`
(module dependencies), :mod:`~frontends.run.vm.cpio` (the archive), :mod:`~frontends.run.vm.cmdline`
(the kernel command line).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from frontends.run.vm.apt import (
    KERNEL_META_PACKAGE,
    Progress,
    apt_download,
    apt_lists_stamp,
    busybox_applets,
    depends_kernel_package,
    download_static_busybox,
    host_static_busybox,
    unpack_deb,
)
from frontends.run.vm.cmdline import base_cmdline
from frontends.run.vm.cpio import build_initramfs
from frontends.run.vm.kernel import elf_has_pvh_note, extract_vmlinux, is_static_elf
from frontends.run.vm.modules import module_name, read_module, resolve_modules
from obd.errors import ObdError
from obd.io.publish import publish_bytes, publish_copy, publish_path

#: Top-level modules the init loads (dependencies are added automatically): the microvm's virtio-mmio
#: transport, the PCI transport (q35/pc machines) and the block driver.
BASE_MODULES: tuple[str, ...] = ("virtio_mmio", "virtio_pci", "virtio_blk")

#: Bumped whenever the archive layout changes, so old cached initramfs files are not reused.
LAYOUT_VERSION = 2

INIT_SCRIPT = Path(__file__).with_name("initramfs_init.sh")


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

    wanted = tuple(dict.fromkeys((*BASE_MODULES, *(module_name(m) for m in extra_modules))))
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


# --- kernel package resolution -------------------------------------------------------------------


def _resolve_kernel_package(root: Path, say: Progress) -> str:
    """The kernel package ``linux-image-cloud-amd64`` depends on, remembered per apt-lists state.

    Without apt (or with apt lists that do not know the package) the newest cached kernel is used.
    """
    stamp = apt_lists_stamp()
    memo = root / "resolved.json"
    known = _load_json(memo)
    if known and known.get("meta") == KERNEL_META_PACKAGE and known.get("stamp") == stamp:
        return str(known["package"])
    try:
        package = depends_kernel_package(KERNEL_META_PACKAGE, say)
    except ObdError as exc:
        cached = _newest_cached_kernel(root)
        if cached:
            return cached
        raise ObdError(
            f"{exc.detail}, and no kernel is cached", path=root, field=exc.field, value=exc.value
        ) from exc
    # Concurrent resolvers in one process would share publish's temporary name.
    with _locked(root / ".resolve.lock"):
        _write_json(memo, {"meta": KERNEL_META_PACKAGE, "stamp": stamp, "package": package})
    return package


def _newest_cached_kernel(root: Path) -> str | None:
    found = []
    for meta_file in root.glob("*/kernel/meta.json"):
        meta = _load_json(meta_file)
        if meta and meta.get("package"):
            found.append((meta_file.stat().st_mtime, meta["package"]))
    return max(found)[1] if found else None


# --- busybox ---------------------------------------------------------------------------------------


def _find_static_busybox(root: Path, say: Progress) -> Path:
    """The host's busybox when it is static (package busybox-static), else one downloaded into the cache."""
    host = host_static_busybox()
    if host is not None:
        return host
    cached = root / "busybox-static" / "busybox"
    if is_static_elf(cached):
        return cached
    with _locked(root / ".busybox.lock"):
        if is_static_elf(cached):
            return cached
        with tempfile.TemporaryDirectory(dir=root, prefix=".bb-") as tmp:
            found = download_static_busybox(Path(tmp), say)
            found.chmod(0o755)
            cached.parent.mkdir(exist_ok=True)
            publish_copy(cached, found)
    return cached


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
        with tempfile.TemporaryDirectory(dir=kdir, prefix=".dl-") as dl_dir:
            publish_path(apt_download(package, Path(dl_dir), say), deb)
    with tempfile.TemporaryDirectory(dir=kdir, prefix=".build-") as tmp_name:
        tmp = Path(tmp_name)
        tree = tmp / "deb"
        say(f"unpacking {deb.name} ({package})")
        unpack_deb(deb, tree, package)
        if not kernel_done:
            _publish_kernel(tmp, tree, kdir / "kernel", package, version, say)
        if not (initramfs.is_file() and _load_json(sidecar) is not None):
            say(f"building {initramfs.name}")
            mod_dir = tree / "lib" / "modules" / version
            if not mod_dir.is_dir():
                raise ObdError("the package has no lib/modules for its version", path=deb, value=version)
            order = resolve_modules(mod_dir, wanted)
            files = [(f"{name}.ko", read_module(path)) for name, path in order]
            data = build_initramfs(init_text, busybox.read_bytes(), busybox_applets(busybox), files)
            _write_json(sidecar, {"modules": [f for f, _ in files], "kernel_version": version})
            publish_bytes(initramfs, data, durable=False)


def _publish_kernel(tmp: Path, tree: Path, target: Path, package: str, version: str, say: Progress) -> None:
    """Put the package's bzImage, config and (when it has the PVH note) vmlinux at ``target``, whole."""
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
        publish_path(out, target)
    except OSError:  # another builder's directory is already there
        if _load_json(target / "meta.json") is None:
            raise


# --- small helpers ---------------------------------------------------------------------------------


def _initramfs_key(init_text: bytes, modules: tuple[str, ...], busybox: Path) -> str:
    h = hashlib.sha256()
    h.update(f"obd-initramfs-layout-{LAYOUT_VERSION}\n".encode())
    h.update(hashlib.sha256(init_text).digest())
    h.update(("\n".join(modules) + "\n").encode())
    h.update(_file_sha256(busybox))
    return h.hexdigest()[:16]


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
    """Publish ``value`` as ``path`` (a cache file: losing it to a crash only costs a rebuild)."""
    publish_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(), durable=False)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (one builder at a time, across processes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
