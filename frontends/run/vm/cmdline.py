"""The kernel command line every obd boot starts with, and the host TSC rate it passes to the guest.

Under TCG the guest's TSC runs at the host's rate. ``microvm`` has neither HPET nor PM timer, and
the guest's TSC calibration against them hangs some TCG boots (PLATFORM.md §2), so the rate is
measured on the host and given to the guest as ``tsc_early_khz=``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from obd.host.programs import SBIN_DIRS

#: rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes.fromhex("0f3148c1e2204809d0c3")


def base_cmdline(tsc_khz: int | None = None) -> str:
    """The kernel command line every obd boot starts with.

    ``quiet`` keeps kernel messages off the serial console; ``panic=-1`` turns a panic into a reboot,
    which ``-no-reboot`` turns into a QEMU exit; ``tsc_early_khz=`` (``tsc_khz``, by default the host
    TSC rate, which is what the guest sees under TCG) avoids the TSC calibration that hangs some TCG
    boots on ``microvm``.
    """
    khz = tsc_khz if tsc_khz is not None else host_tsc_khz()
    parts = ["console=ttyS0", "quiet", "panic=-1"]
    if khz:
        parts.append(f"tsc_early_khz={khz}")
    return " ".join(parts)


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
        found = source()
        if found:
            return found
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
    exe = shutil.which("dmesg") or shutil.which("dmesg", path=os.pathsep.join(("/bin", *SBIN_DIRS)))
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_tsc_khz_from_log(proc.stdout) if proc.returncode == 0 else None


def _tsc_khz_measured() -> int | None:
    """Count TSC ticks over a few 20 ms windows with a 10-byte rdtsc routine called through ctypes."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None  # W^X policies (SELinux execmem, PaX) forbid it
    try:
        page.write(_RDTSC_CODE)
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
