"""CacheStore: digests and sizes, where the cache lives, the page table's header under damage and
hostile values, LRU eviction under a limit, prune and clear, broken and leftover files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cache_source import MemUpstream, blob_bytes, digest_of

from obd.cache import CachedSource, CacheStore, check_digest, default_cache_dir, parse_size
from obd.cache import store as cache_store
from obd.cache.store import HEADER_SIZE, MAGIC, MetaHeader, default_limit
from obd.errors import FormatError, ObdError
from obd.formats.crc import crc32c_raw
from obd.observability.stats import Stats

PS = 4096
HEX = "ab" * 32
DIGEST = "sha256:" + HEX


def test_digest_validation():
    assert check_digest(DIGEST) == DIGEST
    assert check_digest("sha512:" + HEX * 2) == "sha512:" + HEX * 2
    for bad in [
        "sha256:" + HEX.upper(),
        "sha256:" + HEX[:-1],
        "sha512:" + HEX,
        "md5:" + HEX,
        HEX,
        "",
        None,
        5,
    ]:
        with pytest.raises(ObdError, match="digest"):
            check_digest(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("10GiB", 10 << 30),
        ("1.5k", 1536),
        ("2 tb", 2 << 40),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "-1G", "1X", "G"])
def test_parse_size_rejects(text):
    with pytest.raises(ObdError):
        parse_size(text)


def test_default_dir_and_limit_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("OBD_CACHE_DIR", raising=False)
    monkeypatch.delenv("OBD_CACHE_LIMIT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "obd"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "obd"
    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "mine"))
    assert CacheStore().root == tmp_path / "mine"
    assert default_limit() == 10 << 30 == CacheStore().limit_bytes
    monkeypatch.setenv("OBD_CACHE_LIMIT", "3G")
    assert CacheStore().limit_bytes == 3 << 30
    monkeypatch.setenv("OBD_CACHE_LIMIT", "lots")
    with pytest.raises(ObdError, match="OBD_CACHE_LIMIT"):
        CacheStore()


def test_bad_store_parameters(tmp_path):
    for ps in (0, 1000, 256, 2 << 20):
        with pytest.raises(ObdError, match="page_size"):
            CacheStore(tmp_path, page_size=ps)
    with pytest.raises(ObdError, match="limit"):
        CacheStore(tmp_path, limit_bytes=-1)
    store = CacheStore(tmp_path)
    for size in (-1, 1 << 60, 1.5):
        with pytest.raises(ObdError, match="size"):
            store.open_blob(DIGEST, size)  # type: ignore[arg-type]


# -- the page table header --------------------------------------------------------------------------


def _header(**kw) -> MetaHeader:
    fields = {"page_size": PS, "blob_size": 10_000, "generation": 12345, "digest": DIGEST} | kw
    return MetaHeader(**fields)


def _repack(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    struct.pack_into("<I", b, HEADER_SIZE - 4, crc32c_raw(bytes(b[: HEADER_SIZE - 4])))
    return bytes(b)


def test_header_round_trip():
    for digest in (DIGEST, "sha512:" + "01" * 64):
        h = _header(digest=digest)
        raw = h.pack()
        assert len(raw) == HEADER_SIZE and raw[:8] == MAGIC
        assert MetaHeader.unpack(raw, path="t", file_size=h.file_size) == h
        assert h.pages == 3 and h.file_size == HEADER_SIZE + 3 * 8


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "field"),
    [
        (8, "<I", 2, "header.version"),
        (12, "<I", 3000, "header.page_size"),
        (12, "<I", 0, "header.page_size"),
        (16, "<Q", 1 << 62, "header.blob_size"),
        (16, "<Q", 1 << 40, "file_size"),  # plausible, but the file is not that big: no huge read
        (32, "<I", 48, "header.digest_len"),
    ],
)
def test_hostile_header_fields_are_refused(offset, fmt, value, field):
    h = _header()
    with pytest.raises(FormatError) as e:
        MetaHeader.unpack(_repack(h.pack(), offset, fmt, value), path="t", file_size=h.file_size)
    assert e.value.field == field


def test_damaged_header_is_refused():
    h = _header()
    raw = h.pack()
    with pytest.raises(FormatError, match="checksum"):
        MetaHeader.unpack(raw[:20] + b"\x01" + raw[21:], path="t", file_size=h.file_size)
    with pytest.raises(FormatError, match="magic"):
        MetaHeader.unpack(b"X" + raw[1:], path="t", file_size=h.file_size)
    with pytest.raises(FormatError, match="less than its header"):
        MetaHeader.unpack(raw[:100], path="t", file_size=100)


def _fill(store: CacheStore, name: str, length: int | None = None) -> CachedSource:
    data = blob_bytes(name)
    src = CachedSource(MemUpstream(data, name=name), store)
    assert src.pread(0, length or len(data)) == data[: length or len(data)]
    return src


@pytest.mark.parametrize("change", ["blob size", "page size", "other blob"])
def test_a_page_table_that_does_not_fit_is_replaced(tmp_path, change):
    stats = Stats()
    store = CacheStore(tmp_path, stats=stats, sync=False)
    data = blob_bytes("L1.lz4.commit")
    digest = digest_of(data)
    _fill(store, "L1.lz4.commit").close()
    if change == "blob size":  # the upstream now claims another size: believe it, not the cache
        blob = store.open_blob(digest, len(data) - 1)
    elif change == "page size":
        store = CacheStore(tmp_path, stats=stats, page_size=8192)
        blob = store.open_blob(digest, len(data))
    else:  # a page table renamed onto another blob's name
        other = "sha256:" + "cd" * 32
        os.link(store.paths(digest)[1], store.paths(other)[1])
        blob = store.open_blob(other, len(data))
    assert stats["cache_resets"] == 1
    assert blob.present_bytes() == 0
    blob.close()


def test_a_page_table_whose_data_file_went_is_replaced(tmp_path):
    stats = Stats()
    store = CacheStore(tmp_path, stats=stats, sync=False)
    data = blob_bytes("L1.lz4.commit")
    digest = digest_of(data)
    _fill(store, "L1.lz4.commit").close()
    os.unlink(store.paths(digest)[0])  # its records describe bytes that are gone
    blob = store.open_blob(digest, len(data))
    assert stats["cache_resets"] == 1 and blob.present_bytes() == 0
    blob.close()


def test_openers_racing_on_a_new_blob_share_one_page_table(tmp_path):
    """Each opener a store of its own, as processes are: all end up on the same data file and page
    table (a table one replaced under another would make both fetch every page)."""
    digest, size = "sha256:" + "ab" * 32, 1 << 20
    for _ in range(5):
        with contextlib.suppress(FileNotFoundError):
            for path in CacheStore(tmp_path, sync=False).paths(digest):
                os.unlink(path)
        start = threading.Barrier(8)
        blobs = []

        def one(start: threading.Barrier = start, blobs: list = blobs) -> None:
            store = CacheStore(tmp_path, stats=Stats(), sync=False)
            start.wait()
            blobs.append(store.open_blob(digest, size))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({os.fstat(b.meta_fd).st_ino for b in blobs}) == 1
        assert not any(b.stale() for b in blobs)
        for b in blobs:
            b.close()


# -- eviction -----------------------------------------------------------------------------------------


def test_lru_eviction_keeps_the_recently_used_blob(tmp_path, monkeypatch):
    monkeypatch.setattr(CacheStore, "touch_interval", 0.0)
    root = tmp_path / "cache"
    a = _fill(CacheStore(root, stats=Stats()), "L1.lz4.commit")
    time.sleep(0.05)
    b = _fill(CacheStore(root, stats=Stats()), "L2.zstd.commit")
    time.sleep(0.05)
    a.pread(0, 100)  # A is used again: B is now the least recently used
    used = CacheStore(root).usage()
    c_size = len(blob_bytes("L1.zstd.commit"))
    stats = Stats()
    store = CacheStore(root, limit_bytes=used + c_size // 2, stats=stats)
    c = _fill(store, "L1.zstd.commit")
    assert stats[cache_store.EVICTIONS] == 1
    assert {e.digest for e in store.entries()} == {a.digest, c.digest}
    assert store.usage() <= store.limit_bytes
    assert c.fully_cached() and a.fully_cached()
    # B's reader is fine: it refetches into fresh files
    assert not b.fully_cached()
    assert b.pread(0, 1000) == blob_bytes("L2.zstd.commit")[:1000]


def test_usage_counts_allocated_bytes_not_blob_sizes(tmp_path):
    store = CacheStore(tmp_path, stats=Stats())
    src = _fill(store, "L0.lz4.commit", PS)  # one page of a 2.1 MiB blob
    assert store.usage() <= 4 * PS
    (entry,) = store.entries()
    assert entry.blob_size == src.size and entry.present_bytes == PS and entry.problem is None


def test_prune_and_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(CacheStore, "touch_interval", 0.0)
    store = CacheStore(tmp_path, stats=Stats())
    names = ["L1.lz4.commit", "L1.zstd.commit", "L2.lz4.commit"]
    srcs = []
    for name in names:
        srcs.append(_fill(store, name))
        time.sleep(0.05)
    sizes = {e.digest: e.disk_bytes for e in store.entries()}
    newest = srcs[-1].digest
    evicted = store.prune(sizes[newest])
    assert [e.digest for e in evicted] == [s.digest for s in srcs[:2]]
    assert [e.digest for e in store.entries()] == [newest]
    assert store.prune() == []  # already under the limit
    assert [e.digest for e in store.clear(newest)] == [newest]
    assert store.entries() == [] and store.usage() == 0
    with pytest.raises(ObdError):
        store.prune(-1)


def test_broken_and_leftover_files(tmp_path):
    store = CacheStore(tmp_path, stats=Stats())
    good = _fill(store, "L1.lz4.commit")
    bad = _fill(store, "L2.lz4.commit")
    _, bad_meta = store.paths(bad.digest)
    with open(bad_meta, "r+b") as f:
        f.write(b"nonsense")
    orphan_data, _ = store.paths("sha256:" + "ef" * 32)
    orphan_data.parent.mkdir(exist_ok=True)
    orphan_data.write_bytes(b"x" * 100)
    leftover = store.root / "sha256" / ".tmp-0123-99-abcd"
    leftover.write_bytes(b"half-made page table")
    (store.root / "sha256" / "unrelated.txt").write_text("left alone")
    problems = {e.digest: e.problem for e in store.entries()}
    assert problems == {
        good.digest: None,
        bad.digest: "header.magic: not an obd cache page table",
        "sha256:" + "ef" * 32: "no page table",
    }
    evicted = store.prune()  # under the limit, but broken entries go anyway
    assert {e.digest for e in evicted} == {bad.digest, "sha256:" + "ef" * 32}
    assert [e.digest for e in store.entries()] == [good.digest]
    assert not leftover.exists() and (store.root / "sha256" / "unrelated.txt").exists()
    # the reader of the broken blob carries on with fresh files
    assert bad.pread(0, 5000) == blob_bytes("L2.lz4.commit")[:5000]
    assert bad._blob is not None and bad.cached_bytes() == 2 * PS


def test_a_cache_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    store = CacheStore(tmp_path / "file" / "cache", stats=Stats())
    with pytest.raises(ObdError, match="cannot create"):
        store.open_blob(DIGEST, 10)
    with pytest.raises(ObdError, match="cannot list"):
        store.entries()
    assert CacheStore(tmp_path / "nothing-yet").entries() == []


def test_sync_policy_is_applied(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    for sync in (True, False):
        store = CacheStore(tmp_path / str(sync), stats=Stats(), sync=sync)
        _fill(store, "L1.lz4.commit", 3 * PS)
    assert len(synced) == 1


def test_path_layout(tmp_path):
    store = CacheStore(tmp_path)
    data, meta = store.paths(DIGEST)
    assert data == Path(tmp_path, "sha256", HEX + ".data") and meta.name == HEX + ".meta"
    assert store.paths("sha512:" + HEX * 2)[1] == Path(tmp_path, "sha512", HEX * 2 + ".meta")
    with pytest.raises(ObdError):
        store.paths(HEX)


def test_sha512_blobs_live_beside_sha256_ones(tmp_path):
    data = blob_bytes("L1.lz4.commit")
    store = CacheStore(tmp_path, stats=Stats())
    up = MemUpstream(data)
    digest512 = "sha512:" + hashlib.sha512(data).hexdigest()
    for digest in (up.digest, digest512):
        src = CachedSource(up, store, digest=digest)
        assert src.pread(0, len(data)) == data and src.fully_cached()
    assert sorted(e.digest for e in store.entries()) == sorted([up.digest, digest512])
    assert [e.digest for e in store.clear(digest512)] == [digest512]


@settings(max_examples=200, deadline=None)
@given(
    first=st.integers(0, 1 << 40),
    crcs=st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=12),
    generation=st.integers(1, (1 << 64) - 1),
)
def test_page_tags_are_the_same_on_both_paths(first, crcs, generation):
    arr = np.array(crcs, dtype=np.uint32)
    vector = cache_store.expected_tags(first, np.concatenate([arr, np.zeros(5, np.uint32)]), generation)
    assert (
        cache_store.expected_tags(first, arr[:4], generation).tolist() == vector[: min(4, len(arr))].tolist()
    )
    assert 0 not in vector.tolist()
