"""Run commands from an obd disk in a QEMU microvm.

:func:`ensure_assets` fetches and caches the kernel and builds the initramfs; :func:`boot` boots a
disk (image file or NBD export) and runs one command, returning its exit code and output. The
protocol between host and guest is described in ``docs/vm.md``.
"""

from frontends.vm.assets import Assets, default_cache_dir, ensure_assets, host_tsc_khz
from frontends.vm.qemu import (
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
