"""Corrupted block-cache files: a read through the cache returns the blob's bytes or a clear error.

A real overlaybd blob (the aci-hello-world layer, 640 KB) is read whole through a
:class:`~obd.cache.CachedSource` into a fresh :class:`~obd.cache.CacheStore`. Each trial then
damages the cache directory the way a crash, a full disk or a stray tool would — flipped bytes in
a cached page, in the page table or its header; the data or the page-table file truncated or
deleted; stray files (junk ``.meta``/``.data`` pairs, temp files, a directory where a file
belongs, junk in the lock file) — and a new store (as a new process would open it) reads the
whole blob again and lists the cache (what ``obd cache ls`` shows). Correct: the right bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from faults.tally import Clock, Tally
from fixtures import FIXTURES
from obd.cache import CachedSource, CacheStore
from obd.observability.stats import Stats

LAYER = "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
DATA = FIXTURES / "aci-hello-world" / "blobs" / "sha256" / LAYER


class Upstream:
    """The blob's bytes from memory, counting what is fetched (the registry, in production)."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)
        self.name = f"sha256:{LAYER[:12]}"
        self.digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.fetched = 0

    def fetch_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        out = [self.data[o : o + n] for o, n in ranges]
        self.fetched += sum(len(b) for b in out)
        return out


def _flip(path: Path, rng: random.Random, lo: int = 0, hi: int | None = None) -> str:
    raw = bytearray(path.read_bytes())
    if not raw:
        return "empty"
    hi = len(raw) if hi is None else min(hi, len(raw))
    where = [rng.randrange(lo, max(lo + 1, hi)) for _ in range(rng.randint(1, 4))]
    for pos in where:
        raw[min(pos, len(raw) - 1)] ^= 1 << rng.randrange(8)
    path.write_bytes(raw)
    return str(where)


def damages(data_path: Path, meta_path: Path, root: Path) -> list[tuple[str, Callable[[random.Random], str]]]:
    sha = root / "sha256"

    def stray(rng: random.Random) -> str:
        name = f"{rng.getrandbits(256):064x}"
        (sha / f"{name}.meta").write_bytes(os.urandom(rng.choice([0, 7, 4096, 9000])))
        (sha / f"{name}.data").write_bytes(os.urandom(rng.choice([0, 4096])))
        (sha / f".tmp-{rng.getrandbits(32):x}").write_bytes(b"half-written")
        (sha / "not-a-digest.meta").write_bytes(b"junk")
        (root / "lock").write_bytes(os.urandom(64))
        return name[:12]

    def dir_instead(rng: random.Random) -> str:
        meta_path.unlink()
        meta_path.mkdir()
        return "meta is a directory"

    return [
        ("flipped bytes in a cached page", lambda rng: _flip(data_path, rng)),
        ("flipped bytes in the page table", lambda rng: _flip(meta_path, rng, 64)),
        ("flipped bytes in the page-table header", lambda rng: _flip(meta_path, rng, 0, 64)),
        (
            "data file truncated",
            lambda rng: os.truncate(data_path, rng.randrange(data_path.stat().st_size)) or "",
        ),
        (
            "page table truncated",
            lambda rng: os.truncate(meta_path, rng.randrange(meta_path.stat().st_size)) or "",
        ),
        ("data file deleted", lambda rng: data_path.unlink() or ""),
        ("page table deleted", lambda rng: meta_path.unlink() or ""),
        ("data file zero-filled", lambda rng: data_path.write_bytes(bytes(data_path.stat().st_size)) or ""),
        ("stray files", stray),
        ("directory where the page table belongs", dir_instead),
    ]


def run(passes: int, seconds: float, seed: int = 13) -> Tally:
    clock = Clock(seconds)
    rng = random.Random(seed)
    data = DATA.read_bytes()
    want = hashlib.sha256(data).hexdigest()
    t = Tally("corrupted cache files")
    with tempfile.TemporaryDirectory(prefix="obd-cachefaults-") as tmp:
        root = Path(tmp) / "cache"

        def read_back() -> str:
            store = CacheStore(root, limit_bytes=1 << 30, sync=False, stats=Stats())
            src = CachedSource(Upstream(data), store, stats=store.stats)
            try:
                got = hashlib.sha256(src.pread(0, src.size)).hexdigest()
            finally:
                src.close()
            store.entries()
            store.usage()
            return got

        for p in range(passes):
            for name, damage in damages(*CacheStore(root).paths("sha256:" + want), root):
                if clock.left() <= 0:
                    t.notes.append(f"stopped by the time budget in pass {p + 1}")
                    return t
                shutil.rmtree(root, ignore_errors=True)
                if read_back() != want:
                    raise AssertionError("the fault-free read through the cache is wrong")
                what = damage(rng)
                t.trial(read_back, want, timeout=30, label=f"{name} {what}")
    return t
