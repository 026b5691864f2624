"""Fleet figures: bytes fetched from the origin registry (1) by 1 vs 16 concurrent cold readers
through one host cache, and (2) through a cold vs a warm pull-through mirror.

(1) Starts Debian's ``docker-registry`` on loopback with the ACI fixture image, puts a recording
proxy in front, runs one ``obd export`` on a cold cache, then 16 at once on another cold cache, and
prints the blob bytes the registry was asked for in each case and their ratio (issue 15: at most 1.1).

(2) Puts a second ``docker-registry`` in pull-through mode (``proxy: remoteurl``) in front of the
recording proxy and points obd at it with a ``hosts.toml``; exports once with a cold mirror and a
cold host cache, then again with the warm mirror and a fresh host cache, and prints the blob bytes
the origin served each time (issue 15: 0 through the warm mirror); last, stops the origin and
exports once more through the mirror.

    .venv/bin/python bench/bench_fleet.py [--readers 16] [--part readers|mirror|all]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT / "tests" / "helpers"),
    str(ROOT / "tests" / "cache"),
    str(ROOT / "tests" / "remote"),
]

from registry_server import FaultProxy, RegistryServer  # noqa: E402
from test_cache_shared import ACI, blob_bytes, export  # noqa: E402
from test_registry_mirrors import wait_stored  # noqa: E402

from obd.registry import AsyncRunner, CredentialResolver, RegistryClient  # noqa: E402
from obd.registry.push import push_layout  # noqa: E402

IMAGE = "aci/hello:amd64-converted"


def push_fixture(host: str) -> None:
    runner = AsyncRunner("bench-fleet")
    c = RegistryClient(credentials=CredentialResolver(env={}, use_docker_config=False), insecure=True)
    runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{host}/aci/hello"), 60)
    runner.run(c.aclose(), 10)
    runner.close()


class LoggedRegistry(RegistryServer):
    """A ``docker-registry`` that logs each response (``log.level: info``): the origin's own account
    of what it served. A recording proxy cannot stand in front of an origin that a pull-through
    mirror reads, since Distribution's proxy wants a Content-Length the proxy's streamed replies lack."""

    def _config(self) -> str:
        return super()._config().replace("  level: error", "  level: info")

    def served(self, since: int = 0) -> tuple[int, int, int]:
        """``(blob bytes, blob requests, all requests)`` answered since log offset ``since``."""
        text = self.log_path.read_bytes()[since:].decode(errors="replace")
        blob_bytes = blob_requests = requests = 0
        for line in text.splitlines():
            if 'msg="response completed"' not in line:
                continue
            requests += 1
            uri = re.search(r'http\.request\.uri="([^"]*)"', line)
            written = re.search(r"http\.response\.written=(\d+)", line)
            if uri and "/blobs/" in uri.group(1) and "http.request.method=GET" in line:
                blob_requests += 1
                blob_bytes += int(written.group(1)) if written else 0
        return blob_bytes, blob_requests, requests

    def log_offset(self) -> int:
        return self.log_path.stat().st_size


def readers_figure(work: Path, readers: int) -> None:
    reg = RegistryServer(work / "origin", "noauth").start()
    try:
        push_fixture(reg.host)
        proxy = FaultProxy(reg.url).start()
        try:
            t0 = time.monotonic()
            if export(proxy.host, work / "c1", work / "one.raw").wait(300) != 0:
                raise SystemExit("the single reader failed")
            single, t1 = blob_bytes(proxy), time.monotonic() - t0
            proxy.clear()
            t0 = time.monotonic()
            procs = [export(proxy.host, work / "cN", work / f"r{k}.raw") for k in range(readers)]
            if any(p.wait(300) != 0 for p in procs):
                raise SystemExit("a concurrent reader failed")
            many, tn = blob_bytes(proxy), time.monotonic() - t0
        finally:
            proxy.stop()
    finally:
        reg.stop()
    print(f"1 cold reader:              {single:>10} blob bytes from the registry ({t1:.1f} s)")
    print(f"{readers} concurrent cold readers: {many:>10} blob bytes from the registry ({tn:.1f} s)")
    print(f"ratio: {many / single:.3f} (target <= 1.1)")


def export_via(origin: str, hosts: Path, cache: Path, out: Path) -> None:
    argv = [str(Path(sys.executable).with_name("obd")), "export", f"{origin}/{IMAGE}", "-o", str(out), "-q"]
    argv += ["--insecure-registry", origin, "--hosts-dir", str(hosts), "--cache-dir", str(cache)]
    env = {**os.environ, "OBD_REGISTRY_USER": "", "OBD_REGISTRY_PASSWORD": ""}
    done = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"obd export through the mirror failed: {done.stderr.decode()}")


def image_blobs() -> list[str]:
    """The config and layer digests of the fixture image the figures read."""
    index = json.loads((ACI / "index.json").read_text())
    tags = {
        d.get("annotations", {}).get("org.opencontainers.image.ref.name"): d["digest"]
        for d in index["manifests"]
    }
    manifest = json.loads((ACI / "blobs" / "sha256" / tags["amd64-converted"][7:]).read_text())
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def mirror_figure(work: Path) -> None:
    origin = LoggedRegistry(work / "m-origin", "noauth").start()
    mirror = None
    try:
        push_fixture(origin.host)
        mirror = RegistryServer(work / "mirror", "noauth", proxy_remote=origin.url).start()
        hosts = work / "certs.d"
        (hosts / origin.host).mkdir(parents=True)
        (hosts / origin.host / "hosts.toml").write_text(
            f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        start = origin.log_offset()
        export_via(origin.host, hosts, work / "m-cold", work / "m-cold.raw")
        cold = origin.served(start)
        wait_stored(mirror, image_blobs())  # Distribution stores what it proxied in the background
        start = origin.log_offset()
        export_via(origin.host, hosts, work / "m-warm", work / "m-warm.raw")  # a fresh host cache
        warm = origin.served(start)
        origin.stop()
        export_via(origin.host, hosts, work / "m-gone", work / "m-gone.raw")
    finally:
        origin.stop()
        if mirror is not None:
            mirror.stop()
    for label, (nbytes, blobs, requests) in (("cold", cold), ("warm", warm)):
        print(
            f"{label} pull-through mirror, cold host cache: {nbytes:>8} blob bytes from the origin "
            f"({blobs} blob GETs, {requests} requests in all)"
        )
    print("origin stopped, warm mirror, cold host cache: the export succeeded")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readers", type=int, default=16, help="concurrent cold readers (default 16)")
    ap.add_argument("--part", choices=("readers", "mirror", "all"), default="all", help="which figure")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        if args.part in ("readers", "all"):
            readers_figure(Path(tmp), args.readers)
        if args.part in ("mirror", "all"):
            mirror_figure(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
