"""The cache across real processes: kill -9 during a fetch storm, two processes filling one blob,
eviction under a reader in another process.

Children are this file run as a script (``python tests/cache/test_cache_crash.py MODE ...``); they read a
real overlaybd blob through a :class:`CachedSource` whose upstream serves its bytes from memory,
slowly, so that a kill lands while fetches and cache writes are in flight.

After every kill two independent checks run: the page tables are read directly and every page
marked present must hold exactly the blob's bytes (so nothing a crash left could ever be served
wrong, checksum or not); then a fresh process reads the whole blob through the cache and compares.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# A child runs this file as a script: its folder is on sys.path then, the helpers conftest.py adds are not.
HELPERS = Path(__file__).resolve().parents[1] / "helpers"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))

from test_cache_source import BLOB, MemUpstream, blob_bytes  # noqa: E402

from fixtures import REPO  # noqa: E402
from obd.cache import CachedSource, CacheStore  # noqa: E402
from obd.cache import source as cache_source  # noqa: E402
from obd.cache.store import HEADER_SIZE, MetaHeader, read_records  # noqa: E402
from obd.observability.stats import CACHE_HITS, CACHE_MISSES, Stats  # noqa: E402

PS = 4096


# -- child processes ----------------------------------------------------------------------------------


def _child(argv: list[str]) -> int:
    mode, root = argv[0], argv[1]
    seed = int(argv[2]) if len(argv) > 2 else 0
    data = blob_bytes()
    stats = Stats()
    # the verifier has no room to store anything: it reads what is cached and changes nothing
    limit = 0 if mode == "verify" else 1 << 30
    store = CacheStore(root, limit_bytes=limit, stats=stats)
    up = MemUpstream(data, delay=0.0 if mode == "verify" else 0.02)
    src = CachedSource(up, store, stats=stats, name=BLOB.name)
    rng = random.Random(seed)
    bad = []

    def check(off: int, n: int) -> None:
        got = src.pread(off, n)
        if got != data[off : off + n]:
            bad.append((off, n))

    if mode == "storm":  # random reads from several threads until killed
        print("go", flush=True)

        def worker(k: int) -> None:
            r = random.Random(seed * 100 + k)
            while not bad:
                off = r.randrange(len(data))
                check(off, r.choice([1, 512, 4096, 5000, 16384]))

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(60)  # the parent kills us long before
    elif mode == "fill-all":  # the whole blob, in random order, from two threads
        chunks = list(range(0, len(data), 12 * PS))
        rng.shuffle(chunks)
        half = len(chunks) // 2
        threads = [
            threading.Thread(target=lambda cs: [check(c, 12 * PS) for c in cs], args=(part,))
            for part in (chunks[:half], chunks[half:])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elif mode == "verify":
        check(0, len(data))
    elif mode == "reader":  # random reads for a while, while the parent evicts under us
        print("go", flush=True)
        deadline = time.monotonic() + float(argv[3])
        while time.monotonic() < deadline and not bad:
            off = rng.randrange(len(data))
            check(off, rng.choice([4096, 30000, 200000]))
    print(json.dumps({"bad": bad[:5], "stats": stats.snapshot(), "fetched": up.fetched}), flush=True)
    return 3 if bad else 0


def spawn(*args: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def on_disk_present_pages(root: Path, data: bytes) -> int:
    """Read the page tables directly: every page marked present must hold the blob's bytes."""
    present_pages = 0
    for meta in (root / "sha256").glob("*.meta"):
        fd = os.open(meta, os.O_RDONLY)
        try:
            header = MetaHeader.unpack(
                os.pread(fd, HEADER_SIZE, 0), path=str(meta), file_size=os.fstat(fd).st_size
            )
            _, present = read_records(fd, 0, header.pages, header.generation)
        finally:
            os.close(fd)
        cached = meta.with_suffix(".data").read_bytes()
        for p in present.nonzero()[0].tolist():
            assert cached[p * PS : (p + 1) * PS] == data[p * PS : (p + 1) * PS], (
                f"page {p} marked present is wrong"
            )
        present_pages += int(present.sum())
    return present_pages


# -- tests --------------------------------------------------------------------------------------------


def test_kill_9_during_a_fetch_storm(tmp_path):
    data = blob_bytes()
    root = tmp_path / "cache"
    rng = random.Random(20240607)
    seen_partial = 0
    for round_ in range(12):
        if round_ % 3 == 0:
            CacheStore(root, stats=Stats()).clear()  # start filling from empty again
        child = spawn("storm", root, round_)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0.02, 0.35))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL

        present = on_disk_present_pages(root, data)
        seen_partial += 0 < present < len(data) // PS
        result = finish(spawn("verify", root))
        assert result["bad"] == []
        assert result["stats"].get(cache_source.CRC_FAILURES, 0) == 0, (
            "a kill left a page whose bytes are wrong"
        )
        assert result["stats"][CACHE_HITS] == present
        assert result["stats"][CACHE_MISSES] == -(-len(data) // PS) - present
    assert seen_partial >= 3, "the kills should land while the cache is partly filled"


def test_two_processes_fill_the_same_blob(tmp_path):
    data = blob_bytes()
    root = tmp_path / "cache"
    a, b = spawn("fill-all", root, 1), spawn("fill-all", root, 2)
    ra, rb = finish(a), finish(b)
    assert ra["bad"] == rb["bad"] == []
    # each fetched at most the whole blob (fills are not shared across processes), together at least it
    assert len(data) <= ra["fetched"] + rb["fetched"] <= 2 * len(data) + 4 * 12 * PS
    assert on_disk_present_pages(root, data) == -(-len(data) // PS)
    result = finish(spawn("verify", root))
    assert result["fetched"] == 0 and result["stats"].get(cache_source.CRC_FAILURES, 0) == 0


def test_eviction_under_a_reader_in_another_process(tmp_path):
    root = tmp_path / "cache"
    reader = spawn("reader", root, 5, 3.0)
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "go"
    store = CacheStore(root, stats=Stats())
    evictions = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        time.sleep(0.15)
        evictions += len(store.clear() if evictions % 2 else store.prune(0))
    result = finish(reader)
    assert evictions >= 5
    assert result["bad"] == []
    assert result["stats"].get(cache_source.REOPENS, 0) >= 1
    # nothing is left behind but the one blob being read
    assert len(list((root / "sha256").glob("*.meta"))) <= 1
    assert not list((root / "sha256").glob(".tmp-*"))


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
