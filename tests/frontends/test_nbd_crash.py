"""Crash test: kill -9 of the nbd server at random moments while a client writes and flushes.

A libnbd client writes runs of 4 KiB blocks at random places, with a flush every ``FLUSH_EVERY``
writes, while another thread kills nbdkit with SIGKILL after a random delay. Every block written
carries its write's sequence number and block number, repeated, so a read tells which write it
holds and whether it is whole. After each kill the server is restarted over the same upper
directory (the RW layer must reopen) and every block is checked:

* it holds a write acknowledged at or after the last *completed flush* that covered it (the
  durability promise), whole;
* more strictly — a process kill, unlike a power cut, keeps the page cache — it holds exactly the
  last acknowledged write, or the write that was in flight when the server died.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
import time

import pytest
from test_nbd_launch import NbdServer, layer_params, libnbd

from fixtures import stack

BASE = stack("L0L1L2/lz4")
BLOCK = 4096
REGION_BLOCKS = 2048  # the first 8 MiB of the device: dense enough for overwrites
FLUSH_EVERY = 16
ROUNDS = 20
DEADLINE_S = 240


def block_bytes(seq: int, block: int) -> bytes:
    return struct.pack("<QQ", seq, block) * (BLOCK // 16)


def write_bytes(seq: int, first: int, count: int) -> bytes:
    return b"".join(block_bytes(seq, b) for b in range(first, first + count))


def decode(data: bytes, block: int, base: bytes) -> int:
    """Which write a block holds: its sequence number, 0 for the base image's bytes, -1 if torn."""
    if data == base:
        return 0
    seq, b = struct.unpack_from("<QQ", data)
    return seq if b == block and data == block_bytes(seq, block) else -1


@pytest.mark.parametrize("flavour", ["append", "sparse"])
def test_kill_9_at_random_moments_loses_no_acknowledged_write(tmp_path, flavour):
    nbd = libnbd()
    rng = random.Random(f"crash-{flavour}")
    params = [*layer_params(BASE), f"upper={tmp_path / 'up'}"] + (
        ["sparse=true"] if flavour == "sparse" else []
    )
    srv = NbdServer(tmp_path, params).start()
    h = srv.connect()
    raw = h.pread(REGION_BLOCKS * BLOCK, 0)
    base = [raw[i * BLOCK : (i + 1) * BLOCK] for i in range(REGION_BLOCKS)]
    acked = [0] * REGION_BLOCKS  # last acknowledged write per block
    flushed = [0] * REGION_BLOCKS  # what the last completed flush made durable
    seq = 0
    started = time.monotonic()
    stats = {"writes": 0, "flushes": 0, "inflight_landed": 0}
    for rnd in range(ROUNDS):
        assert time.monotonic() - started < DEADLINE_S, f"only {rnd} rounds in {DEADLINE_S} s"
        pid = srv.proc.pid
        delay = rng.uniform(0.02, 0.4)
        killer = threading.Timer(delay, os.kill, (pid, signal.SIGKILL))
        killer.start()
        inflight: tuple[int, int, int] | None = None
        try:
            since_flush = 0
            while True:
                seq += 1
                count = rng.choice((1, 1, 2, 4, 16))
                first = rng.randrange(0, REGION_BLOCKS - count)
                inflight = (seq, first, count)
                h.pwrite(write_bytes(seq, first, count), first * BLOCK)
                inflight = None
                acked[first : first + count] = [seq] * count
                stats["writes"] += 1
                since_flush += 1
                if since_flush == FLUSH_EVERY:
                    inflight = None
                    h.flush()
                    flushed = list(acked)
                    stats["flushes"] += 1
                    since_flush = 0
        except nbd.Error:
            pass  # the server died under us
        killer.join()
        srv.kill()
        srv.start()  # the RW layer reopens (get_ready opens it: a failure stops nbdkit)
        h = srv.connect()
        raw = h.pread(REGION_BLOCKS * BLOCK, 0)
        for b in range(REGION_BLOCKS):
            got = decode(raw[b * BLOCK : (b + 1) * BLOCK], b, base[b])
            assert got >= 0, f"round {rnd}: block {b} is torn"
            assert got >= flushed[b], f"round {rnd}: block {b} lost flushed write {flushed[b]} (has {got})"
            allowed = {acked[b]}
            if inflight is not None and inflight[1] <= b < inflight[1] + inflight[2]:
                allowed.add(inflight[0])
            assert got in allowed, f"round {rnd}: block {b} holds write {got}, expected one of {allowed}"
            if got != acked[b]:
                stats["inflight_landed"] += 1
                acked[b] = got
    srv.stop()
    print(f"{flavour}: {ROUNDS} kills, {stats}")
    assert stats["writes"] > ROUNDS and stats["flushes"] > 0, stats
