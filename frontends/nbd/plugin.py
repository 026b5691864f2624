#!/usr/bin/env -S nbdkit python
"""obd's nbdkit plugin script: ``nbdkit python /path/to/frontends/nbd/plugin.py image=IMAGE [upper=DIR] …``

nbdkit takes a script path, not a module name, runs it in its embedded Debian Python 3.11 (whose
``sys.path`` holds neither this checkout nor the project's venv) and looks the callbacks up in
``__main__``. So this script only makes the engine importable, then star-imports the real plugin,
:mod:`frontends.nbd.backend`:

1. the directory holding the ``frontends`` package (the checkout, or site-packages) goes first on
   ``sys.path``;
2. the site-packages of a venv (numpy, lz4, zstandard, crc32c…) are added from, in order: the
   ``venv=DIR`` parameter, ``$OBD_VENV``, or ``.venv`` next to the checkout. ``$PYTHONPATH`` works
   too. Don't run nbdkit with a venv activated (docs/nbd.md says why).

If the engine cannot be imported yet (its venv given only as ``venv=``), the import waits for the
first parameter. Every parameter is documented in docs/nbd.md and the backend's docstring; ``obd
nbd`` writes this command line for you, and ``obd run`` starts this same script (with
``stats-file=`` and ``prefetch-meta=``).
"""

import glob
import os
import sys

API_VERSION = 2

_HERE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))  # the directory that holds the frontends package
_EXPORTED = ("config", "config_complete")  # wrapped below, not overwritten by the star import
_backend = None
_import_error = None


def _add_venv(venv):
    """Put a venv's site-packages for this Python version on sys.path (after the stdlib)."""
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for sp in sorted(glob.glob(os.path.join(os.path.expanduser(venv), "lib*", ver, "site-packages"))):
        if sp not in sys.path:
            sys.path.append(sp)


def _setup_path():
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    for venv in (os.environ.get("OBD_VENV"), os.path.join(_ROOT, ".venv")):
        if venv and os.path.isdir(venv):
            _add_venv(venv)
            break


def _load():
    """Import the backend and publish its callbacks in this module (nbdkit's ``__main__``)."""
    global _backend, _import_error
    try:
        import frontends.nbd.backend as backend
    except ImportError as e:
        _import_error = e
        return False
    g = globals()
    for name in backend.__all__:
        if name not in _EXPORTED:
            g[name] = getattr(backend, name)
    _backend = backend
    return True


def _need():
    if _backend is None and not _load():
        raise RuntimeError(
            f"obd: cannot import the obd engine ({_import_error}); sys.path={sys.path}. Pass "
            "venv=/path/to/venv (a venv made with /usr/bin/python3 where obd is installed), set "
            "OBD_VENV or PYTHONPATH, or start nbdkit with `obd nbd`"
        )
    return _backend


# nbdkit checks for these three when it loads the script; they are replaced by the backend's own
# functions as soon as it is imported.
def open(readonly):
    return _need().open(readonly)


def get_size(h):
    return _need().get_size(h)


def pread(h, buf, offset, flags):
    return _need().pread(h, buf, offset, flags)


def config(key, value):
    if key == "venv":
        _add_venv(value)
        if _backend is None:
            _load()
        return
    _need().config(key, value)


def config_complete():
    _need().config_complete()


_setup_path()
_load()
