"""overlaybd's stock base layer as obd ships it (obd.layer.baselayer): unpacked, wrapped the way the
convertor pushes it, and served for its digest instead of the registry's copy."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from obd.layer.baselayer import (
    BASE_BLOB_DIGEST,
    BASE_BLOB_SIZE,
    BASE_SHA256,
    base_layer_blob,
    base_layer_path,
    packaged_blob,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_wrapped_blob_has_the_digest_the_convertor_pushes(tmp_path: Path) -> None:
    path, digest, size = base_layer_blob(tmp_path)
    assert (digest, size) == (BASE_BLOB_DIGEST, BASE_BLOB_SIZE)
    assert "sha256:" + _sha256(path) == BASE_BLOB_DIGEST
    assert _sha256(base_layer_path(tmp_path)) == BASE_SHA256
    assert path.read_bytes()[512 : 512 + 1024] == base_layer_path(tmp_path).read_bytes()[:1024]


def test_only_its_digest_and_size_get_the_packaged_copy(tmp_path: Path) -> None:
    assert packaged_blob(BASE_BLOB_DIGEST, None, tmp_path) == base_layer_blob(tmp_path)[0]
    assert packaged_blob(BASE_BLOB_DIGEST, BASE_BLOB_SIZE, tmp_path) is not None
    assert packaged_blob(BASE_BLOB_DIGEST, BASE_BLOB_SIZE + 1, tmp_path) is None
    assert packaged_blob("sha256:" + "0" * 64, BASE_BLOB_SIZE, tmp_path) is None


def test_a_damaged_cached_copy_is_made_again(tmp_path: Path) -> None:
    path = base_layer_blob(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.unlink()  # a new file: the checked-once memo is per inode and mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1))
    assert packaged_blob(BASE_BLOB_DIGEST, None, tmp_path) == path
    assert "sha256:" + _sha256(path) == BASE_BLOB_DIGEST


def test_an_unwritable_cache_falls_back_to_the_registry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the cache directory cannot be made under a file
    assert packaged_blob(BASE_BLOB_DIGEST, None, blocker) is None
    assert "reading sha256:a8b5fca8" in caplog.text and "from the registry" in caplog.text
