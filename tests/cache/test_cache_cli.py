"""``obd cache ls|du|prune|clear`` through :func:`obd.cli.main`, over a cache filled from real blobs."""

from __future__ import annotations

import json
import time

import pytest
from test_cache_source import MemUpstream, blob_bytes

from obd.cache import CachedSource, CacheStore
from obd.cli import main
from obd.observability.stats import Stats

PS = 4096


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding L1.lz4.commit whole and the first 4 pages of L0.lz4.commit (used last)."""
    monkeypatch.setattr(CacheStore, "touch_interval", 0.0)
    root = tmp_path / "cache"
    store = CacheStore(root, stats=Stats())
    digests = []
    for name, length in (("L1.lz4.commit", None), ("L0.lz4.commit", 4 * PS)):
        data = blob_bytes(name)
        src = CachedSource(MemUpstream(data), store)
        src.pread(0, length or len(data))
        src.close()
        digests.append(src.digest)
        time.sleep(0.05)
    return root, digests


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls(cache, capsys):
    root, (full, part) = cache
    code, out, _ = run(capsys, "cache", "ls", "--cache-dir", str(root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DIGEST", "SIZE", "CACHED", "%", "ON", "DISK", "LAST", "USED"]
    assert lines[1].startswith(full[:19] + " ") and "100.0" in lines[1]  # least recently used first
    assert lines[2].startswith(part[:19] + " ") and "0.8" in lines[2] and "16.0 KiB" in lines[2]
    code, out, _ = run(capsys, "cache", "ls", "--no-trunc", "--cache-dir", str(root))
    assert full in out and part in out
    code, out, _ = run(capsys, "cache", "ls", "--json", "--cache-dir", str(root))
    doc = json.loads(out)
    assert [e["digest"] for e in doc] == [full, part]
    assert doc[1]["present_bytes"] == 4 * PS and doc[1]["blob_size"] == len(blob_bytes("L0.lz4.commit"))
    assert doc[0]["present_bytes"] == doc[0]["blob_size"] == len(blob_bytes("L1.lz4.commit"))


def test_ls_empty_and_broken(tmp_path, cache, capsys):
    code, out, _ = run(capsys, "cache", "ls", "--cache-dir", str(tmp_path / "none"))
    assert code == 0 and "empty" in out
    root, (full, _) = cache
    store = CacheStore(root)
    with open(store.paths(full)[1], "r+b") as f:
        f.write(b"XXXX")
    code, out, _ = run(capsys, "cache", "ls", "--cache-dir", str(root))
    assert "broken: header.magic" in out


def test_du(cache, capsys):
    root, _ = cache
    code, out, _ = run(capsys, "cache", "du", "--cache-dir", str(root), "--limit", "1G")
    assert code == 0
    assert "blobs:   2" in out and "of the 1.0 GiB limit" in out
    code, out, _ = run(capsys, "cache", "du", "--json", "--cache-dir", str(root), "--limit", "1G")
    doc = json.loads(out)
    assert doc["blobs"] == 2 and doc["limit_bytes"] == 1 << 30
    assert doc["cached_bytes"] == len(blob_bytes("L1.lz4.commit")) + 4 * PS
    assert doc["disk_bytes"] == CacheStore(root).usage()


def test_du_from_the_environment(cache, capsys, monkeypatch):
    root, _ = cache
    monkeypatch.setenv("OBD_CACHE_DIR", str(root))
    monkeypatch.setenv("OBD_CACHE_LIMIT", "100M")
    code, out, _ = run(capsys, "cache", "du", "--json")
    doc = json.loads(out)
    assert (
        code == 0 and doc["cache_dir"] == str(root) and doc["blobs"] == 2 and doc["limit_bytes"] == 100 << 20
    )


def test_prune(cache, capsys):
    root, (full, part) = cache
    code, out, _ = run(capsys, "cache", "prune", "--cache-dir", str(root))
    assert code == 0 and "evicted 0 blob(s)" in out
    code, out, _ = run(capsys, "cache", "prune", "--to", "32K", "--cache-dir", str(root))
    assert code == 0 and f"evicted {full}" in out and part not in out
    code, out, _ = run(capsys, "cache", "prune", "--json", "--limit", "0", "--cache-dir", str(root))
    doc = json.loads(out)
    assert [e["digest"] for e in doc["evicted"]] == [part] and doc["disk_bytes"] == 0


def test_clear(cache, capsys):
    root, (full, part) = cache
    code, out, err = run(capsys, "cache", "clear", "--digest", "sha256:", "--cache-dir", str(root))
    assert code == 1 and "not a digest" in err
    code, out, err = run(capsys, "cache", "clear", "--digest", "0" * 70, "--cache-dir", str(root))
    assert code == 1 and "no cached blob matches" in err
    code, out, _ = run(capsys, "cache", "clear", "--digest", part[7:15], "--cache-dir", str(root))
    assert code == 0 and f"removed {part}" in out
    code, out, _ = run(capsys, "cache", "clear", "--json", "--cache-dir", str(root))
    doc = json.loads(out)
    assert [e["digest"] for e in doc["removed"]] == [full] and doc["disk_bytes"] == 0
    assert CacheStore(root).entries() == []


def test_usage_errors(cache, capsys):
    root, _ = cache
    code, out, _ = run(capsys, "cache")
    assert code == 2 and "obd cache prune --to 2G" in out
    code, _, err = run(capsys, "cache", "du", "--limit", "lots", "--cache-dir", str(root))
    assert code == 1 and "not a size" in err
    with pytest.raises(SystemExit):
        main(["cache", "frobnicate"])
    code, out, _ = run(capsys)
    assert "cache" in out
