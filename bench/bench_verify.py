#!/usr/bin/env python3
"""What verified lazy reads cost: warm sequential read and cold start, with and without ``--verify``.

Setup, all local: Debian's ``docker-registry`` holding the converted hello-world image of
fixtures/aci-hello-world (one overlaybd layer, ~68 MiB of mapped device data), given 64 KiB digest
tables (:func:`obd.verify.table.add_tables`, what ``obd convert`` writes). Measured in one run,
the two modes alternating, best of ``--rounds``:

* **warm sequential read**: every mapped byte of the device read in 1 MiB reads, the block cache
  already full: ``--verify=off`` vs ``--verify=auto`` (each block's sha256 checked, above the cache);
* **cold start**: open the image on an empty cache and read its first 8 MiB.

Targets (issue 12): verification costs <= 10 % of warm throughput and <= 3 % of cold start.

Usage: .venv/bin/python bench/bench_verify.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers")]

from registry_server import RegistryServer  # noqa: E402

from fixtures import FIXTURES  # noqa: E402
from obd.cache import CachedSource, CacheStore  # noqa: E402
from obd.image.local import open_config  # noqa: E402
from obd.image.remote import RemoteOptions, registry_config  # noqa: E402
from obd.observability.stats import Stats  # noqa: E402
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient  # noqa: E402
from obd.registry.blob import RemoteBlob  # noqa: E402
from obd.registry.push import push_blob, push_layout  # noqa: E402
from obd.registry.reference import parse_reference  # noqa: E402
from obd.verify.format import DigestTable, build_table  # noqa: E402
from obd.verify.table import add_tables  # noqa: E402
from obd.verify.verifier import VERIFIED_BYTES, VerifiedSource  # noqa: E402

MiB = 1 << 20
CHUNK = MiB
COLD_BYTES = 8 * MiB


def publish(reg: RegistryServer) -> str:
    runner = AsyncRunner("bench-verify")
    client = RegistryClient(
        credentials=CredentialResolver(env={}, use_docker_config=False), insecure=True, hosts=[]
    )
    try:
        aci = FIXTURES / "aci-hello-world"
        runner.run(push_layout(client, f"oci:{aci}:amd64-converted", f"{reg.host}/bench/hello:plain"), 120)
        ref = parse_reference(f"{reg.host}/bench/hello:plain")
        add_tables(client, runner, ref, target="verified")
    finally:
        runner.run(client.aclose(), 10)
        runner.close()
    return f"{reg.host}/bench/hello:verified"


def data_extents(stack) -> list[tuple[int, int]]:
    """``(offset, length)`` of every mapped data run of the device."""
    return [(e.offset, e.length) for e in stack.extents() if e.kind == "data"]


def read_all(stack, extents: list[tuple[int, int]]) -> float:
    """Seconds to read every extent sequentially in CHUNK reads."""
    buf = memoryview(bytearray(CHUNK))
    t0 = time.perf_counter()
    for offset, length in extents:
        pos, end = offset, offset + length
        while pos < end:
            pos += stack.readinto(buf[: min(CHUNK, end - pos)], pos)
    return time.perf_counter() - t0


def options(reg: RegistryServer, cache: Path, verify: str) -> RemoteOptions:
    return RemoteOptions(insecure=(reg.host,), cache_dir=str(cache), stats=Stats(), verify=verify)


def warm(
    reg: RegistryServer, reference: str, work: Path, rounds: int, end: list[tuple[int, int]]
) -> tuple[dict[str, float], int]:
    """Best seconds per mode of a warm read of the extents, and the bytes one verified pass checked."""
    cache = work / "warm-cache"
    fill = options(reg, cache, "off")
    stack = open_config(registry_config(reference, fill), readonly=True, remote=fill)
    read_all(stack, end)  # fill the block cache
    stack.close()
    best = {"off": float("inf"), "auto": float("inf")}
    for _ in range(rounds):
        for mode in ("off", "auto"):
            opts = options(reg, cache, mode)
            stack = open_config(registry_config(reference, opts), readonly=True, remote=opts)
            try:
                best[mode] = min(best[mode], read_all(stack, end))
            finally:
                stack.close()
            if mode == "auto":
                verified = opts.stats[VERIFIED_BYTES]
                assert verified > 0, "nothing was verified"
    return best, verified


def hash_cost(nbytes: int, block: int = 64 << 10) -> float:
    """Seconds sha256 takes over ``nbytes`` in ``block``-byte pieces (the verifier's inner loop)."""
    data = memoryview(os.urandom(4 * MiB))
    t0 = time.perf_counter()
    done = 0
    while done < nbytes:
        for lo in range(0, len(data), block):
            hashlib.sha256(data[lo : lo + block]).digest()
        done += len(data)
    return (time.perf_counter() - t0) * nbytes / max(done, 1)


def blob_level(reg: RegistryServer, work: Path, rounds: int, size: int) -> dict[str, float]:
    """Best seconds per mode to read a ``size``-byte incompressible blob through the block cache in
    CHUNK reads, warm: the worst case, every byte hashed once, nothing for the block LRU to absorb."""
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    runner = AsyncRunner("bench-verify-blob")
    client = RegistryClient(
        credentials=CredentialResolver(env={}, use_docker_config=False), insecure=True, hosts=[]
    )
    repo = parse_reference(f"{reg.host}/bench/blob")
    try:
        runner.run(push_blob(client, repo, digest, data), 300)
        store = CacheStore(str(work / "blob-cache"), stats=Stats())
        cached = CachedSource(RemoteBlob(client, runner, repo, digest, size), store, digest=digest)
        cached.prefetch([(0, size)])
        table, _ = build_table(lambda b, off: cached.readinto(b, off), size)
        best = {"off": float("inf"), "auto": float("inf")}
        for _ in range(rounds):
            for mode in ("off", "auto"):
                src = cached if mode == "off" else VerifiedSource(cached, DigestTable(table), digest=digest)
                best[mode] = min(best[mode], read_all(src, [(0, size)]))
        cached.close()
    finally:
        runner.run(client.aclose(), 10)
        runner.close()
    return best


def cold(reg: RegistryServer, reference: str, work: Path, rounds: int) -> dict[str, float]:
    best = {"off": float("inf"), "auto": float("inf")}
    for r in range(rounds):
        for mode in ("off", "auto"):
            cache = work / f"cold-{mode}-{r}"
            opts = options(reg, cache, mode)
            t0 = time.perf_counter()
            stack = open_config(registry_config(reference, opts), readonly=True, remote=opts)
            try:
                stack.pread(0, COLD_BYTES)
            finally:
                stack.close()
            best[mode] = min(best[mode], time.perf_counter() - t0)
            opts.close()
            shutil.rmtree(cache, ignore_errors=True)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blob-mib", type=int, default=128, help="size of the blob-level test blob")
    ap.add_argument("--rounds", type=int, default=5, help="repetitions of each measurement (best kept)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="obd-bench-verify-"))
    reg = RegistryServer(work / "registry", "noauth").start()
    try:
        reference = publish(reg)
        probe = options(reg, work / "probe", "off")
        stack = open_config(registry_config(reference, probe), readonly=True, remote=probe)
        extents = data_extents(stack)
        stack.close()
        w, verified = warm(reg, reference, work, args.rounds, extents)
        hashing = hash_cost(verified)
        b = blob_level(reg, work, args.rounds, args.blob_mib * MiB)
        c = cold(reg, reference, work, args.rounds)
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    total = sum(n for _, n in extents)
    off, auto = total / w["off"] / MiB, total / w["auto"] / MiB
    print(
        f"warm sequential read of {total / MiB:.1f} MiB in {CHUNK // 1024} KiB reads (best of {args.rounds}):"
    )
    print(f"  --verify=off   {off:8.1f} MiB/s")
    print(f"  --verify=auto  {auto:8.1f} MiB/s")
    print(f"  ratio          {auto / off:8.3f}  (cost {100 * (1 - auto / off):.1f} %, target <= 10 %)")
    print(f"cold start: open + first {COLD_BYTES // MiB} MiB on an empty cache (best of {args.rounds}):")
    print(f"  --verify=off   {1000 * c['off']:8.1f} ms")
    print(f"  --verify=auto  {1000 * c['auto']:8.1f} ms")
    cost = 100 * (c["auto"] / c["off"] - 1)
    print(f"  ratio          {c['auto'] / c['off']:8.3f}  (cost {cost:.1f} %, target <= 3 %)")
    boff, bauto = args.blob_mib / b["off"], args.blob_mib / b["auto"]
    print(f"warm sequential read of a {args.blob_mib} MiB incompressible layer blob, cache to caller:")
    print(f"  --verify=off   {boff:8.1f} MiB/s")
    print(f"  --verify=auto  {bauto:8.1f} MiB/s")
    print(f"  ratio          {bauto / boff:8.3f}  (cost {100 * (1 - bauto / boff):.1f} %)")
    print(f"sha256 alone over the {verified / MiB:.1f} MiB a warm verified pass checked:")
    print(f"  {1000 * hashing:.1f} ms = {100 * hashing / w['off']:.1f} % of the unverified warm read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
