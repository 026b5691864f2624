"""One block cache per host: many real ``obd export`` processes reading one image from a real registry.

Debian's ``docker-registry`` holds the image; a recording proxy in front of it (:class:`FaultProxy`,
no faults queued) shows every ranged GET, so the bytes the registry served are counted from what
it was asked, not from obd's own counters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from registry_server import FaultProxy, RegistryServer

from fixtures import FIXTURES
from obd.cache import CacheStore
from obd.cache.store import page_crcs
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient
from obd.registry.push import push_layout

pytestmark = pytest.mark.timeout(600)

ACI = FIXTURES / "aci-hello-world"
READERS = 16


def blob_bytes(proxy: FaultProxy) -> int:
    """Bytes of blob ranges the registry was asked for (every blob read of obd is a Range GET)."""
    total = 0
    for method, path, rng, _ in proxy.seen:
        if method == "GET" and "/blobs/" in path and rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
            assert m, rng
            total += int(m.group(2)) - int(m.group(1)) + 1
    return total


def sparse_digest(path: Path) -> str:
    """A digest of a sparse file's data extents and where they lie (its holes are not read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, pos, os.SEEK_HOLE)
            h.update(f"{pos}:{stop}:".encode())
            h.update(os.pread(fd, stop - pos, pos))
            pos = stop
    h.update(str(end).encode())
    return h.hexdigest()


def export(
    host: str, cache: Path, out: Path, image: str = "aci/hello:amd64-converted"
) -> subprocess.Popen[bytes]:
    argv = [
        str(Path(sys.executable).with_name("obd")),
        "export",
        f"{host}/{image}",
        "-o",
        str(out),
    ]
    argv += ["--insecure-registry", host, "--cache-dir", str(cache), "-q"]
    env = {**os.environ, "OBD_REGISTRY_USER": "", "OBD_REGISTRY_PASSWORD": ""}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The registry with the ACI fixture as ``aci/hello``, behind a recording proxy."""
    reg = RegistryServer(tmp_path_factory.mktemp("origin"), "noauth").start()
    runner = AsyncRunner("test-cache-shared")
    c = RegistryClient(credentials=CredentialResolver(env={}, use_docker_config=False), insecure=True)
    runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
    runner.run(c.aclose(), 10)
    runner.close()
    proxy = FaultProxy(reg.url).start()
    yield proxy
    proxy.stop()
    reg.stop()


def test_sixteen_cold_readers_fetch_each_block_once(served, tmp_path):
    one = export(served.host, tmp_path / "cache1", tmp_path / "one.raw")
    assert one.wait(300) == 0, one.stderr.read().decode() if one.stderr else ""
    single = blob_bytes(served)
    assert single > 0
    served.clear()
    procs = [export(served.host, tmp_path / "cache16", tmp_path / f"r{k}.raw") for k in range(READERS)]
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read().decode() if p.stderr else ""
    many = blob_bytes(served)
    want = sparse_digest(tmp_path / "one.raw")
    for k in range(READERS):
        assert sparse_digest(tmp_path / f"r{k}.raw") == want
    print(f"blob bytes from the registry: 1 reader {single}, {READERS} readers {many} ({many / single:.3f}x)")
    assert many <= 1.1 * single


def test_reader_killed_mid_fetch_frees_its_claim(served, tmp_path):
    """A reader killed with SIGKILL while it holds a claim (its GET stalled) delays nobody for good:
    the kernel drops its locks, and the readers waiting on them fetch the pages and read right."""
    good = export(served.host, tmp_path / "ref-cache", tmp_path / "ref.raw")
    assert good.wait(300) == 0
    want = sparse_digest(tmp_path / "ref.raw")
    served.clear()
    cache = tmp_path / "cache"
    served.add("stall", times=None, seconds=60)  # every ranged GET hangs: the victim stalls holding claims
    victim = export(served.host, cache, tmp_path / "victim.raw")
    deadline = time.monotonic() + 60
    while not any(rng for _, _, rng, _ in served.seen):
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    served.clear()  # later GETs go through
    others = [export(served.host, cache, tmp_path / f"o{k}.raw") for k in range(3)]
    time.sleep(1.0)  # let them find the victim's claims and wait on them
    victim.kill()
    victim.wait(30)
    for p in others:
        assert p.wait(300) == 0, p.stderr.read().decode() if p.stderr else ""
    late = export(served.host, cache, tmp_path / "late.raw")
    assert late.wait(300) == 0
    for name in ("o0", "o1", "o2", "late"):
        assert sparse_digest(tmp_path / f"{name}.raw") == want


def test_eviction_takes_idle_blobs_before_open_ones(tmp_path):
    """A blob some process has open (here: this one) is evicted only after every idle one."""
    store = CacheStore(tmp_path / "c", limit_bytes=1 << 30)
    digests = ["sha256:" + f"{k}" * 64 for k in (1, 2)]
    for d in digests:
        blob = store.open_blob(d, 1 << 20)
        data = memoryview(os.urandom(1 << 20))
        blob.write_data(data, 0)
        blob.mark_present(0, np.array(page_crcs(data, store.page_size), dtype=np.uint32))
        blob.close()
    os.utime(store.paths(digests[1])[1], (1, 1))  # the second one is least recently used...
    held = store.open_blob(digests[1], 1 << 20)  # ...but open
    os.utime(store.paths(digests[1])[1], (1, 1))
    evicted = store.prune(store.usage() - 1)
    assert [e.digest for e in evicted] == [digests[0]]
    assert held.present_bytes() == 1 << 20
    held.close()
    assert [e.digest for e in store.prune(0)] == [digests[1]]


def second_image(tmp: Path) -> Path:
    """An OCI layout of another image (its own manifest, tag ``v2``) with the ACI image's layer blob."""
    root = tmp / "second"
    shutil.copytree(ACI, root)
    index = json.loads((root / "index.json").read_text())
    first = next(
        d
        for d in index["manifests"]
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "amd64-converted"
    )
    manifest = json.loads((root / "blobs" / "sha256" / first["digest"].partition(":")[2]).read_bytes())
    manifest["annotations"] = {"org.opencontainers.image.title": "second image, same layer"}
    raw = json.dumps(manifest).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(raw)
    desc = {**first, "digest": f"sha256:{digest}", "size": len(raw)}
    desc["annotations"] = {"org.opencontainers.image.ref.name": "v2"}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return root


def test_images_sharing_a_layer_fetch_it_once(served, tmp_path):
    """Dedup by blob digest across images: two images in different repositories, with different
    manifests and one layer blob, read at once through one cold host cache, fetch that layer once;
    a third read of either fetches nothing."""
    runner = AsyncRunner("test-cache-dedup")
    c = RegistryClient(credentials=CredentialResolver(env={}, use_docker_config=False), insecure=True)
    runner.run(push_layout(c, f"oci:{second_image(tmp_path)}:v2", f"{served.host}/other/app"), 60)
    runner.run(c.aclose(), 10)
    runner.close()
    layer = 642560  # the one layer blob both manifests list
    served.clear()
    cache = tmp_path / "cache"
    procs = [
        export(served.host, cache, tmp_path / "a.raw"),
        export(served.host, cache, tmp_path / "b.raw", "other/app:v2"),
    ]
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read().decode() if p.stderr else ""
    repos = {path.split("/blobs/")[0] for _, path, rng, _ in served.seen if rng and "/blobs/" in path}
    both = blob_bytes(served)
    assert sparse_digest(tmp_path / "a.raw") == sparse_digest(tmp_path / "b.raw")
    served.clear()
    late = export(served.host, cache, tmp_path / "c.raw", "other/app:v2")
    assert late.wait(300) == 0, late.stderr.read().decode() if late.stderr else ""
    again = blob_bytes(served)
    print(
        f"layer {layer} bytes; two images at once fetched {both} from {sorted(repos)}; a third read {again}"
    )
    assert layer <= both <= 1.1 * layer
    assert again == 0
