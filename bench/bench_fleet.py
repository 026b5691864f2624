"""Fleet figure: bytes fetched from the registry by 1 vs 16 concurrent cold readers through one host cache.

Starts Debian's ``docker-registry`` on loopback with the ACI fixture image, puts a recording proxy
in front, runs one ``obd export`` on a cold cache, then 16 at once on another cold cache, and prints
the blob bytes the registry was asked for in each case and their ratio (issue 15: at most 1.1).

    .venv/bin/python bench/bench_fleet.py [--readers 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "helpers"), str(ROOT / "tests" / "cache")]

from registry_server import FaultProxy, RegistryServer  # noqa: E402
from test_cache_shared import ACI, blob_bytes, export  # noqa: E402

from obd.registry import AsyncRunner, CredentialResolver, RegistryClient  # noqa: E402
from obd.registry.push import push_layout  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readers", type=int, default=16, help="concurrent cold readers (default 16)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        reg = RegistryServer(work / "origin", "noauth").start()
        try:
            runner = AsyncRunner("bench-fleet")
            c = RegistryClient(credentials=CredentialResolver(env={}, use_docker_config=False), insecure=True)
            runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
            runner.run(c.aclose(), 10)
            runner.close()
            proxy = FaultProxy(reg.url).start()
            try:
                t0 = time.monotonic()
                if export(proxy.host, work / "c1", work / "one.raw").wait(300) != 0:
                    raise SystemExit("the single reader failed")
                single, t1 = blob_bytes(proxy), time.monotonic() - t0
                proxy.clear()
                t0 = time.monotonic()
                procs = [export(proxy.host, work / "cN", work / f"r{k}.raw") for k in range(args.readers)]
                if any(p.wait(300) != 0 for p in procs):
                    raise SystemExit("a concurrent reader failed")
                many, tn = blob_bytes(proxy), time.monotonic() - t0
            finally:
                proxy.stop()
        finally:
            reg.stop()
    print(f"1 cold reader:              {single:>10} blob bytes from the registry ({t1:.1f} s)")
    print(f"{args.readers} concurrent cold readers: {many:>10} blob bytes from the registry ({tn:.1f} s)")
    print(f"ratio: {many / single:.3f} (target <= 1.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
