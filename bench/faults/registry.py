"""Registry faults while exporting a converted image: the export writes the right image or stops
with a clear error — never a different image, never a hang.

Debian's docker-registry holds the aci-hello-world image converted by accelerated-container-image
(fixtures/aci-hello-world, tag ``amd64-converted``); :class:`registry_server.FaultProxy` on
127.0.0.1 sits in front of it. Each trial queues one fault kind on the blob range GETs (or on
manifest GETs), either *transient* (the next 1–3 matching requests, after a random number of
good ones) or *persistent* (every matching request), then exports the image lazily through
obd's registry client — the same ``image_config`` → ``open_config`` → ``export_stack`` path as
``obd export REF -o OUT`` — and compares the written image with the fault-free export. The
client gets short timeouts (0.5 s read, 5 s per request) so that a stall past the timeout costs
seconds, not minutes; the retry logic is the production one. Trials read with 256 KiB of
readahead (as ``obd run --readahead 256K``: a few large ranges); in the full run every fourth
reads with none, as ``obd export --readahead 0`` does (one range GET per ZFile span, ~530 for this
640 KB layer, 6 s through the proxy).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from registry_server import FaultProxy, RegistryServer, is_range_get

from faults.fuzz import read_lsmt, read_source
from faults.tally import Clock, Tally
from fixtures import FIXTURES, materialize
from obd.image.local import open_config
from obd.image.remote import RemoteOptions
from obd.image.resolve import image_config
from obd.io.source import BytesSource, Source, data_extents
from obd.layer.export import export_stack
from obd.observability.stats import Stats
from obd.registry import AsyncRunner, RegistryClient, RemoteBlob
from obd.registry.push import push_layout
from obd.verify import DigestTable, VerifiedSource, build_table

ACI = FIXTURES / "aci-hello-world"
TAG = "amd64-converted"
ATTEMPTS = 4
PLAIN = "overlaybd/lsmt/commit/L1.commit"

#: (name, FaultProxy kind, extra Fault arguments, which requests it hits)
FAULTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("5xx 500", "status", {"status": 500}, "range"),
    ("5xx 503", "status", {"status": 503}, "range"),
    ("429 Retry-After 0", "status", {"status": 429, "headers": {"Retry-After": "0"}}, "range"),
    ("drop mid-body", "drop", {}, "range"),
    ("stall past timeout", "stall", {"seconds": 1.5}, "range"),
    ("stall mid-body", "stall_body", {"seconds": 1.5}, "range"),
    ("truncated body", "truncate", {}, "range"),
    ("shifted range", "shifted_range", {}, "range"),
    ("wrong Content-Range", "lying_range", {}, "range"),
    ("malformed Content-Range", "bad_range_header", {}, "range"),
    ("200 full body to Range", "full200", {}, "range"),
    ("flipped bits", "corrupt", {}, "range"),
    ("manifest 503", "status", {"status": 503}, "manifest"),
    ("manifest flipped bits", "corrupt", {}, "manifest"),
]


def is_manifest_get(request: Any) -> bool:
    return request.method == "GET" and "/manifests/" in request.path


def image_digest(path: str) -> str:
    """Digest of a sparse raw image: its size and the bytes of every data extent (holes are zeros)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(str(size).encode())
        for offset, length in data_extents(fd, size):
            pos = offset
            while pos < offset + length:
                chunk = os.pread(fd, min(4 << 20, offset + length - pos), pos)
                h.update(chunk.rstrip(b"\0") and chunk)  # all-zero data reads the same as a hole
                pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


class Exporter:
    """Exports the image through the proxy with a fresh client per trial (no state carried over)."""

    def __init__(self, proxy: FaultProxy, workdir: Path, no_readahead_every: int):
        self.ref = f"{proxy.host}/aci/hello:{TAG}"
        self.workdir = workdir
        self.no_readahead_every = no_readahead_every
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        out = str(self.workdir / f"export-{self.n}.img")
        every = self.no_readahead_every
        readahead = 0 if every and self.n % every == 0 else 256 << 10
        opts = RemoteOptions(insecure=True, no_cache=True, stats=Stats(), readahead=readahead)
        # the production client with short timeouts: the RemoteOptions' own client has fixed ones
        opts._clients[True] = RegistryClient(
            insecure=True,
            attempts=ATTEMPTS,
            connect_timeout=2.0,
            read_timeout=0.5,
            request_timeout=5.0,
            backoff=0.01,
            max_backoff=0.05,
            stats=opts.stats,
        )
        try:
            stack = open_config(image_config([self.ref], remote=opts), readonly=True, remote=opts)
            try:
                export_stack(stack, out)
            finally:
                stack.close()
            return image_digest(out)
        finally:
            opts.close()
            if os.path.exists(out):
                os.unlink(out)


def matcher(which: str, skip: int) -> Callable[[Any], bool]:
    """Matches the requests of ``which`` kind, after letting ``skip`` of them through untouched."""
    base = is_range_get if which == "range" else is_manifest_get
    seen = [0]

    def match(request: Any) -> bool:
        if not base(request):
            return False
        seen[0] += 1
        return seen[0] > skip

    return match


def run(passes: int, seconds: float, *, quick: bool, seed: int = 13) -> Tally:
    clock = Clock(seconds)
    rng = random.Random(seed)
    t = Tally("registry faults → export")
    with tempfile.TemporaryDirectory(prefix="obd-regfaults-") as tmp:
        work = Path(tmp)
        reg = RegistryServer(work / "registry", "noauth").start()
        runner = AsyncRunner("reliability-push")
        try:
            client = RegistryClient(insecure=True, stats=Stats())
            runner.run(push_layout(client, f"oci:{ACI}:{TAG}", f"{reg.host}/aci/hello"), 120)
            runner.run(client.aclose(), 10)
            proxy = FaultProxy(reg.url).start()
            try:
                export = Exporter(proxy, work, 0 if quick else 4)
                want = export()
                for p in range(passes):
                    for name, kind, kw, which in FAULTS:
                        for mode in ("transient", "persistent"):
                            if clock.left() <= 0:
                                t.notes.append(f"stopped by the time budget in pass {p + 1}")
                                return t
                            proxy.clear()
                            times = rng.randint(1, ATTEMPTS - 1) if mode == "transient" else None
                            skip = 0 if p == 0 else rng.randrange(0, 6)
                            proxy.add(kind, times=times, match=matcher(which, skip), **kw)
                            outcome = t.trial(export, want, timeout=90, label=f"{name} ({mode})")
                            if mode == "transient" and outcome == "clear error" and proxy.injected:
                                t.notes.append(
                                    f"{name} (transient x{times}): an error where a retry should do"
                                )
                proxy.clear()
            finally:
                proxy.stop()
        finally:
            runner.close()
            reg.stop()
    return t


def verified(blob: RemoteBlob, client: RegistryClient, runner: AsyncRunner, table: DigestTable) -> Source:
    """``blob`` read as obd reads a layer with a digest table: every block checked, a bad one refetched
    once from the origin (here the proxy again: it is the only registry there is)."""

    def origin(offset: int, length: int) -> bytes:
        return bytes(runner.run(client.read_range(blob.ref, blob.digest, offset, length, size=blob.size), 60))

    return VerifiedSource(blob, table, digest=blob.digest, stats=Stats(), origin=origin)


def run_plain(passes: int, seconds: float, seed: int = 13) -> Tally:
    """Flipped bits in the ranges of an *uncompressed* overlaybd layer (plain LSMT, no ZFile CRCs)
    read lazily: the blob's digest cannot check a range read, so the layer is read as obd reads any
    layer it has a digest table for (``obd index`` builds one for every image): block by block
    against the table, a bad block refetched from the origin once, else a clear error."""
    clock = Clock(seconds)
    rng = random.Random(seed)
    t = Tally("registry flipped bits → plain layer")
    raw = materialize(PLAIN).read_bytes()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    want = read_lsmt(raw)
    table = DigestTable(build_table(BytesSource(raw).readinto, len(raw))[0])  # what `obd index` keeps
    with tempfile.TemporaryDirectory(prefix="obd-regplain-") as tmp:
        reg = RegistryServer(Path(tmp) / "registry", "noauth").start()
        runner = AsyncRunner("reliability-plain")
        try:
            client = RegistryClient(insecure=True, stats=Stats())
            runner.run(client.put_blob(f"{reg.host}/plain/layer", digest, raw), 60)
            runner.run(client.aclose(), 10)
            proxy = FaultProxy(reg.url).start()
            try:
                for p in range(passes):
                    for mode in ("transient", "persistent"):
                        if clock.left() <= 0:
                            t.notes.append(f"stopped by the time budget in pass {p + 1}")
                            return t
                        proxy.clear()
                        times = rng.randint(1, ATTEMPTS - 1) if mode == "transient" else None
                        proxy.add("corrupt", times=times, match=matcher("range", rng.randrange(0, 16)))
                        c = RegistryClient(insecure=True, attempts=ATTEMPTS, backoff=0.01, stats=Stats())

                        def read(c: RegistryClient = c) -> str:
                            blob = RemoteBlob(c, runner, f"{proxy.host}/plain/layer", digest, size=len(raw))
                            return read_source(verified(blob, c, runner, table))

                        try:
                            t.trial(read, want, timeout=60, label=f"{PLAIN} flipped bits ({mode})")
                        finally:
                            runner.run(c.aclose(), 10)
            finally:
                proxy.stop()
        finally:
            runner.close()
            reg.stop()
    return t
