"""What the microVM takes from Debian: the cloud kernel package and a static busybox, through apt.

No kernel version is hard-coded: ``apt-cache depends linux-image-cloud-amd64`` names the current one,
and ``apt-get download`` fetches a package from the mirror this machine's apt is configured with
(no root needed, nothing installed). ``dpkg-deb -x`` unpacks it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from frontends.run.vm.kernel import is_static_elf
from obd.errors import ObdError
from obd.host.programs import find_program

#: The Debian meta-package whose dependency names the current cloud kernel.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
STATIC_BUSYBOX_PACKAGE = "busybox-static"
APT_LISTS = Path("/var/lib/apt/lists")

Progress = Callable[[str], None]


def apt_lists_stamp() -> str:
    """Changes whenever ``apt-get update`` changes the package lists."""
    h = hashlib.sha256()
    try:
        entries = sorted(os.scandir(APT_LISTS), key=lambda e: e.name)
    except OSError:
        return "no-lists"
    for entry in entries:
        if entry.is_file():
            st = entry.stat()
            h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def depends_kernel_package(meta: str, say: Progress) -> str:
    """The ``linux-image-*`` package the meta-package ``meta`` depends on, asked of ``apt-cache``.

    Raises ObdError naming ``meta`` when apt-cache is missing or does not know it.
    """
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        raise ObdError(
            "apt-cache is not available to find the current cloud kernel", field="package", value=meta
        )
    say(f"resolving {meta}")
    proc = subprocess.run(
        [apt_cache, "depends", "--important", meta], capture_output=True, text=True, check=False
    )
    names = re.findall(r"^\s*\|?Depends:\s*(linux-image-\S+)", proc.stdout, re.M)
    if proc.returncode != 0 or not names:
        raise ObdError(
            f"apt-cache does not know it (run apt-get update?): {tail(proc.stderr or proc.stdout)}",
            field="package",
            value=meta,
        )
    return names[0]


def apt_download(package: str, dest_dir: Path, say: Progress) -> Path:
    """``apt-get download PACKAGE`` into ``dest_dir`` (which must hold no other .deb); return the .deb."""
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
            f"apt-get download failed (exit {proc.returncode}): {tail(proc.stderr or proc.stdout)}",
            field="package",
            value=package,
        )
    return debs[0]


def unpack_deb(deb: Path, dest: Path, package: str) -> None:
    """``dpkg-deb -x DEB DEST``; ObdError naming ``package`` when it fails."""
    dpkg_deb = find_program("dpkg-deb", "dpkg")
    proc = subprocess.run([dpkg_deb, "-x", str(deb), str(dest)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ObdError(f"dpkg-deb -x failed: {tail(proc.stderr)}", field="package", value=package)


def host_static_busybox() -> Path | None:
    """The host's busybox when it is static (Debian ``busybox-static``), else None."""
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and is_static_elf(Path(candidate)):
            return Path(candidate).resolve()
    return None


def download_static_busybox(work_dir: Path, say: Progress) -> Path:
    """Download and unpack ``busybox-static`` inside ``work_dir``; return its ``bin/busybox``."""
    deb = apt_download(STATIC_BUSYBOX_PACKAGE, work_dir, say)
    tree = work_dir / "x"
    unpack_deb(deb, tree, STATIC_BUSYBOX_PACKAGE)
    found = tree / "bin" / "busybox"
    if not is_static_elf(found):
        raise ObdError(
            "the package holds no static bin/busybox", field="package", value=STATIC_BUSYBOX_PACKAGE
        )
    return found


def busybox_applets(busybox: Path) -> list[str]:
    """The applet names ``busybox --list`` prints, sorted (``busybox`` itself left out)."""
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ObdError(f"busybox --list failed: {tail(proc.stderr)}", path=busybox)
    return sorted({a for a in proc.stdout.split() if a and "/" not in a and a != "busybox"})


def tail(text: str, lines: int = 4) -> str:
    """The last ``lines`` non-blank lines of a tool's output, on one line (for error messages)."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept) or "(no output)"
