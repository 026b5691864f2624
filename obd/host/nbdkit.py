"""nbdkit on this host: the program, the environment to start it in, and obd's plugin script for it.

``obd nbd`` (:mod:`obd.cli.nbd`) and ``obd run``'s launcher both start nbdkit with the nbd frontend's
plugin script (docs/nbd.md). The script is found by path, beside the installed ``obd`` package or
through the import system's search for the ``frontends`` package; nothing here imports a frontend.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from obd.errors import ConfigError, ObdError

#: Where nbdkit is looked for when it is not on PATH (sbin dirs are missing from some PATHs).
EXTRA_PATH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/sbin")
#: The plugin script inside the ``frontends`` package.
PLUGIN = ("nbd", "plugin.py")


def find_nbdkit(explicit: str | None = None) -> str:
    """The nbdkit program: ``explicit`` if given, else from ``$PATH`` or :data:`EXTRA_PATH`."""
    if explicit:
        return explicit
    found = shutil.which("nbdkit") or shutil.which("nbdkit", path=os.pathsep.join(EXTRA_PATH))
    if not found:
        raise ObdError("nbdkit not found: install the Debian packages nbdkit and nbdkit-plugin-python")
    return found


def plugin_path() -> Path:
    """The plugin script nbdkit loads: ``frontends/nbd/plugin.py`` of this checkout or install.

    Looked for beside the ``obd`` package first (a checkout, or both packages in one site-packages),
    then wherever the import system would find ``frontends``; ``find_spec`` of a top-level name
    locates the package without importing it.
    """
    here = Path(__file__).resolve().parent.parent.parent / "frontends" / Path(*PLUGIN)
    if here.is_file():
        return here
    spec = importlib.util.find_spec("frontends")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc, *PLUGIN)
            if cand.is_file():
                return cand
    raise ConfigError("cannot find frontends/nbd/plugin.py (is obd installed with its frontends?)")


def nbdkit_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """nbdkit's environment: no active venv (its embedded Python would adopt it), ``OBD_VENV`` set.

    The embedded interpreter is Debian's; it finds the engine through the plugin script's own
    path logic and the venv's site-packages through ``OBD_VENV`` (this interpreter's venv).
    """
    env = dict(os.environ if base is None else base)
    for key in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP", "__PYVENV_LAUNCHER__"):
        env.pop(key, None)
    parts = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(p for p in parts if not (Path(p).parent / "pyvenv.cfg").is_file())
    if sys.prefix != sys.base_prefix:
        env["OBD_VENV"] = sys.prefix
    return env


__all__ = ["EXTRA_PATH", "find_nbdkit", "nbdkit_env", "plugin_path"]
