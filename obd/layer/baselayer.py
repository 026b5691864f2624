"""overlaybd's stock base layer, shipped in ``obd/data``, and the blob the convertor pushes for it.

The convertor without ``--mkfs`` stacks every image on ``/opt/overlaybd/baselayers/ext4_64`` and
pushes that file as the image's first layer, wrapped by Go's ``archive/tar`` (docs/formats.md §7.1,
``uploadBaseLayer``): one USTAR header for ``overlaybd.commit`` (mode 0444, owner 0:0, mtime 0, no
user or group names), the file, zero padding to 512 bytes and the two zero blocks ``Close`` adds.
:func:`go_tar_header` writes that header the way Go formats it (zero-padded octal fields, a
NUL-terminated checksum followed by a space), so the blob — and its digest — match the convertor's.

That blob is the first layer of every image the convertor makes without ``--mkfs`` (obd's and
overlaybd's alike), and obd holds its bytes: :func:`packaged_blob` gives the local copy of a layer
whose digest is :data:`BASE_BLOB_DIGEST`, so that opening a registry image reads its base layer
(530 kB of jump table, the file system's first metadata) from disk, not from the registry — as a
content store serves a blob it already has. The digest is the whole blob's sha256, checked on the
local copy once per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from obd.cache.store import default_cache_dir
from obd.errors import ChecksumError, ObdError
from obd.io.publish import publishing

log = logging.getLogger(__name__)

BASE_NAME = "ext4_64"
BASE_SHA256 = "c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9"
BASE_SIZE = 4737695
COMMIT_NAME = "overlaybd.commit"
BLOCK = 512
#: The blob the convertor pushes for it (:func:`base_layer_blob`): its digest and size.
BASE_BLOB_DIGEST = "sha256:a8b5fca80efae55088290f3da8110d7742de55c2a378d5ab53226a483f390e21"
BASE_BLOB_SIZE = BLOCK + BASE_SIZE + (-BASE_SIZE % BLOCK) + 2 * BLOCK


def _go_octal(value: int, width: int) -> bytes:
    """Go ``formatOctal``: octal zero-padded to ``width - 1`` digits, then NUL."""
    digits = f"{value:o}".encode()
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return digits.rjust(width - 1, b"0") + b"\x00"


def go_tar_header(name: str, size: int, *, mode: int = 0o444) -> bytes:
    """The USTAR header Go's ``tar.Writer.WriteHeader`` writes for a plain regular file."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError("name longer than a USTAR name field")
    block = bytearray(BLOCK)
    block[0 : len(raw)] = raw
    block[100:108] = _go_octal(mode, 8)
    block[108:116] = _go_octal(0, 8)  # uid
    block[116:124] = _go_octal(0, 8)  # gid
    block[124:136] = _go_octal(size, 12)
    block[136:148] = _go_octal(0, 12)  # mtime: Go writes the zero time as the Unix epoch
    block[156:157] = b"0"
    block[257:263] = b"ustar\x00"
    block[263:265] = b"00"
    block[329:337] = _go_octal(0, 8)  # devmajor
    block[337:345] = _go_octal(0, 8)  # devminor
    block[148:156] = b" " * 8
    checksum = sum(block)
    block[148:155] = _go_octal(checksum, 7)
    block[155] = 0x20
    return bytes(block)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is None:
        cache_dir = default_cache_dir()
    root = Path(cache_dir) / "convert" / "base"
    root.mkdir(parents=True, exist_ok=True)
    return root


def base_layer_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The base layer file ``ext4_64``, unpacked from the package once and checked (SHA-256); a cached
    copy is checked against the packaged digest too (once per process), and unpacked again if it
    differs (docs/verify.md)."""
    root = _cache_root(cache_dir)
    out = root / BASE_NAME
    if out.is_file() and out.stat().st_size == BASE_SIZE:
        if _checked_before(out):
            return out
        log.warning("cached base layer %s does not have its sha256; unpacking it again", out)
    # here: tarfile and importlib.resources cost a reader of the packaged blob ~10 ms at start-up
    import tarfile
    from importlib import resources

    # A cache: losing it only costs unpacking it again, so no fsync.
    h = hashlib.sha256()
    with (
        publishing(out, durable=False) as dst,
        resources.files("obd.data").joinpath("ext4_64.tar.gz").open("rb") as packed,
        tarfile.open(fileobj=packed, mode="r:gz") as tar,
    ):
        member = tar.getmember(BASE_NAME)
        src = tar.extractfile(member)
        if src is None:
            raise ObdError("the packaged base layer archive holds no regular ext4_64")
        while chunk := src.read(1 << 20):
            h.update(chunk)
            dst.write(chunk)
        if h.hexdigest() != BASE_SHA256:
            raise ChecksumError(
                f"packaged base layer has sha256 {h.hexdigest()}", path=BASE_NAME, value=BASE_SHA256
            )
    st = out.stat()
    _CHECKED.add((str(out), st.st_ino, st.st_mtime_ns))  # just hashed on its way in
    return out


#: ``(path, inode, mtime)`` of unpacked base layers whose sha256 this process has checked.
_CHECKED: set[tuple[str, int, int]] = set()


def _checked_before(path: Path, sha256: str = BASE_SHA256) -> bool:
    """Whether the file at ``path`` has the hex digest ``sha256``: hashed once per process and file
    (4.5 MiB, a few ms), since the cache, not the package, holds what the device reads."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_mtime_ns)
    if key in _CHECKED:
        return True
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != sha256:
        return False
    _CHECKED.add(key)
    return True


def base_layer_blob(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str, int]:
    """``(path, digest, size)`` of the base layer as the convertor pushes it (Go-tar wrapped), made
    from :func:`base_layer_path` once and checked against :data:`BASE_BLOB_DIGEST`."""
    src = base_layer_path(cache_dir)
    out = src.parent / "ext4_64.go.tar"
    want = BASE_BLOB_DIGEST.removeprefix("sha256:")
    if out.is_file() and out.stat().st_size == BASE_BLOB_SIZE and _checked_before(out, want):
        return out, BASE_BLOB_DIGEST, BASE_BLOB_SIZE
    with publishing(out, durable=False) as dst, open(src, "rb") as f:
        dst.write(go_tar_header(COMMIT_NAME, BASE_SIZE))
        while chunk := f.read(1 << 20):
            dst.write(chunk)
        dst.write(bytes(-BASE_SIZE % BLOCK + 2 * BLOCK))
    if not _checked_before(out, want):
        raise ChecksumError("wrapped base layer: digest mismatch", path=out, value=BASE_BLOB_DIGEST)
    return out, BASE_BLOB_DIGEST, BASE_BLOB_SIZE


def packaged_blob(
    digest: str, size: int | None, cache_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """The local copy of blob ``digest`` (``size`` bytes, None: any) if it is the base layer's, else None.

    None too, with a warning, if the copy cannot be made in ``cache_dir`` (a read-only cache, a
    full disk): the caller then reads the blob where it is, e.g. from the registry.
    """
    if digest != BASE_BLOB_DIGEST or size not in (None, BASE_BLOB_SIZE):
        return None
    try:
        return base_layer_blob(cache_dir)[0]
    except (OSError, ObdError) as e:
        log.warning("the packaged base layer cannot be used (%s); reading %s from the registry", e, digest)
        return None


__all__ = [
    "BASE_BLOB_DIGEST",
    "BASE_BLOB_SIZE",
    "BASE_SHA256",
    "base_layer_blob",
    "base_layer_path",
    "go_tar_header",
    "packaged_blob",
]
