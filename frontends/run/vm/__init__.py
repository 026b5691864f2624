"""Run commands from an obd disk in a QEMU microvm: the VM half of ``obd run``.

:func:`ensure_assets` fetches and caches the kernel and builds the initramfs; :func:`boot` boots a
disk (image file or NBD export) and runs one command, returning its exit code and output. The
protocol between host and guest is described in ``docs/vm.md``.

Modules: :mod:`.assets` (the cache and ``ensure_assets``), :mod:`.apt` (Debian packages),
:mod:`.kernel` (ELF and bzImage), :mod:`.modules` (kernel module dependencies), :mod:`.cpio` (the
initramfs archive), :mod:`.cmdline` (the base kernel command line), :mod:`.qemu` (the boot itself).
"""

from frontends.run.vm.assets import Assets, default_cache_dir, ensure_assets
from frontends.run.vm.cmdline import host_tsc_khz
from frontends.run.vm.qemu import (
    DEFAULT_PATH,
    BootResult,
    GuestError,
    NbdDisk,
    VMError,
    VMTimeoutError,
    boot,
    resolve_accel,
    write_stdout,
)

__all__ = [
    "DEFAULT_PATH",
    "Assets",
    "BootResult",
    "GuestError",
    "NbdDisk",
    "VMError",
    "VMTimeoutError",
    "boot",
    "default_cache_dir",
    "ensure_assets",
    "host_tsc_khz",
    "resolve_accel",
    "write_stdout",
]
