"""kill -9 of nbdkit during writes: after a restart every flushed write is there, whole.

The harness of tests/frontends/test_nbd_crash.py, counted: a real ``nbdkit python
frontends/nbd/plugin.py`` serves the L0L1L2/lz4 fixture stack with an RW upper (append and sparse
flavours, alternating), a libnbd client writes runs of 4 KiB blocks (each block carries its write's
sequence number and block number) with a flush every 16 writes, and a timer sends SIGKILL after
a random 20–400 ms. Then the server restarts over the same upper directory and the first 8 MiB
are read back. A round is *correct* when every block holds the last acknowledged write (or the
one in flight at the kill) and nothing older than the last completed flush; *wrong bytes* when a
block is torn or lost a flushed write; *crash* when the server does not come back.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from test_nbd_crash import BASE, BLOCK, FLUSH_EVERY, REGION_BLOCKS, decode, write_bytes
from test_nbd_launch import NbdServer, layer_params, libnbd

from faults.tally import Clock, Tally, Watchdog, watchdog


class Flavour:
    """One server over its own upper directory, and what the client knows was written."""

    def __init__(self, tmp: Path, name: str):
        params = [*layer_params(BASE), f"upper={tmp / name}"] + (["sparse=true"] if name == "sparse" else [])
        self.name = name
        self.srv = NbdServer(tmp, params, name=name).start()
        self.h = self.srv.connect()
        raw = self.h.pread(REGION_BLOCKS * BLOCK, 0)
        self.base = [raw[i * BLOCK : (i + 1) * BLOCK] for i in range(REGION_BLOCKS)]
        self.acked = [0] * REGION_BLOCKS
        self.flushed = [0] * REGION_BLOCKS
        self.writes = self.flushes = 0

    def round(self, rng: random.Random, seq: list[int]) -> str:
        """Write until killed, restart, check; '' if every block is right, else what is wrong."""
        nbd = libnbd()
        assert self.srv.proc is not None
        killer = threading.Timer(rng.uniform(0.02, 0.4), os.kill, (self.srv.proc.pid, signal.SIGKILL))
        killer.start()
        inflight: tuple[int, int, int] | None = None
        try:
            since_flush = 0
            while True:
                seq[0] += 1
                count = rng.choice((1, 1, 2, 4, 16))
                first = rng.randrange(0, REGION_BLOCKS - count)
                inflight = (seq[0], first, count)
                self.h.pwrite(write_bytes(seq[0], first, count), first * BLOCK)
                inflight = None
                self.acked[first : first + count] = [seq[0]] * count
                self.writes += 1
                since_flush += 1
                if since_flush == FLUSH_EVERY:
                    self.h.flush()
                    self.flushed = list(self.acked)
                    self.flushes += 1
                    since_flush = 0
        except nbd.Error:
            pass  # the server died under us
        finally:
            killer.join()
        self.srv.kill()
        self.srv.start()
        self.h = self.srv.connect()
        raw = self.h.pread(REGION_BLOCKS * BLOCK, 0)
        for b in range(REGION_BLOCKS):
            got = decode(raw[b * BLOCK : (b + 1) * BLOCK], b, self.base[b])
            allowed = {self.acked[b]}
            if inflight is not None and inflight[1] <= b < inflight[1] + inflight[2]:
                allowed.add(inflight[0])
            if got < 0:
                return f"block {b} is torn"
            if got < self.flushed[b]:
                return f"block {b} lost flushed write {self.flushed[b]} (holds {got})"
            if got not in allowed:
                return f"block {b} holds write {got}, expected one of {sorted(allowed)}"
            self.acked[b] = got
        return ""

    def stop(self) -> None:
        self.srv.stop()


def run(rounds: int, seconds: float, seed: int = 13) -> Tally:
    clock = Clock(seconds)
    rng = random.Random(seed)
    t = Tally("kill -9 nbdkit during writes")
    seq = [0]
    with tempfile.TemporaryDirectory(prefix="obd-nbdkill-") as tmp:
        flavours: dict[str, Any] = {}
        try:
            for name in ("append", "sparse"):
                try:
                    flavours[name] = Flavour(Path(tmp), name)
                except BaseException as e:  # the harness's pytest.fail is a BaseException
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    t.add("crash", f"{name}: nbdkit did not start: {str(e).strip()[-300:]}")
                    return t
            for r in range(rounds):
                if clock.left() <= 0:
                    t.notes.append(f"stopped by the time budget after {r} rounds")
                    break
                f = flavours["append" if r % 2 == 0 else "sparse"]
                label = f"round {r} ({f.name})"
                try:
                    with watchdog(120):
                        bad = f.round(rng, seq)
                except Watchdog:
                    t.add("hang", label)
                    break
                except BaseException as e:  # the harness's pytest.fail is a BaseException
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    t.add("crash", f"{label}: {type(e).__name__}: {str(e)[:300]}")
                    break
                t.add("wrong bytes" if bad else "correct", f"{label}: {bad}")
            writes = sum(f.writes for f in flavours.values())
            flushes = sum(f.flushes for f in flavours.values())
            t.notes.append(
                f"{writes} acknowledged writes, {flushes} completed flushes checked after the kills"
            )
        finally:
            for f in flavours.values():
                f.stop()
    return t
