"""Small bootable root file systems, and overlaybd images made from them, built locally and cached.

``obd run`` needs images to run; on a machine without internet (the demo's) there are none, so
these builders make them from what apt and the host provide:

* :func:`busybox_rootfs` — the host's static busybox with every applet linked, ``/etc/passwd`` and
  ``/etc/group``: a few MiB, built in milliseconds (tests use it);
* :func:`debian_python_rootfs` — ``debootstrap --variant=minbase --include=python3-minimal`` from
  the apt mirror this machine is configured with (:func:`apt_mirror`), about 150 MB, built once
  (≈ 30 s) and cached;
* :func:`build_layer` — a root directory as one overlaybd layer: ``mke2fs -t ext4 -d`` into a
  sparse file, whose data extents become a sealed LSMT layer (:func:`obd.layer.tools.import_raw`),
  ZFile-compressed and tar-wrapped like the layers overlaybd's convertor pushes;
* :func:`push_image` — layer files plus the OCI ``config`` (entrypoint, command, environment...)
  pushed to a registry as an overlaybd image.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from obd.errors import ConfigError, ObdError
from obd.host.programs import SBIN_DIRS, find_program
from obd.io.publish import publish_path
from obd.layer.tools import OutputOptions, import_raw

#: The Debian release the python image is made of (the host's own: its keyring verifies it).
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Bump when what :func:`debian_python_rootfs` puts in the tree changes (invalidates caches).
ROOTFS_LAYOUT = 1
#: Bump when how :func:`build_layer` makes layers changes (mke2fs options...): cached layers are rebuilt.
LAYER_LAYOUT = 2
#: The ZFile codec and block size of the layers built here.
DEFAULT_COMPRESS = "zstd"
DEFAULT_BLOCK_SIZE = 32 << 10

Progress = Callable[[str], None]


def _run(argv: Sequence[str], what: str, *, timeout: float = 1800, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ObdError(f"{what} failed (exit {proc.returncode}): {tail}", field=os.path.basename(argv[0]))
    return proc.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- busybox ---------------------------------------------------------------------------------------


def static_busybox() -> str:
    """The host's busybox, which must be static (Debian ``busybox-static``): it runs in any root."""
    path = find_program("busybox", "busybox-static")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] != b"\x7fELF" or b"/lib64/ld-linux" in head or b"ld-linux-x86-64" in head:
        raise ObdError("busybox is dynamically linked: install the Debian package busybox-static", path=path)
    return path


def busybox_rootfs(dest: str | os.PathLike[str], *, files: dict[str, bytes | str] | None = None) -> Path:
    """A minimal root at ``dest`` (created; must not exist): busybox with every applet, users, dirs.

    ``/etc/passwd`` has ``root`` and ``alice`` (1000:1000, home ``/home/alice``), ``/etc/group`` also
    ``staff`` (50). ``files`` adds or replaces files (path inside the root → content).
    """
    root = Path(dest)
    root.mkdir(parents=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root", "home/alice"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    busybox = static_busybox()
    shutil.copy2(busybox, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    out = _run([busybox, "--list-full"], "busybox --list-full", timeout=60)
    for line in out.split():
        target = root / line.strip("/")
        if target.name == "busybox" or target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(root / "bin" / "busybox", target.parent))
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nalice:x:1000:\nstaff:x:50:\n")
    if os.geteuid() == 0:
        os.chown(root / "home" / "alice", 1000, 1000)
    for rel, content in (files or {}).items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


# --- Debian ----------------------------------------------------------------------------------------


def apt_mirror(suite: str = DEFAULT_SUITE, root: str = "/") -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (``sources.list`` and ``.sources``).

    Security and updates suites are skipped; with nothing configured, ``deb.debian.org``.
    """
    etc = os.path.join(root, "etc", "apt")
    candidates: list[str] = []
    one_line = [
        os.path.join(etc, "sources.list"),
        *sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.list"))),
    ]
    for path in one_line:
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if not words or words[0] != "deb":
                    continue
                rest = words[1:]
                if rest and rest[0].startswith("["):  # an options block: [ arch=amd64 signed-by=... ]
                    end = next((i for i, w in enumerate(rest) if w.endswith("]")), len(rest) - 1)
                    rest = rest[end + 1 :]
                if len(rest) >= 2 and rest[1] == suite:
                    candidates.append(rest[0])
    for path in sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources"))):
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            if suite in fields.get("suites", "").split():
                candidates.extend(fields.get("uris", "").split())
    for uri in candidates:
        if "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def default_cache_dir() -> Path:
    """Where built roots and images are kept: ``$OBD_CACHE_DIR/images``, else ``~/.cache/obd/images``."""
    base = os.environ.get("OBD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "obd"
    )
    return Path(base) / "images"


def debian_python_rootfs(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    include: Sequence[str] = ("python3-minimal",),
    progress: Progress | None = None,
) -> Path:
    """A Debian ``minbase`` root with ``include`` installed, made by debootstrap once and cached.

    Runs ``debootstrap --variant=minbase --include=python3-minimal SUITE DIR MIRROR`` (needs root and
    the Debian package ``debootstrap``) into a temporary directory, removes apt's package caches
    and lists, and publishes it with a rename, so an interrupted build is never reused. Returns the
    cached directory (``CACHE/rootfs/debian-SUITE-minbase-python3-minimal``).
    """
    say = progress or (lambda _m: None)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"debian-{suite}-minbase-{'-'.join(include) or 'none'}-v{ROOTFS_LAYOUT}"
    final = cache / "rootfs" / name
    if (final / ".obd-complete").is_file():
        return final
    if os.geteuid() != 0:
        raise ObdError("debootstrap needs root: run as root (./setup.sh demo does)")
    debootstrap = find_program("debootstrap", "debootstrap")
    mirror = mirror or apt_mirror(suite)
    with _locked(cache / "rootfs" / f".{name}.lock"):
        if (final / ".obd-complete").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            say(f"debootstrap --variant=minbase --include={','.join(include)} {suite} from {mirror}")
            t0 = time.monotonic()
            argv = [debootstrap, "--variant=minbase"]
            if include:
                argv.append(f"--include={','.join(include)}")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *SBIN_DIRS])
            _run([*argv, suite, str(tmp / "root"), mirror], "debootstrap", env=env, timeout=3600)
            for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
                for junk in glob.glob(str(tmp / "root" / pattern)):
                    with contextlib.suppress(OSError):
                        os.unlink(junk)
            (tmp / "root" / ".obd-complete").write_text(f"{suite} {mirror} {time.time():.0f}\n")
            if final.exists():
                shutil.rmtree(final)
            publish_path(tmp / "root", final)
            say(f"root file system ready in {time.monotonic() - t0:.1f} s: {final}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- ext4 and overlaybd layers ---------------------------------------------------------------------


def tree_bytes(root: str | os.PathLike[str]) -> int:
    """Bytes a directory tree occupies (allocated blocks; symlinks and directories included)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def fs_size_for(root: str | os.PathLike[str], *, free: int = 256 << 20) -> int:
    """An ext4 size that holds ``root`` with ``free`` bytes to spare (MiB-rounded, at least 32 MiB)."""
    need = int(tree_bytes(root) * 1.15) + free + (16 << 20)
    return max(32 << 20, need + (-need % (1 << 20)))


def mkfs_ext4(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    size: int | None = None,
    *,
    label: str = "obd-root",
) -> Path:
    """``mke2fs -t ext4 -d ROOT`` into a new sparse file ``out`` of ``size`` bytes (default: fits)."""
    mke2fs = find_program("mke2fs", "e2fsprogs")
    size = size or fs_size_for(root)
    out = Path(out)
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    _run(
        [
            mke2fs,
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-I",
            "256",
            "-L",
            label,
            "-E",
            "root_owner=0:0",
            "-d",
            os.fspath(root),
            str(out),
        ],
        f"mke2fs -d {root}",
    )
    return out


def build_layer(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    size: int | None = None,
    compress: str | None = DEFAULT_COMPRESS,
    tar: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:
    """Root directory → ext4 → one overlaybd layer blob at ``out`` (ZFile ``compress``, tar-wrapped).

    The ext4 image is a temporary sparse file next to ``out``; the layer is published atomically.
    The defaults (zstd, 32 KiB blocks) fetch the fewest bytes in the fewest requests when a guest
    boots lazily from a slow registry (docs/run.md has the measurements); overlaybd reads them too
    (its reader takes blocks up to 64 KiB whose compressed size fits 16 bits).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".obd-layer-", dir=out.parent) as tmp:
        raw = mkfs_ext4(root, Path(tmp) / "root.ext4", size)
        part = Path(tmp) / "layer"
        import_raw(
            str(raw), str(part), options=OutputOptions(compress=compress, tar=tar, block_size=block_size)
        )
        publish_path(part, out)
    return out


def cached_layer(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    name: str,
    *,
    size: int | None = None,
    compress: str | None = DEFAULT_COMPRESS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    tar: bool = True,
    progress: Progress | None = None,
) -> Path:
    """:func:`build_layer` of ``root`` kept as ``CACHE/layers/NAME-<compress>-<block>k[-tar]-vN.commit``.

    The layer is rebuilt when ``root`` is newer than it (its ``.obd-complete`` stamp, or the root
    directory itself).
    """
    say = progress or (lambda _m: None)
    suffix = f"{compress or 'plain'}-{block_size // 1024}k{'-tar' if tar else ''}-v{LAYER_LAYOUT}"
    out = Path(cache_dir) / "layers" / f"{name}-{suffix}.commit"
    stamp = Path(root) / ".obd-complete"
    born = (stamp if stamp.exists() else Path(root)).stat().st_mtime
    with _locked(out.with_name(f".{out.name}.lock")):
        if out.is_file() and out.stat().st_mtime >= born:
            return out
        t0 = time.monotonic()
        say(
            f"making an overlaybd layer of {root} (ext4, ZFile {compress or 'off'} "
            f"{block_size // 1024} KiB blocks, tar {'on' if tar else 'off'})"
        )
        build_layer(root, out, size=size, compress=compress, tar=tar, block_size=block_size)
        say(f"layer ready in {time.monotonic() - t0:.1f} s: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def push_image(
    layers: Sequence[str | os.PathLike[str]],
    reference: str,
    *,
    config: dict[str, Any] | None = None,
    insecure: bool | tuple[str, ...] = False,
    timeout: float = 600,
) -> str:
    """Push overlaybd layer files (lowest first) with OCI run ``config`` as ``reference``; its digest."""
    # The registry client (aiohttp) loads only when an image is pushed, not for building roots.
    from obd.image.assemble import push_files_image
    from obd.registry.client import RegistryClient
    from obd.registry.loop import default_runner

    if not layers:
        raise ConfigError("no layers to push", field="layers")
    runner = default_runner()
    client = RegistryClient(insecure=insecure)
    try:
        result = runner.run(push_files_image(client, list(layers), reference, config=config), timeout)
    finally:
        with contextlib.suppress(Exception):
            runner.run(client.aclose(), 10)
    return result.digest


def python_config() -> dict[str, Any]:
    """The OCI run config of the python image (what Docker's ``python`` images set)."""
    return {
        "Cmd": ["python3"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
        "WorkingDir": "/",
    }
