"""``obd run --rw DIR`` state across a killed QEMU: what the guest synced is there on the next run.

A busybox layer (local file) is run with ``obd run --accel tcg --rw DIR``. Each round's guest first
prints the sha256 of every file the earlier rounds synced, then writes 96 KiB of random bytes to
``/data/rK``, syncs, prints its sha256 and ``@synced``, and goes on writing (unsynced) until the
host, on seeing ``@synced``, kills QEMU with SIGKILL. The next round is the next ``obd run`` over
the same DIR. One trial per round after the first (and a last run that only reads): it is

    correct      every file synced before a kill reads back with the digest the guest printed
    wrong bytes  one is missing or different
    clear error  ``obd run`` refused the DIR with an obd error (exit 125 and a message)
    hang         a run did not end within its timeout (the killed one included)
    crash        anything else (no ``@synced``, an unexpected exit, a traceback)

``--quick`` is one round (two runs); the full run has :data:`FULL_ROUNDS`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from faults.tally import Clock, Tally
from fixtures import require_tool
from frontends.run.images import build_layer, busybox_rootfs

OBD = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "obd")
FULL_ROUNDS = 12
RUN_TIMEOUT = 180.0


def qemu_children(pid: int) -> list[int]:
    """The QEMU processes among ``pid``'s descendants."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/comm") as f:
                    if f.read().startswith("qemu-system"):
                        found.append(k)
            except OSError:
                pass
        todo += kids
    return found


def guest_script(k: int | None) -> str:
    """Print the digests of every ``/data/r*``; then, for round ``k``, write, sync and keep writing."""
    check = "for f in /data/r*; do [ -f $f ] && sha256sum $f; done; echo @checked; "
    if k is None:
        return check
    return (
        check + f"head -c 98304 /dev/urandom > /data/r{k}; sync; sha256sum /data/r{k}; echo @synced; "
        "i=0; while true; do head -c 65536 /dev/urandom > /data/unsynced$i; i=$((i+1)); done"
    )


class Run:
    """One ``obd run`` whose output is read as it comes; ``kill_qemu_on`` kills its QEMU on a line."""

    def __init__(self, argv: list[str], kill_qemu_on: str | None):
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.out = bytearray()
        self.killed = False
        self.kill_on = kill_qemu_on.encode() if kill_qemu_on else None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out += line
            if self.kill_on and not self.killed and line.strip() == self.kill_on:
                for q in qemu_children(self.proc.pid):
                    os.kill(q, signal.SIGKILL)
                    self.killed = True

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None (after killing the whole run) when it took longer than ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for q in qemu_children(self.proc.pid):
                os.kill(q, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(30)
            return None
        self.reader.join(10)
        return code

    def text(self) -> str:
        return self.out.decode(errors="replace")


def digests(text: str) -> dict[str, str]:
    return {m.group(2): m.group(1) for m in re.finditer(r"^([0-9a-f]{64})\s+/data/(r\d+)$", text, re.M)}


def run(rounds: int, seconds: float) -> Tally:
    require_tool("qemu-system-x86_64")
    require_tool("nbdkit")
    require_tool("busybox")
    require_tool("mke2fs")
    clock = Clock(seconds)
    t = Tally("obd run --rw state after kill -9 QEMU")
    with tempfile.TemporaryDirectory(prefix="obd-vmrw-") as tmp:
        work = Path(tmp)
        root = busybox_rootfs(work / "root")
        os.makedirs(root / "data", exist_ok=True)
        layer = build_layer(root, work / "layer.commit", size=64 << 20)
        state = work / "state"
        synced: dict[str, str] = {}  # file → the digest its guest printed after sync
        base = [OBD, "run", "-q", "--accel", "tcg", str(layer), "--rw", str(state), "--"]
        for k in [*range(rounds), None]:
            if k is not None and clock.left() <= 0:
                t.notes.append(f"stopped by the time budget after {k} rounds")
                k = None
            label = f"round {k}" if k is not None else "final read"
            r = Run([*base, "sh", "-c", guest_script(k)], "@synced" if k is not None else None)
            code = r.wait(RUN_TIMEOUT)
            out = r.text()
            if code is None:
                t.add("hang", f"{label}: obd run did not end in {RUN_TIMEOUT:.0f} s")
                break
            if synced or k is None:  # a trial: the rounds before this one are to be read back
                if "@checked" not in out:
                    kind = "clear error" if code == 125 and "Traceback" not in out else "crash"
                    t.add(kind, f"{label}: exit {code}: {out[-300:]}")
                    break
                got = digests(out.split("@checked", 1)[0])
                bad = [f for f, d in synced.items() if got.get(f) != d]
                t.add("wrong bytes" if bad else "correct", f"{label}: synced files lost or changed: {bad}")
            if k is None:
                break
            m = re.search(rf"^([0-9a-f]{{64}})\s+/data/r{k}$\n@synced$", out, re.M)
            if not m or not r.killed or code != 125 or "Traceback" in out:  # 125: obd's "VM stopped"
                t.add("crash", f"{label}: no @synced, QEMU not killed or no clean exit {code}: {out[-300:]}")
                break
            synced[f"r{k}"] = m.group(1)
        t.notes.append(f"{len(synced)} kills of QEMU; each next run read back every file synced before them")
    return t
