#!/usr/bin/env python3
"""Reliability and security figures: faults injected on purpose, every outcome counted.

    .venv/bin/python bench/reliability.py [--quick] [--rows fuzz,tar,...] [--budget SECONDS] [-q] [-v]

Each row runs one family of faults against the real components (Debian's docker-registry on
127.0.0.1 behind a fault-injecting proxy, real nbdkit, FUSE and debugfs) and counts, per trial,
one of:

    correct      the result equals the fault-free result
    clear error  it stopped with an obd error (one line naming file/field or host and digest)
    wrong bytes  it finished without an error but produced something else (or touched the host,
                 or printed or forwarded a secret)
    hang         the per-trial watchdog fired
    crash        any other exception, or a process that died or exited unexpectedly

Rows (bench/faults/ has one module each): fuzz (LSMT, ZFile, tar envelope, config.v1.json, OCI
manifests), tar (hostile layers to obd convert), registry (faults while exporting; flipped bits
in an uncompressed layer), vm (the same faults while a QEMU guest reads files through ``obd nbd``),
vmrw (``obd run --rw DIR`` after kill -9 of QEMU), cache (damaged cache files), creds (secrets in
-v/-vv output, on redirects), nbd and fuse (kill -9 during writes), load (16 clients through one
nbdkit of local layers, and through ``obd nbd`` of a registry image).

Wrong bytes, hangs and crashes must be 0; the exit status is 1 if any row has one. ``--quick``
runs every row with few trials in under two minutes (tests/remote/test_reliability_quick.py runs
it, tests/remote/test_reliability_vm.py the two QEMU rows); the full run is the soak: 105 K fuzz
cases, 50 kills of each server, 6 guest boots under registry faults, 12 QEMU kills, 10 minutes of
load on each server.
The guarantees and the figures: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "helpers"))
sys.path.insert(0, str(HERE.parent / "tests" / "frontends"))  # the nbd harness (NbdServer)
sys.path.insert(0, str(HERE))

from faults.tally import Tally, format_table  # noqa: E402

ROWS = ("fuzz", "tar", "registry", "vm", "vmrw", "cache", "creds", "nbd", "fuse", "load")

#: per row: (quick trials, full trials, quick seconds, full seconds)
BUDGET = {
    "fuzz": (10_000, 105_000, 20, 3 * 3600),
    "tar": (1, 3, 20, 600),
    "registry": (1, 5, 22, 900),
    "vm": (1, 1, 20, 1800),
    "vmrw": (1, 12, 10, 900),
    "cache": (3, 40, 5, 300),
    "creds": (1, 1, 20, 600),
    "nbd": (6, 50, 10, 900),
    "fuse": (5, 50, 10, 900),
    "load": (1, 1, 6, 1200),
}


def run_row(name: str, quick: bool, seconds: float) -> list[Tally]:
    """Run one row for at most about ``seconds`` (plus its set-up); the row modules are imported here
    so that ``--rows fuzz`` does not pay for aiohttp and the registry helpers."""
    trials = BUDGET[name][0 if quick else 1]
    if name == "fuzz":
        from faults import fuzz

        return fuzz.run(trials, seconds)
    if name == "tar":
        from faults import hostile_tar

        return [hostile_tar.run(trials, seconds)]
    if name == "registry":
        from faults import registry

        return [
            registry.run(trials, seconds * 0.85, quick=quick),
            registry.run_plain(4 * trials, seconds * 0.15),
        ]
    if name == "vm":
        from faults import vm_nbd

        return [vm_nbd.run(seconds, quick=quick)]
    if name == "vmrw":
        from faults import vm_rw

        return [vm_rw.run(trials, seconds)]
    if name == "cache":
        from faults import cache

        return [cache.run(trials, seconds)]
    if name == "creds":
        from faults import creds

        return creds.run(seconds, quick=quick)
    if name == "nbd":
        from faults import nbd_kill

        return [nbd_kill.run(trials, seconds)]
    if name == "fuse":
        from faults import fuse_kill

        return [fuse_kill.run(trials, seconds)]
    if name == "load":
        from faults import load

        return [load.run(seconds / 2), load.run_registry(seconds / 2)]
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few trials per row, under two minutes in all")
    ap.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated rows to run, in order (default: {','.join(ROWS)})",
    )
    ap.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="total time for the trials, shared among the rows in proportion to their usual budgets "
        "(default: each row's own: about 100 s in all with --quick; without, the rows stop at their "
        "trial counts long before their 4 h of budgets)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    ap.add_argument("-v", "--verbose", action="store_true", help="show obd's warnings (damage it noticed)")
    args = ap.parse_args(argv)
    # obd logs each damage it repairs (a cache page refetched, …): thousands of lines in a soak
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.ERROR, format="%(name)s: %(message)s"
    )
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    usual = {r: BUDGET[r][2 if args.quick else 3] for r in rows}
    scale = args.budget / sum(usual.values()) if args.budget else 1.0
    tallies: list[Tally] = []
    started = time.monotonic()
    for name in rows:
        if not args.quiet:
            print(
                f"reliability: row {name} ({'quick' if args.quick else 'full'}) …",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.monotonic()
        try:
            got = run_row(name, args.quick, usual[name] * scale)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # a row that cannot even set up counts as one crash
            failed = Tally(name)
            failed.add("crash", f"the row could not run: {type(e).__name__}: {str(e).strip()[-400:]}")
            got = [failed]
        for t in got:
            t.seconds = t.seconds or time.monotonic() - t0
            if not args.quiet:
                print(f"reliability: {t.row}: {t.trials} trials, {t.counts}", file=sys.stderr, flush=True)
        tallies.extend(got)
    print(format_table(tallies))
    print(f"total {time.monotonic() - started:.1f} s, {'quick' if args.quick else 'full'} run")
    return 0 if all(t.ok for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
