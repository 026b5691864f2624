"""What nbdkit's Python imports before obd's plugin can listen: a start-up cost kept out by design.

aiohttp (0.2 s: its connector loads the CA bundle twice) is imported only where a request is made,
and ``importlib.metadata`` (30 ms) not at all; ``obd run``'s warm start waits on this import. These
are structural checks in the interpreter nbdkit embeds (Debian's /usr/bin/python3), not timings.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the interpreter nbdkit-plugin-python embeds
NBDKIT_PYTHON = "/usr/bin/python3"

PROBE = """
import sys
import glob
sys.path.insert(0, {root!r})
sys.path += glob.glob({root!r} + "/.venv/lib*/python3.*/site-packages")
import frontends.nbd.backend
from obd.image import remote  # the registry options and client classes, no request made
print(sorted(m for m in ("aiohttp", "importlib.metadata", "email") if m in sys.modules))
"""


def test_the_plugin_and_the_registry_client_import_without_aiohttp():
    assert Path(NBDKIT_PYTHON).exists(), "Debian's python3 (nbdkit's) is missing: run ./setup.sh"
    out = subprocess.run(
        [NBDKIT_PYTHON, "-c", PROBE.format(root=str(ROOT))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == "[]"
