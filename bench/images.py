"""Cached image builders for benchmarks and tests: root file systems, overlaybd layers, plain OCI images.

Everything is built once per cache directory (default ``$OBD_CACHE_DIR/images``, else
``~/.cache/obd/images``) and reused:

* :func:`debian_python_rootfs` — ``debootstrap --variant=minbase --include=python3-minimal bookworm``
  from this machine's apt mirror (root needed; ≈ 30 s once, ≈ 150 MB);
* :func:`busybox_rootfs` — a busybox-static root in milliseconds (for quick tests);
* :func:`overlaybd_layer` — a root as one overlaybd layer (ext4 → LSMT, ZFile, tar envelope);
* :func:`raw_ext4` — a root as a ready ext4 disk file (the cold-start floor boots it directly);
* :func:`plain_oci_layout` — the same root as an ordinary OCI image of gzip tar layers (what a
  container runtime pulls and extracts today), split into several layers like a Dockerfile build;
* :func:`debian_python_layout` — the Debian python root as five gzip layers, the last one deleting
  the docs and debconf's old caches with whiteouts (the input ``bench/bench_convert.py`` converts).

The root file system and layer builders live in :mod:`frontends.run.images` (``obd demo`` uses
them too); this module adds the caching conventions and the plain-OCI side benchmarks compare with.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from frontends.run.images import (  # noqa: E402
    apt_mirror,
    busybox_rootfs,
    cached_layer,
    debian_python_rootfs,
    default_cache_dir,
    mkfs_ext4,
    python_config,
)

__all__ = [
    "DEFAULT_CACHE",
    "apt_mirror",
    "busybox_rootfs",
    "debian_python_layout",
    "debian_python_rootfs",
    "default_cache_dir",
    "overlaybd_layer",
    "plain_oci_layout",
    "python_config",
    "raw_ext4",
]

#: The default cache directory of every builder here.
DEFAULT_CACHE = default_cache_dir()


def _cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _born(root: Path) -> float:
    stamp = root / ".obd-complete"
    return (stamp if stamp.exists() else root).stat().st_mtime


def overlaybd_layer(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    compress: str | None = "zstd",
    block_size: int = 32 << 10,
    tar: bool = True,
) -> Path:
    """``root`` as one overlaybd layer blob, cached under ``CACHE/layers/`` (see :func:`cached_layer`)."""
    root = Path(root)
    return cached_layer(
        root, _cache(cache_dir), name or root.name, compress=compress, block_size=block_size, tar=tar
    )


def raw_ext4(
    root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, *, name: str | None = None
) -> Path:
    """``root`` as an ext4 disk file (``mke2fs -d``), cached as ``CACHE/raw/NAME.ext4``."""
    root = Path(root)
    out = _cache(cache_dir) / "raw" / f"{name or root.name}.ext4"
    if out.is_file() and out.stat().st_mtime >= _born(root):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    mkfs_ext4(root, tmp)
    os.replace(tmp, out)
    return out


def _split(root: Path, layers: int) -> list[list[str]]:
    """Top-level-ish subtrees of ``root`` (relative paths) in ``layers`` bins of similar size.

    The first bin also holds every directory (without its files) so later layers never create a
    parent implicitly; the rest is balanced greedily by size, biggest subtrees first.
    """
    units: list[tuple[int, str]] = []
    for top in sorted(os.listdir(root)):
        path = root / top
        if path.is_dir() and not path.is_symlink() and top in ("usr", "var"):
            for sub in sorted(os.listdir(path)):
                sp = path / sub
                if sp.is_dir() and not sp.is_symlink() and sub in ("lib", "share"):
                    for leaf in sorted(os.listdir(sp)):
                        units.append((_size(sp / leaf), f"{top}/{sub}/{leaf}"))
                else:
                    units.append((_size(sp), f"{top}/{sub}"))
        else:
            units.append((_size(path), top))
    bins: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, layers))]
    for size, rel in sorted(units, reverse=True):
        i = min(range(len(bins)), key=lambda k: bins[k][0])
        bins[i] = (bins[i][0] + size, [*bins[i][1], rel])
    return [sorted(b) for _, b in bins if b]


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _write_layer(root: Path, members: Sequence[str], out: Path, *, all_dirs: bool) -> tuple[str, str, int]:
    """A gzip tar of ``members`` (subtrees of ``root``); returns (blob digest, diff_id, size)."""
    raw_hash = hashlib.sha256()

    class _Tee:
        def __init__(self, f: Any):
            self.f = f

        def write(self, data: bytes) -> int:
            raw_hash.update(data)
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
        tee = _Tee(gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            if all_dirs:
                for dirpath, dirs, _files in os.walk(root):
                    for d in sorted(dirs):
                        full = Path(dirpath) / d
                        if not full.is_symlink():
                            tar.add(full, arcname=str(full.relative_to(root)), recursive=False)
                    dirs.sort()
            for rel in members:
                path = root / rel
                if all_dirs and path.is_dir() and not path.is_symlink():
                    for dirpath, dirs, files in os.walk(path):
                        dirs.sort()
                        for name in sorted(files) + [d for d in dirs if (Path(dirpath) / d).is_symlink()]:
                            full = Path(dirpath) / name
                            tar.add(full, arcname=str(full.relative_to(root)), recursive=False)
                else:
                    tar.add(path, arcname=rel)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return "sha256:" + digest, "sha256:" + raw_hash.hexdigest(), out.stat().st_size


def plain_oci_layout(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    layers: int = 5,
    config: dict[str, Any] | None = None,
    tag: str = "latest",
    whiteouts: Sequence[str] = (),
) -> Path:
    """``root`` as a plain OCI image (``layers`` gzip tar layers) in an OCI layout, cached.

    ``whiteouts`` (paths relative to the root) add one more layer that deletes them the OCI way
    (``.wh.NAME`` files). Returns the layout directory (``CACHE/oci/NAME``; the image is tagged ``tag``).
    """
    root = Path(root)
    out = _cache(cache_dir) / "oci" / (name or root.name)
    if (out / "index.json").is_file() and (out / "index.json").stat().st_mtime >= _born(root):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        descs, diff_ids = [], []
        for i, members in enumerate(_split(root, layers)):
            part = tmp / f"layer{i}.tar.gz"
            digest, diff_id, size = _write_layer(root, members, part, all_dirs=i == 0)
            os.replace(part, blobs / digest.split(":", 1)[1])
            descs.append(
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}
            )
            diff_ids.append(diff_id)
        if whiteouts:
            part = tmp / "whiteouts.tar.gz"
            digest, diff_id, size = _write_whiteouts(whiteouts, part)
            os.replace(part, blobs / digest.split(":", 1)[1])
            descs.append(
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}
            )
            diff_ids.append(diff_id)
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cfg_bytes = json.dumps(image_config, separators=(",", ":"), sort_keys=True).encode()
        cfg_digest = hashlib.sha256(cfg_bytes).hexdigest()
        (blobs / cfg_digest).write_bytes(cfg_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + cfg_digest,
                "size": len(cfg_bytes),
            },
            "layers": descs,
        }
        man_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        man_digest = hashlib.sha256(man_bytes).hexdigest()
        (blobs / man_digest).write_bytes(man_bytes)
        (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:" + man_digest,
                    "size": len(man_bytes),
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        (tmp / "index.json").write_text(json.dumps(index))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_whiteouts(paths: Sequence[str], out: Path) -> tuple[str, str, int]:
    """A gzip tar layer of OCI whiteout files deleting ``paths``; (blob digest, diff_id, size)."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(set(paths)):
            parent, _, name = rel.strip("/").rpartition("/")
            info = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(b""))
    raw = buf.getvalue()
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(raw)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return "sha256:" + digest, "sha256:" + hashlib.sha256(raw).hexdigest(), out.stat().st_size


def debian_python_layout(cache_dir: str | os.PathLike[str] | None = None, *, tag: str = "latest") -> Path:
    """The Debian python root as an OCI layout of five gzip layers, the last one a whiteout layer.

    Four layers hold the root (split by subtree, balanced by size); the fifth deletes
    ``usr/share/doc/*`` and debconf's ``*-old`` caches with whiteouts, as a Dockerfile's cleanup
    ``RUN`` step would. Cached as ``CACHE/oci/debian-python5``.
    """
    root = debian_python_rootfs(cache_dir)
    gone = [f"usr/share/doc/{n}" for n in sorted(os.listdir(root / "usr" / "share" / "doc"))]
    debconf = root / "var" / "cache" / "debconf"
    if debconf.is_dir():
        gone += [f"var/cache/debconf/{n}" for n in sorted(os.listdir(debconf)) if n.endswith("-old")]
    return plain_oci_layout(
        root, cache_dir, name="debian-python5", layers=4, config=python_config(), tag=tag, whiteouts=gone
    )
