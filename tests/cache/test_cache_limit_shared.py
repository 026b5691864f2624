"""One host cache, several real processes filling it past its size limit at once.

Each worker process reads blobs (distinct and shared ones) through its own :class:`CacheStore`
on one directory with a small limit, so evictions happen all the time and under each other's
feet. The test checks what the store promises (see :class:`obd.cache.store.CacheStore`):

* no process fails and every byte a process read equals the origin's;
* the cache never holds more than the limit plus the documented slack (the fills in flight while
  an eviction recounts the directory: one per process, with its page-table blocks, plus the
  header block of each page table created meanwhile), sampled all through the run and at the end;
* no torn entries: every page the page tables mark present, after the run, has the origin's bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from obd.cache import CacheStore

pytestmark = pytest.mark.timeout(120)

LIMIT = 4 << 20
BLOB = 1 << 20
WORKERS = 3
#: blob k of worker w is origin blob (w + k) % BLOBS: neighbours share most of theirs
BLOBS = 8
PER_WORKER = 8
CHUNK = 64 << 10

WORKER = textwrap.dedent(
    """
    import os, random, sys
    from obd.cache import CachedSource, CacheStore

    class FileUpstream:
        def __init__(self, path, digest):
            self.name, self.digest = str(path), digest
            self.size = os.path.getsize(path)
            self.fd = os.open(path, os.O_RDONLY)

        def fetch_many(self, ranges):
            return [os.pread(self.fd, n, off) for off, n in ranges]

    cache, origin, limit, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    names = sys.argv[5:]
    rng = random.Random(seed)
    store = CacheStore(cache, limit_bytes=limit, sync=False)
    for rounds in range(3):  # the second round reads what survived eviction, and refills the rest
        for name in names:
            path = os.path.join(origin, name)
            want = open(path, "rb").read()
            src = CachedSource(FileUpstream(path, "sha256:" + name), store)
            offsets = list(range(0, len(want), {chunk}))
            rng.shuffle(offsets)
            for off in offsets:
                got = src.pread(off, {chunk})
                if got != want[off:off + {chunk}]:
                    sys.exit(f"wrong bytes: {{name}} at {{off}}")
            src.close()
    """
).format(chunk=CHUNK)


def make_origin(folder: Path) -> list[str]:
    """BLOBS random blobs named by their sha256 hex (the cache keys them by digest)."""
    folder.mkdir()
    names = []
    for _ in range(BLOBS):
        data = os.urandom(BLOB)
        name = hashlib.sha256(data).hexdigest()
        (folder / name).write_bytes(data)
        names.append(name)
    return names


def present_pages_match(store: CacheStore, origin: Path) -> int:
    """Check every present page of every cached blob against the origin; the number checked."""
    checked = 0
    for entry in store.entries():
        assert entry.problem is None, (entry.digest, entry.problem)
        data_path, _ = store.paths(entry.digest)
        want = (origin / entry.digest.partition(":")[2]).read_bytes()
        blob = store.open_blob(entry.digest, len(want))
        try:
            _, present = blob.records(0, blob.pages)
            got = data_path.read_bytes()
            for p in present.nonzero()[0].tolist():
                lo, hi = p * blob.page_size, min((p + 1) * blob.page_size, len(want))
                assert got[lo:hi] == want[lo:hi], f"torn page {p} of {entry.digest}"
                checked += 1
        finally:
            blob.close()
    return checked


def test_limit_holds_across_processes(tmp_path):
    origin = tmp_path / "origin"
    names = make_origin(origin)
    cache = tmp_path / "cache"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for w in range(WORKERS):
        mine = [names[(w + k) % BLOBS] for k in range(PER_WORKER)]
        argv = [sys.executable, str(script), str(cache), str(origin), str(LIMIT), str(w), *mine]
        procs.append(subprocess.Popen(argv, stderr=subprocess.PIPE))
    store = CacheStore(cache, limit_bytes=LIMIT)
    peak, samples = 0, 0
    while any(p.poll() is None for p in procs):
        try:
            peak = max(peak, store.usage())
            samples += 1
        except OSError:
            pass
        time.sleep(0.01)
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode() if p.stderr else ""
    final = store.usage()
    slack = WORKERS * (CHUNK + 3 * 4096)
    checked = present_pages_match(store, origin)
    print(
        f"limit {LIMIT}, peak {peak} ({peak / LIMIT:.3f}x) over {samples} samples, final {final}, "
        f"slack allowed {slack}, {checked} present pages checked"
    )
    assert peak <= LIMIT + slack
    assert final <= LIMIT + slack
    assert checked > 0


def test_ledger_drift_and_damage_are_recounted(tmp_path):
    """A ledger that overstates the cache (a process killed between charging and writing) costs one
    recount, not an eviction; a damaged or missing one is recounted from the directory."""
    store = CacheStore(tmp_path / "c", limit_bytes=LIMIT, sync=False)
    data = os.urandom(BLOB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = store.open_blob(digest, BLOB)
    assert store.reserve(blob, BLOB // 2)
    blob.write_data(memoryview(data)[: BLOB // 2], 0)
    ledger = store.ledger_path
    leaked = struct.pack("<8sQ", b"obdusage", LIMIT)  # everything charged, nothing on disk
    ledger.write_bytes(leaked)
    assert store.reserve(blob, 4096)  # recounted: fits, and nothing was evicted
    assert blob.stale() is False
    charged = struct.unpack("<8sQ", ledger.read_bytes())[1]
    assert store.usage() <= charged < LIMIT
    for damage in (b"", b"garbage", b"x" * 16):
        ledger.write_bytes(damage)
        assert store.reserve(blob, 4096)
        assert struct.unpack("<8sQ", ledger.read_bytes())[0] == b"obdusage"
    store.clear()
    assert struct.unpack("<8sQ", ledger.read_bytes())[1] == store.usage() == 0
    blob.close()
