#!/usr/bin/env python3
"""The NBD frontend against its ceilings, in one run: nbdkit's C ``file`` plugin on the exported raw
image, a trivial Python RAM plugin (``bench/ram_plugin.py``: the Python ceiling), and obd's plugin
on an uncompressed stack and on an lz4 ZFile stack of the same bytes.

Builds SIZE MiB of data (alternating 64 KiB of random bytes and of repetitive text, so lz4 has
work and halves it), written through an RW layer and committed twice with obd's own tools
(plain, and ``-z`` lz4 4 KiB blocks), plus the same bytes as a raw image. Then, warm cache:

* sequential read of the whole device: ``nbdcopy --no-extents -C 4 URI null:``;
* 4 KiB random reads at QD1 and QD16: ``fio --ioengine=nbd`` (libnbd), RUNTIME s each;
* 4 KiB random writes at QD16 with a flush every 64 writes (``fio --fsync=64``): the ``file``
  plugin on a copy of the raw image vs obd with an append and a sparse upper over the plain stack.

The readers are served at once and measured round-robin (``--rounds``, medians kept), so that a
busy moment of a shared machine hits the ceilings and obd alike.

Beside throughput it prints each server's CPU time per MiB (sequential) and per request (random),
read from ``/proc/PID/stat`` around every measurement: on a loaded machine that cost ratio is
steadier than the throughput ratio.

Targets: obd ≥ 60 % of the Python ceiling uncompressed, ≥ 40 % for lz4 ZFile layers (issue 4);
lz4 ≥ 50 % sequential and ≥ 60 % at QD16 (issue 17).

Usage: .venv/bin/python bench/bench_nbd.py [--size 512] [--runtime 4] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from obd.layer.tools import OutputOptions, commit_layer  # noqa: E402
from obd.lsmt.rw import create_rw  # noqa: E402

PLUGIN = REPO / "frontends" / "nbd" / "plugin.py"
RAM_PLUGIN = REPO / "bench" / "ram_plugin.py"
ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
MiB = 1 << 20
CHUNK = 4 * MiB


def tool(name: str) -> str:
    found = shutil.which(name, path=ENV["PATH"])
    if not found:
        sys.exit(f"bench_nbd: {name} not found (Debian packages: nbdkit nbdkit-plugin-python libnbd-bin fio)")
    return found


# --- data ---------------------------------------------------------------------------------------------
def build(work: Path, size_mib: int) -> dict[str, Path]:
    """raw image, plain and lz4 layers holding the same ``size_mib`` MiB."""
    raw, plain, lz4 = work / "disk.raw", work / "plain.commit", work / "lz4.commit"
    if raw.exists() and plain.exists() and lz4.exists() and raw.stat().st_size == size_mib * MiB:
        return {"raw": raw, "plain": plain, "lz4": lz4}
    text = (b"obd overlaybd bench: the quick brown fox jumps over the lazy dog 0123456789\n" * 1000)[:65536]
    t0 = time.perf_counter()
    for p in (work / "rw.data", work / "rw.index"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    layer = create_rw(str(work / "rw.data"), str(work / "rw.index"), size_mib * MiB)
    with open(raw, "wb") as out:
        for off in range(0, size_mib * MiB, CHUNK):
            chunk = b"".join(os.urandom(65536) + text for _ in range(CHUNK // 131072))
            layer.pwrite(chunk, off)
            out.write(chunk)
    layer.flush()
    commit_layer(layer, str(plain))
    commit_layer(layer, str(lz4), options=OutputOptions(compress="lz4"))
    layer.close()
    print(
        f"built {size_mib} MiB in {time.perf_counter() - t0:.1f} s: "
        f"plain {plain.stat().st_size / MiB:.0f} MiB, lz4 {lz4.stat().st_size / MiB:.0f} MiB",
        flush=True,
    )
    return {"raw": raw, "plain": plain, "lz4": lz4}


# --- servers ------------------------------------------------------------------------------------------
class Server:
    def __init__(self, work: Path, name: str, args: list[str]):
        self.sock = work / f"{name}.sock"
        self.args = args
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / f"{name}.log"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def __enter__(self) -> Server:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        cmd = [tool("nbdkit"), "-f", "--exit-with-parent", "-U", str(self.sock), "-t", "16", *self.args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"bench_nbd: {self.name} server failed:\n{self.log.read_text()}")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.sock))
                    return self
                except OSError:
                    time.sleep(0.05)
        sys.exit(f"bench_nbd: {self.name} server did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- measurements -------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by process ``pid`` and its threads (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seq_read(uri: str, size: int, passes: int = 1) -> float:
    """MiB/s of ``passes`` runs of ``nbdcopy --no-extents -C 4 URI null:``."""
    t0 = time.perf_counter()
    for _ in range(passes):
        subprocess.run([tool("nbdcopy"), "--no-extents", "-C", "4", uri, "null:"], check=True, env=ENV)
    return passes * size / MiB / (time.perf_counter() - t0)


#: Sequential samples read at least this much (in passes over the device): enough CPU time for
#: the kernel's 10 ms accounting ticks to be a small error.
SEQ_MIN_BYTES = 512 * MiB


def fio(uri: str, rw: str, qd: int, size: int, runtime: float, extra: tuple[str, ...] = ()) -> float:
    out = subprocess.run(
        [
            tool("fio"),
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            "--bs=4k",
            f"--iodepth={qd}",
            f"--size={size}",
            "--time_based",
            f"--runtime={runtime}",
            "--randrepeat=0",
            "--output-format=json",
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    FIO_IOS[uri] = int(side["total_ios"])
    return float(side["iops"])


#: Requests the last fio run of each URI completed (for the CPU cost per request).
FIO_IOS: dict[str, int] = {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="MiB of data (default 512)")
    ap.add_argument("--runtime", type=float, default=4.0, help="seconds per fio run (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of measurements; medians kept (default 3)")
    ap.add_argument("--dir", help="work directory, kept between runs (default: a temporary one)")
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run in seconds: --size 16 --runtime 0.5 --rounds 1"
    )
    args = ap.parse_args()
    if args.quick:  # the quick sizes become the defaults; flags given still win
        ap.set_defaults(size=16, runtime=0.5, rounds=1)
        args = ap.parse_args()
    for t in ("nbdkit", "nbdcopy", "fio"):
        tool(t)
    tmp = None
    if args.dir:
        work = Path(args.dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-nbd-")
        work = Path(tmp.name)
    try:
        files = build(work, args.size)
        size = args.size * MiB
        plugin = ["python", str(PLUGIN)]
        readers = {
            "file (C)": ["file", str(files["raw"])],
            "python RAM": ["python", str(RAM_PLUGIN), f"file={files['raw']}"],
            "obd plain": [*plugin, f"image={files['plain']}"],
            "obd lz4": [*plugin, f"image={files['lz4']}"],
        }
        # Every server at once, measured round-robin (medians of --rounds), so that a busy moment
        # of a shared machine hits the ceilings and obd alike.
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in readers}
        #: the server's CPU time per unit of work (µs per MiB sequential, per request random)
        cpu: dict[str, dict[str, list[float]]] = {name: {} for name in readers}
        with contextlib.ExitStack() as servers:
            procs = {
                name: servers.enter_context(
                    Server(work, name.split()[0] + name.split()[-1].strip("()"), srv_args)
                )
                for name, srv_args in readers.items()
            }
            uris = {name: srv.uri for name, srv in procs.items()}
            seq_passes = 1 if args.quick else -(-SEQ_MIN_BYTES // size)
            for uri in uris.values():
                seq_read(uri, size)  # warm-up: page cache, decoders, threads
            kinds = (
                ("seq", lambda uri: seq_read(uri, size, seq_passes)),
                ("qd1", lambda uri: fio(uri, "randread", 1, size, args.runtime)),
                ("qd16", lambda uri: fio(uri, "randread", 16, size, args.runtime)),
            )
            for _ in range(args.rounds):
                for key, measure in kinds:
                    for name, uri in uris.items():
                        pid = procs[name].proc.pid  # type: ignore[union-attr]
                        c0 = cpu_seconds(pid)
                        samples[name].setdefault(key, []).append(measure(uri))
                        work_done = seq_passes * size / MiB if key == "seq" else FIO_IOS[uri]
                        cpu[name].setdefault(key, []).append((cpu_seconds(pid) - c0) * 1e6 / work_done)
        res = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
        cres = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in cpu.items()}
        for name, r in res.items():
            print(
                f"{name:12s} seq {r['seq']:7.0f} MiB/s   "
                f"4K QD1 {r['qd1']:7.0f} IOPS   QD16 {r['qd16']:7.0f} IOPS",
                flush=True,
            )
        wcopy = work / "write.raw"
        shutil.copyfile(files["raw"], wcopy)
        writers = {
            "file (C)": ["file", str(wcopy)],
            "python RAM": ["python", str(RAM_PLUGIN), f"file={files['raw']}"],
            "obd append": [*plugin, f"image={files['plain']}", f"upper={work / 'up-append'}"],
            "obd sparse": [*plugin, f"image={files['plain']}", f"upper={work / 'up-sparse'}", "sparse=true"],
        }
        wres: dict[str, float] = {}
        for name, srv_args in writers.items():
            for d in ("up-append", "up-sparse"):
                shutil.rmtree(work / d, ignore_errors=True)
            with Server(work, "w" + name.split()[-1].strip("()"), srv_args) as srv:
                wres[name] = fio(srv.uri, "randwrite", 16, size, args.runtime, ("--fsync=64",))
            print(f"{name:12s} 4K random write QD16, flush/64: {wres[name]:7.0f} IOPS", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    ceiling, c = res["python RAM"], res["file (C)"]
    print("\nratios (same run)")
    print(
        f"{'':12s} {'seq':>8s} {'QD1':>8s} {'QD16':>8s}   "
        "(vs the Python RAM plugin; target plain ≥ 60 %, lz4 ≥ 40 %)"
    )
    for name in ("obd plain", "obd lz4", "file (C)"):
        r = res[name]
        print(
            f"{name:12s} {r['seq'] / ceiling['seq']:8.0%} {r['qd1'] / ceiling['qd1']:8.0%} "
            f"{r['qd16'] / ceiling['qd16']:8.0%}"
        )
    print(f"{'':12s} {'seq':>8s} {'QD1':>8s} {'QD16':>8s}   (vs nbdkit's C file plugin)")
    for name in ("obd plain", "obd lz4", "python RAM"):
        r = res[name]
        print(
            f"{name:12s} {r['seq'] / c['seq']:8.0%} {r['qd1'] / c['qd1']:8.0%} {r['qd16'] / c['qd16']:8.0%}"
        )
    print(
        f"\nserver CPU time (µs per MiB sequential, per 4K request random; medians), and the Python RAM "
        f"plugin's as a share of it:\n{'':12s} {'seq':>14s} {'QD1':>14s} {'QD16':>14s}"
    )
    for name in ("python RAM", "obd plain", "obd lz4", "file (C)"):
        r = cres[name]
        print(
            f"{name:12s} "
            + " ".join(
                f"{r[k]:7.1f} ({cres['python RAM'][k] / r[k]:4.0%})" if r[k] else f"{'(under a tick)':>14s}"
                for k in ("seq", "qd1", "qd16")
            )
        )
    print("(CPU cost ratios hold on a loaded machine, where the throughput ratios above swing.)")
    print("random writes, flush every 64, vs the file plugin:")
    for name in ("obd append", "obd sparse", "python RAM"):
        print(f"{name:12s} {wres[name] / wres['file (C)']:8.0%}")
    for name, target in (("obd plain", 0.6), ("obd lz4", 0.4)):
        worst = min(res[name][k] / ceiling[k] for k in ("seq", "qd1", "qd16"))
        print(
            f"{name}: worst ratio to the Python ceiling {worst:.0%} (target {target:.0%}): "
            f"{'met' if worst >= target else 'MISSED'}"
        )
    for key, target in (("seq", 0.5), ("qd16", 0.6)):
        ratio = res["obd lz4"][key] / ceiling[key]
        print(
            f"obd lz4 {key}: {ratio:.0%} of the Python ceiling (issue 17 target {target:.0%}): "
            f"{'met' if ratio >= target else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
