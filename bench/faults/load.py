"""Load: 16 clients at once through one nbdkit serving an image, for a while; every read checked,
the server's memory watched.

A real ``nbdkit python frontends/nbd/plugin.py`` serves the L0L1L2/lz4 fixture stack read-only
(the frontend of ``obd nbd``); 16 threads, each with its own libnbd connection, read random
4 KiB–1 MiB ranges and compare them with the same ranges read from the stack in this process.
A trial is one read. The server's resident set size is sampled from the end of a warm-up (one read
by every client) to the end, so that growth under steady load shows in a note. A client
still inside a read when the time is up (plus 60 s) counts as a hang.

:func:`run_registry` is the same load through ``obd nbd REF`` of that stack pushed to Debian's
docker-registry on 127.0.0.1: lazy ranged GETs through the block cache, the RSS being the nbdkit's
that ``obd nbd --foreground`` becomes.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from registry_server import RegistryServer
from test_nbd_launch import NbdServer, layer_params, libnbd, wait_for_socket

from faults.tally import Tally
from fixtures import stack, stack_layers
from obd.image.local import open_layers

CLIENTS = 16
ENTRY = stack("L0L1L2/lz4")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


#: a served device: (the server's pid, a function returning a new libnbd connection)
Served = tuple[int, Callable[[], Any]]


@contextlib.contextmanager
def local_server(tmp: Path) -> Iterator[Served]:
    """nbdkit with the obd plugin serving the stack's local layer files."""
    srv = NbdServer(tmp, layer_params(ENTRY), readonly=True).start()
    assert srv.proc is not None
    try:
        yield srv.proc.pid, srv.connect
    finally:
        srv.disconnect_all()
        srv.stop()


@contextlib.contextmanager
def registry_server(tmp: Path) -> Iterator[Served]:
    """``obd nbd REF --foreground`` of the stack pushed to a local registry (it execs nbdkit)."""
    obd = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "obd")
    reg = RegistryServer(tmp / "registry", "noauth").start()
    try:
        ref = f"{reg.host}/load/l012:v1"
        layers = [str(p) for p in stack_layers(ENTRY)]
        push = [obd, "push", *layers, ref, "--insecure-registry", reg.host]
        subprocess.run(push, check=True, capture_output=True, timeout=120)
        sock = tmp / "nbd.sock"
        cmd = [obd, "nbd", ref, "--socket", str(sock), "--foreground", "--insecure-registry", reg.host]
        log_path = tmp / "nbd.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*cmd, "--cache-dir", str(tmp / "cache")], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        handles: list[Any] = []
        try:
            wait_for_socket(sock, 60, proc, lambda: log_path.read_text(errors="replace"))

            def connect() -> Any:
                h = libnbd().NBD()
                h.connect_uri(f"nbd+unix:///?socket={sock}")
                handles.append(h)
                return h

            yield proc.pid, connect
        finally:
            for h in handles:
                with contextlib.suppress(Exception):
                    h.shutdown()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    finally:
        reg.stop()


def run(seconds: float, seed: int = 13) -> Tally:
    """The load on a local stack through one nbdkit."""
    return load(f"load: {CLIENTS} clients, one nbdkit", local_server, seconds, seed)


def run_registry(seconds: float, seed: int = 13) -> Tally:
    """The load on a registry image through one ``obd nbd``."""
    return load(f"load: {CLIENTS} clients, obd nbd of a registry image", registry_server, seconds, seed)


def load(
    row: str, server: Callable[[Path], contextlib.AbstractContextManager[Served]], seconds: float, seed: int
) -> Tally:
    t = Tally(row)
    local = open_layers(stack_layers(ENTRY))
    size = local.size
    data = [e for e in local.extents() if e.kind == "data"]
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="obd-load-") as tmp, server(Path(tmp)) as (pid, connect):
        handles = [connect() for _ in range(CLIENTS)]
        warm = threading.Barrier(CLIENTS + 1)
        stop_at = time.monotonic() + 1e9
        busy = [False] * CLIENTS

        def client(k: int) -> None:
            rng = random.Random(seed * 100 + k)
            h = handles[k]
            first = True
            while time.monotonic() < stop_at:
                e = rng.choice(data)
                length = rng.choice([4096, 65536, 1 << 20])
                offset = min(size - length, e.offset + rng.randrange(0, max(1, e.length)) // 512 * 512)
                busy[k] = True
                try:
                    got = h.pread(length, offset)
                except Exception as err:  # libnbd raises nbd.Error: counted as a crash
                    with lock:
                        t.add("crash", f"client {k}: {type(err).__name__}: {err}")
                    return
                finally:
                    busy[k] = False
                with lock:
                    want = local.pread(offset, length)
                    t.add(
                        "correct" if got == want else "wrong bytes", f"client {k} read {length} at {offset}"
                    )
                if first:
                    first = False
                    warm.wait(120)

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
        for th in threads:
            th.start()
        warm.wait(120)
        started, rss0 = time.monotonic(), rss_kib(pid)
        stop_at = started + seconds
        samples = [rss0]
        while time.monotonic() < stop_at and any(th.is_alive() for th in threads):
            time.sleep(min(max(0.0, stop_at - time.monotonic()), max(1.0, seconds / 8)))
            samples.append(rss_kib(pid))
        for th in threads:
            th.join(max(0.0, stop_at - time.monotonic()) + 60)
        rss1 = rss_kib(pid)
        for k, th in enumerate(threads):
            if th.is_alive():
                t.add(
                    "hang", f"client {k} still in a read {60} s after the end" if busy[k] else f"client {k}"
                )
        t.seconds = time.monotonic() - started
        t.notes.append(
            f"{t.trials / max(t.seconds, 1e-9):.0f} reads/s; server RSS {rss0 // 1024} MiB after warm-up, "
            f"{rss1 // 1024} MiB after {t.seconds:.0f} s ({(rss1 - rss0) / 1024:+.1f} MiB); "
            f"samples (MiB): {' '.join(str(x // 1024) for x in samples)}"
        )
    local.close()
    return t
