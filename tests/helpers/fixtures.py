"""Test plumbing: where the fixtures are, what they should hash to, and how to get a usable file.

``fixtures/expected.json`` is the machine-readable index of every file under ``fixtures/`` (its schema is
described in ``fixtures/README.md``). Files over 4 MiB are stored as ``.bz2`` and the ext4 base layer
sits inside a ``.tar.gz``; :func:`materialize` turns any of those into a plain file in a
content-addressed cache outside the repository, verified against the index, so tests and benchmarks can
open the real bytes without caring how they are stored.

Import from tests as ``from fixtures import ...``: ``tests/conftest.py`` puts ``tests/helpers/`` on
``sys.path`` (it is not a package).
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

#: The repository root (this file is ``tests/helpers/fixtures.py``): every test locates repo files from here.
REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
EXPECTED_JSON = FIXTURES / "expected.json"
SETUP_SH = REPO / "setup.sh"

#: External programs tests may need, and the Debian package each comes from. Add a tool here when a
#: test starts using it, and add its package to the PACKAGES array in setup.sh.
TOOL_PACKAGES: dict[str, str] = {
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "bzip2": "bzip2",
    "nbdkit": "nbdkit",
    "nbdcopy": "libnbd-bin",
    "nbdinfo": "libnbd-bin",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "fusermount3": "fuse3",
    "losetup": "mount",
    "docker-registry": "docker-registry",
    "htpasswd": "apache2-utils",
    "skopeo": "skopeo",
    "jq": "jq",
    "fio": "fio",
    "lz4": "lz4",
    "busybox": "busybox-static",
    "mkfs.erofs": "erofs-utils",
    "debootstrap": "debootstrap",
}

# sbin directories are not on a non-root PATH, but debugfs, e2fsck and mke2fs live there.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_CHUNK = 1 << 20


def fixture_path(rel: str) -> Path:
    """Return ``fixtures/<rel>`` as stored; raise FileNotFoundError naming it when it is missing."""
    path = FIXTURES / rel
    if not path.is_file():
        raise FileNotFoundError(f"fixture {rel!r} is missing: expected {path} (see fixtures/README.md)")
    return path


@functools.cache
def expected() -> dict[str, Any]:
    """The parsed ``fixtures/expected.json`` (cached; treat it as read-only)."""
    with EXPECTED_JSON.open(encoding="utf-8") as f:
        return json.load(f)


def stack(name: str) -> dict[str, Any]:
    """The ``stacks`` entry called ``name`` (e.g. ``"L0L1L2/lz4"``, ``"ext4/L1/tar-lz4"``)."""
    for entry in expected()["stacks"]:
        if entry["name"] == name:
            return entry
    raise KeyError(f"no stack {name!r} in fixtures/expected.json")


def stack_layers(name_or_entry: str | dict[str, Any]) -> list[Path]:
    """Materialised layer files of a stack, lowest layer first."""
    entry = stack(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    return [materialize(rel) for rel in entry["layers"]]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a whole file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def cache_dir() -> Path:
    """Directory for materialised fixtures: ``$OBD_FIXTURE_CACHE`` or ``$TMPDIR/obd-fixture-cache-<uid>``.

    It is content-addressed (one sub-directory per content SHA-256), lives outside the repository and
    survives test sessions, so a 1 GiB decompression is paid once per machine, not per run.
    """
    env = os.environ.get("OBD_FIXTURE_CACHE")
    root = Path(env) if env else Path(tempfile.gettempdir()) / f"obd-fixture-cache-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    return root


def materialize(rel: str) -> Path:
    """Return a plain readable file holding fixture ``rel``, creating it in :func:`cache_dir` if needed.

    ``rel`` (relative to ``fixtures/``) may be

    * a stored file: returned in place (``.bz2`` ones are decompressed first);
    * the name a ``.bz2`` file had before compression (``overlaybd/lsmt/commit/L0.commit``) — the form
      image configs and the MANIFEST use;
    * a ``derived`` entry of the index (``overlaybd/ext4/base/ext4_64``, a member of a ``.tar.gz``).

    Sparse files listed in ``overlaybd/facts/sparse_maps.json`` are recreated with their original holes,
    since for sparse RW layers the hole map is the index. Every produced file is checked before it is
    published (atomic rename) — against the content SHA-256 of the index, or for sparse files against
    the SHA-256 of each data extent — so a cache hit needs no re-hashing.
    """
    index = expected()
    files, derived = index["files"], index["derived"]
    if rel in files and not rel.endswith(".bz2"):
        return fixture_path(rel)
    if rel in derived:
        return _extract_member(rel, derived[rel])
    stored = rel if rel.endswith(".bz2") else rel + ".bz2"
    if stored in files:
        return _decompress(stored, files[stored])
    raise KeyError(f"{rel!r} is neither a fixture file, the name of a .bz2 one, nor a derived entry")


def resolved_config(rel: str) -> Path:
    """Copy of the image config ``rel`` whose ``lowers[].file`` paths are absolute, materialised files.

    The configs under ``overlaybd/cfg/`` name layers relative to ``fixtures/overlaybd/`` and by their
    pre-compression names, as the upstream tools saw them; this makes them usable from anywhere.
    """
    config = json.loads(fixture_path(rel).read_text(encoding="utf-8"))
    base = rel.split("/", 1)[0]
    for lower in config.get("lowers", []):
        lower["file"] = str(materialize(f"{base}/{lower['file']}"))
    text = json.dumps(config, indent=1, sort_keys=True) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    out = cache_dir() / digest[:16] / Path(rel).name
    if not out.is_file():
        _publish_text(out, text)
    return out


def setup_packages() -> list[str]:
    """The Debian packages listed in setup.sh's ``PACKAGES=( ... )`` array (comments stripped)."""
    text = SETUP_SH.read_text(encoding="utf-8") if SETUP_SH.is_file() else ""
    match = re.search(r"^PACKAGES=\((.*?)^\)", text, re.M | re.S)
    if not match:
        return []
    names: list[str] = []
    for line in match.group(1).splitlines():
        names.extend(line.split("#", 1)[0].split())
    return names


def data_offsets(stack: Any, count: int, seed: int) -> list[int]:
    """``count`` random sector-aligned offsets of 4 KiB reads that start inside ``stack``'s data
    (a workload for trace recording and prefetch tests)."""
    import random

    rng = random.Random(seed)
    data = [e for e in stack.extents() if e.kind == "data"]
    out = []
    for _ in range(count):
        e = rng.choice(data)
        out.append(e.offset + rng.randrange(0, max(1, e.length - 4096)) // 512 * 512)
    return out


def vm_cache_dir() -> Path:
    """Where the VM tests keep the microVM kernel and initramfs: shared between sessions like the
    fixture cache, so the kernel is downloaded once per machine (``$OBD_VM_TEST_CACHE`` overrides)."""
    env = os.environ.get("OBD_VM_TEST_CACHE")
    path = Path(env) if env else Path(tempfile.gettempdir()) / f"obd-vm-cache-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)  # tests link to it before any VM test has filled it
    return path


def find_tool(name: str) -> str | None:
    """Full path of program ``name`` on PATH or in the sbin directories, or None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(name, path=path)


def require_tool(name: str) -> str:
    """Fail the calling test loudly unless ``name`` is available; return the program's full path.

    ``name`` is a program (``debugfs``, ``nbdkit``, ...) or ``"root"`` for root privileges. A missing
    tool is an installation error, never a reason to skip: the message says which Debian package
    provides it and whether setup.sh already installs it.
    """
    import pytest

    if name == "root":
        if os.geteuid() != 0:
            pytest.fail(
                "this test needs root (it creates device nodes, sets owners or mounts); "
                "the suite runs as root in CI and via `./setup.sh test`",
                pytrace=False,
            )
        return "root"
    found = find_tool(name)
    if found:
        return found
    package = TOOL_PACKAGES.get(name)
    if package is None:
        pytest.fail(
            f"required program {name!r} not found, and tests/helpers/fixtures.py does not know its Debian "
            f"package: add it to TOOL_PACKAGES there and the package to the PACKAGES array in setup.sh",
            pytrace=False,
        )
    if package in setup_packages():
        hint = f"setup.sh installs it: run `./setup.sh` as root (it runs apt-get install {package})"
    else:
        hint = f"{package!r} is not in setup.sh's PACKAGES array yet: add it there, then run `./setup.sh`"
    pytest.fail(
        f"required program {name!r} not found: it comes from Debian package {package!r}; {hint}",
        pytrace=False,
    )
    raise AssertionError("unreachable")  # pytest.fail raises; this keeps type checkers content


# --- materialisation internals ------------------------------------------------------------------


def _cache_target(content_sha256: str, name: str) -> Path:
    return cache_dir() / content_sha256[:16] / name


def _sparse_map(rel: str) -> dict[str, Any] | None:
    """The sparse_maps.json entry for ``overlaybd/<x>`` (by its pre-compression name), if any."""
    if not rel.startswith("overlaybd/"):
        return None
    maps_rel = "overlaybd/facts/sparse_maps.json"
    if maps_rel not in expected()["files"]:
        return None
    maps = _load_json(maps_rel)
    return maps.get(rel[len("overlaybd/") :].removesuffix(".bz2"))


@functools.cache
def _load_json(rel: str) -> Any:
    with fixture_path(rel).open(encoding="utf-8") as f:
        return json.load(f)


def _decompress(stored: str, entry: dict[str, Any]) -> Path:
    out = _cache_target(entry["content_sha256"], Path(stored).name.removesuffix(".bz2"))
    if out.is_file() and out.stat().st_size == entry["content_bytes"]:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as dst, bz2.open(fixture_path(stored), "rb") as src:
            smap = _sparse_map(stored)
            if smap is not None and smap["apparent_size"] == entry["content_bytes"]:
                _write_sparse(src, dst, smap, stored)
            else:
                _write_verified(src, dst, entry, stored)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _write_verified(src: Any, dst: Any, entry: dict[str, Any], what: str) -> None:
    h = hashlib.sha256()
    total = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        total += len(chunk)
    if total != entry["content_bytes"] or h.hexdigest() != entry["content_sha256"]:
        raise ValueError(
            f"{what}: decompressed to {total} bytes sha256 {h.hexdigest()}, "
            f"index says {entry['content_bytes']} bytes sha256 {entry['content_sha256']}"
        )


def _write_sparse(src: Any, dst: Any, smap: dict[str, Any], what: str) -> None:
    """Copy only the data extents of a sparse original, checking each extent's SHA-256."""
    pos = 0
    for ext in smap["data_extents"]:
        skip = ext["offset"] - pos
        while skip > 0:
            got = len(src.read(min(skip, _CHUNK)))
            if not got:
                raise ValueError(f"{what}: content ends before the data extent at {ext['offset']}")
            skip -= got
        h = hashlib.sha256()
        dst.seek(ext["offset"])
        left = ext["length"]
        while left:
            chunk = src.read(min(left, _CHUNK))
            if not chunk:
                raise ValueError(f"{what}: content ends inside the data extent at {ext['offset']}")
            h.update(chunk)
            dst.write(chunk)
            left -= len(chunk)
        if h.hexdigest() != ext["sha256"]:
            raise ValueError(
                f"{what}: data extent at {ext['offset']} hashes to {h.hexdigest()}, not {ext['sha256']}"
            )
        pos = ext["offset"] + ext["length"]
    dst.truncate(smap["apparent_size"])


def _extract_member(rel: str, entry: dict[str, Any]) -> Path:
    out = _cache_target(entry["sha256"], Path(rel).name)
    if out.is_file() and out.stat().st_size == entry["bytes"]:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as dst, tarfile.open(fixture_path(entry["from"])) as tar:
            src = tar.extractfile(entry["member"])
            if src is None:
                raise ValueError(f"{entry['from']}: member {entry['member']!r} is not a regular file")
            _write_verified(
                src, dst, {"content_bytes": entry["bytes"], "content_sha256": entry["sha256"]}, rel
            )
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _publish_text(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".part-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
