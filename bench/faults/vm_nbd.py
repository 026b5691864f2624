"""Registry faults while a VM reads through ``obd nbd``: the guest reads the right bytes or gets EIO
while obd logs a typed error — never other bytes, never a hang.

A busybox root with :data:`FILES` files of random bytes (incompressible: one ZFile block per 32 KiB)
is made into one overlaybd layer and pushed to Debian's docker-registry on 127.0.0.1, behind
:class:`registry_server.FaultProxy`. ``obd nbd PROXY/IMAGE --no-cache --foreground`` serves it (the
production registry client: its retries and its 30 s read timeout) and a real QEMU under TCG boots
from the socket. The guest lists ``/data`` (so the inodes are read fault-free), then for each file
prints ``@ready NAME``, sleeps a second and runs ``sha256sum`` — last file first, so that no
readahead past the end of one file has fetched the next one before its fault is queued. The host
watches the console: on ``@ready`` it queues that file's fault on the blob range GETs, on
``@done`` it clears it. Per file (one trial), the outcome is:

    correct      sha256sum printed the digest computed here from the file's bytes
    clear error  the guest got an I/O error, and the server log has an obd error line for it
    wrong bytes  another digest
    hang         the boot's watchdog fired (the rest of its files count as hangs too)
    crash        an I/O error without an obd error, QEMU or obd nbd dying, anything else

``--quick`` is one boot with a fault on every file; the full run boots :data:`FULL_BOOTS` times,
each fault kind transient (1–3 requests) and persistent (every request). The stall past the read
timeout costs 30 s a request, so only the full run has it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from registry_server import FaultProxy, RegistryServer, is_range_get

from faults.tally import Clock, Tally
from fixtures import require_tool, vm_cache_dir
from frontends.run.images import build_layer, busybox_rootfs, push_image
from frontends.run.vm import NbdDisk, VMError, VMTimeoutError, boot, ensure_assets

OBD = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "obd")
FILES = 8
FILE_SIZE = 192 << 10
#: boots of the full run (each reads FILES files, one fault each)
FULL_BOOTS = 6

#: (name, FaultProxy kind, extra Fault arguments); all on the layer blob's range GETs
FAULTS: list[tuple[str, str, dict[str, Any]]] = [
    ("5xx 503", "status", {"status": 503}),
    ("drop mid-body", "drop", {}),
    ("truncated body", "truncate", {}),
    ("wrong Content-Range", "lying_range", {}),
    ("200 full body to Range", "full200", {}),
    ("flipped bits", "corrupt", {}),
    ("stall mid-body 1.5 s", "stall_body", {"seconds": 1.5}),
    ("5xx 500", "status", {"status": 500}),
]
#: only in the full run: a stall past the client's 30 s read timeout
STALL = ("stall past timeout", "stall", {"seconds": 31.0})
#: the quick boot: one fault per file, two of them persistent
QUICK = [(f, "persistent" if f[0] in ("drop mid-body", "flipped bits") else "transient") for f in FAULTS]

TYPED = re.compile(r"obd: pread: (?![A-Za-z_]\w*\()")  # fail() logs repr() only for untyped errors


class Image:
    """The layer's files, their digests, and the registry + proxy serving it."""

    def __init__(self, work: Path, seed: int):
        rng = random.Random(seed)
        self.files = {f"f{i}": rng.randbytes(FILE_SIZE) for i in range(FILES)}
        self.digests = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}
        root = busybox_rootfs(work / "root", files={f"data/{n}": d for n, d in self.files.items()})
        self.layer = build_layer(root, work / "layer.commit", size=64 << 20)
        self.registry = RegistryServer(work / "registry", "noauth").start()
        push_image([self.layer], f"{self.registry.host}/vm/reads:1", insecure=(self.registry.host,))
        self.proxy = FaultProxy(self.registry.url).start()
        self.ref = f"{self.proxy.host}/vm/reads:1"

    def close(self) -> None:
        self.proxy.stop()
        self.registry.stop()


@contextlib.contextmanager
def served(image: Image, work: Path, n: int) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """``obd nbd`` of the image through the proxy: (socket, log file, process)."""
    sock = work / f"nbd-{n}.sock"
    log_path = work / f"nbd-{n}.log"
    host = image.proxy.host
    cmd = [OBD, "nbd", image.ref, "--socket", str(sock), "--foreground", "--insecure-registry", host]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, "--no-cache"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"obd nbd did not listen: {log_path.read_text(errors='replace')[-800:]}")
            time.sleep(0.02)
        yield sock, log_path, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Console:
    """Turns the guest's ``@ready NAME`` / ``@done NAME`` lines into faults queued and cleared."""

    def __init__(self, proxy: FaultProxy, plan: dict[str, tuple[str, dict[str, Any], int | None]]):
        self.proxy = proxy
        self.plan = plan
        self.buf = b""
        self.fired: dict[str, int] = {}  # requests the fault hit, per file

    def __call__(self, chunk: bytes) -> None:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            word, _, name = raw.decode(errors="replace").strip().partition(" ")
            if word == "@ready" and name in self.plan:
                kind, kw, times = self.plan[name]
                self.proxy.clear()
                self.proxy.add(kind, times=times, match=is_range_get, **kw)
            elif word == "@done":
                self.fired[name] = len(self.proxy.injected)
                self.proxy.clear()


def guest_script(names: list[str]) -> str:
    steps = "".join(
        f"echo @ready {n}; sleep 1; sha256sum /data/{n} 2>&1 || echo @eio {n}; echo @done {n}; "
        for n in names
    )
    return f"ls -l /data > /dev/null; {steps}echo @end"


def judge(t: Tally, image: Image, output: str, log: str, labels: dict[str, str]) -> None:
    """Count one outcome per file from the guest's output and the server's log."""
    typed_errors = len(TYPED.findall(log))
    eio = [n for n in labels if re.search(rf"^@eio {n}$", output, re.M)]
    explained = typed_errors >= len(eio)  # every failed read logs at least one line
    for name, label in labels.items():
        digest = re.search(rf"^([0-9a-f]{{64}})\s+/data/{name}$", output, re.M)
        if digest:
            ok = digest.group(1) == image.digests[name]
            t.add("correct" if ok else "wrong bytes", label)
        elif name in eio:
            t.add("clear error" if explained else "crash", f"{label}: EIO without an obd error in the log")
        else:
            t.add("crash", f"{label}: no result in the guest output")


def one_boot(
    t: Tally, assets: Any, image: Image, work: Path, n: int, faults: list[tuple[tuple[str, str, dict], str]]
) -> None:
    """Boot once, one fault per file (``faults[i]`` on file ``f{i}``), and count every file."""
    rng = random.Random(n)
    names = list(image.files)[: len(faults)]
    plan: dict[str, tuple[str, dict[str, Any], int | None]] = {}
    labels: dict[str, str] = {}
    for name, ((label, kind, kw), mode) in zip(names, faults, strict=True):
        plan[name] = (kind, kw, rng.randint(1, 3) if mode == "transient" else None)
        labels[name] = f"{label} ({mode})"
    console = Console(image.proxy, plan)
    with served(image, work, n) as (sock, log_path, proc):
        try:
            res = boot(
                assets,
                NbdDisk(socket=str(sock)),
                ["sh", "-c", guest_script(names[::-1])],
                accel="tcg",
                timeout=60 + 150 * len(names),
                on_output=console,
            )
        except VMTimeoutError:
            for label in labels.values():
                t.add("hang", f"boot {n}: {label}")
            return
        except VMError as e:
            for label in labels.values():
                t.add("crash", f"boot {n}: {label}: {type(e).__name__}: {str(e)[:200]}")
            return
        finally:
            image.proxy.clear()
        if proc.poll() is not None:
            for label in labels.values():
                t.add("crash", f"boot {n}: obd nbd exited with {proc.returncode} ({label})")
            return
        judge(t, image, res.output.decode(errors="replace"), log_path.read_text(errors="replace"), labels)
    hit = sum(1 for name in names if console.fired.get(name))
    t.notes.append(f"boot {n}: the fault hit {hit} of {len(names)} files' reads")


def run(seconds: float, *, quick: bool, seed: int = 13) -> Tally:
    require_tool("qemu-system-x86_64")
    require_tool("nbdkit")
    require_tool("busybox")
    require_tool("mke2fs")
    clock = Clock(seconds)
    t = Tally("registry faults → VM via obd nbd")
    assets = ensure_assets(vm_cache_dir())
    with tempfile.TemporaryDirectory(prefix="obd-vmfaults-") as tmp:
        work = Path(tmp)
        image = Image(work, seed)
        try:
            if quick:
                one_boot(t, assets, image, work, 0, QUICK)
                t.notes.append(
                    "quick: one boot; the stall past the 30 s read timeout is in the full run only"
                )
                return t
            every = [(f, m) for f in [*FAULTS, STALL] for m in ("transient", "persistent")]
            for n in range(FULL_BOOTS):
                if clock.left() <= 0:
                    t.notes.append(f"stopped by the time budget after {n} boots")
                    break
                batch = [every[(n * FILES + i) % len(every)] for i in range(FILES)]
                one_boot(t, assets, image, work, n, batch)
        finally:
            image.close()
    return t
