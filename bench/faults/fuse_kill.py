"""kill -9 of the FUSE server during writes: after a remount every fsync'd write is there, whole.

``obd mount LAYERS --upper UP MNT --foreground`` (the L0L1L2/lz4 fixture stack, append-style RW
upper) serves ``MNT/disk.img``; this process writes runs of 4 KiB blocks into it (each block
carries its write's sequence number and block number, as in the nbdkit row) with ``fsync`` after
every 16 writes, and a timer sends SIGKILL to the server after a random 20–400 ms. The dead mount
is detached (``fusermount3 -u -z``), the server started again over the same upper, and the first
8 MiB read back. Unlike nbdkit's clients, a FUSE writer's unsynced writes may sit in the kernel's
page cache and die with the mount, so a block may hold the last fsync'd write or any later one
written to it — but never an older one, and never a torn block. *Wrong bytes* otherwise; *crash*
when the server does not come back.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from test_nbd_crash import BASE, BLOCK, FLUSH_EVERY, REGION_BLOCKS, decode, write_bytes

from faults.tally import Clock, Tally, Watchdog, watchdog
from fixtures import REPO, materialize, require_tool
from frontends.fuse import mount_entry


class FuseServer:
    def __init__(self, tmp: Path):
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.upper = tmp / "up"
        self.layers = [str(materialize(r)) for r in BASE["layers"]]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "obd", "mount", *self.layers, "--upper", str(self.upper), str(self.mnt),
             "--foreground"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        if not line.startswith("obd: serving "):
            raise RuntimeError(f"obd mount did not start: {line}{self.proc.stderr.read().decode()[-500:]}")

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(30)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None
        if mount_entry(self.mnt) is not None:
            subprocess.run([require_tool("fusermount3"), "-u", "-z", str(self.mnt)], capture_output=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def read_region(self) -> bytes:
        with open(self.mnt / "disk.img", "rb", buffering=0) as f:
            return f.read(REGION_BLOCKS * BLOCK)


def run(rounds: int, seconds: float, seed: int = 13) -> Tally:
    clock = Clock(seconds)
    rng = random.Random(seed)
    t = Tally("kill -9 FUSE server during writes")
    seq = 0
    writes = syncs = 0
    with tempfile.TemporaryDirectory(prefix="obd-fusekill-") as tmp:
        srv = FuseServer(Path(tmp))
        try:
            srv.start()
            raw = srv.read_region()
            base = [raw[i * BLOCK : (i + 1) * BLOCK] for i in range(REGION_BLOCKS)]
            synced = [0] * REGION_BLOCKS  # the write each block held at the last completed fsync
            for r in range(rounds):
                if clock.left() <= 0:
                    t.notes.append(f"stopped by the time budget after {r} rounds")
                    break
                assert srv.proc is not None
                since = [[] for _ in range(REGION_BLOCKS)]  # writes issued per block since that fsync
                pending = [0] * REGION_BLOCKS
                killer = threading.Timer(rng.uniform(0.02, 0.4), os.kill, (srv.proc.pid, signal.SIGKILL))
                killer.start()
                fd = os.open(srv.mnt / "disk.img", os.O_RDWR)
                try:
                    n = 0
                    while True:
                        seq += 1
                        count = rng.choice((1, 1, 2, 4, 16))
                        first = rng.randrange(0, REGION_BLOCKS - count)
                        for b in range(first, first + count):
                            since[b].append(seq)
                        os.pwrite(fd, write_bytes(seq, first, count), first * BLOCK)
                        pending[first : first + count] = [seq] * count
                        writes += 1
                        n += 1
                        if n % FLUSH_EVERY == 0:
                            os.fsync(fd)
                            synced = [p or s for p, s in zip(pending, synced, strict=True)]
                            pending = [0] * REGION_BLOCKS
                            since = [[] for _ in range(REGION_BLOCKS)]
                            syncs += 1
                except OSError:
                    pass  # the server died under us: ENOTCONN / EIO
                finally:
                    killer.join()
                    with contextlib.suppress(OSError):
                        os.close(fd)
                label = f"round {r}"
                try:
                    with watchdog(120):
                        srv.kill()
                        srv.start()
                        raw = srv.read_region()
                except Watchdog:
                    t.add("hang", label)
                    break
                except (OSError, RuntimeError) as e:
                    t.add("crash", f"{label}: {type(e).__name__}: {str(e)[:300]}")
                    break
                bad = ""
                for b in range(REGION_BLOCKS):
                    got = decode(raw[b * BLOCK : (b + 1) * BLOCK], b, base[b])
                    if got < 0:
                        bad = f"block {b} is torn"
                    elif got != synced[b] and got not in since[b]:
                        bad = f"block {b} holds write {got}: older than its fsync'd write {synced[b]}"
                    if bad:
                        break
                    synced[b] = got  # what survived is the new baseline
                t.add("wrong bytes" if bad else "correct", f"{label}: {bad}")
            t.notes.append(f"{writes} writes, {syncs} completed fsyncs checked after the kills")
        except RuntimeError as e:
            t.add("crash", str(e)[:300])
        finally:
            srv.stop()
    return t
