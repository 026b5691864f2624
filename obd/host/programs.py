"""Finding the external programs obd drives (e2fsprogs, debootstrap, docker-registry, busybox...).

Some live in sbin directories that are not on a non-root ``PATH``; a missing one is an error that
names the Debian package to install, since ``setup.sh`` installs them all.
"""

from __future__ import annotations

import os
import shutil

from obd.errors import ObdError

#: Searched after ``$PATH``: where Debian puts administrators' programs (mke2fs, debugfs...).
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_program(name: str, package: str, *, error: type[ObdError] = ObdError) -> str:
    """Full path of program ``name`` on ``$PATH`` or in the sbin directories; else ``error`` naming
    Debian package ``package``."""
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))
    if not found:
        raise error(f"{name} not found: install the Debian package {package} (./setup.sh does)")
    return found
