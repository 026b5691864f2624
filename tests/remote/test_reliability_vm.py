"""``bench/reliability.py --quick --rows vm,vmrw``: the reliability rows that boot a real QEMU (TCG).

* registry faults while a guest reads files through ``obd nbd`` of a registry image behind the
  fault proxy: one boot, a different fault on each file's reads;
* ``obd run --rw DIR`` after QEMU is killed with SIGKILL right after the guest synced a write: the
  next run over DIR reads the write back.

Three boots in all (about 30 s); the full run (``--rows vm,vmrw`` without ``--quick``) boots 6 and 13
times.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_reliability_quick import COLUMNS, parse_table

from fixtures import REPO, require_tool

pytestmark = pytest.mark.timeout(300)

ROWS = ["registry faults → VM via obd nbd", "obd run --rw state after kill -9 QEMU"]


def test_vm_rows_have_no_wrong_bytes_no_hang_no_crash():
    for tool in ("docker-registry", "nbdkit", "qemu-system-x86_64", "busybox", "mke2fs"):
        require_tool(tool)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "reliability.py"), "--quick", "--rows", "vm,vmrw", "-q"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
    )
    table = parse_table(proc.stdout)
    assert list(table) == ROWS, proc.stdout + proc.stderr[-2000:]
    for row, counts in table.items():
        assert counts["trials"] > 0, f"{row}: no trial ran\n{proc.stdout}"
        assert counts["trials"] == sum(counts[c] for c in COLUMNS[1:]), row
        bad = counts["wrong bytes"] + counts["hang"] + counts["crash"]
        assert bad == 0, f"{row}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    faults = table[ROWS[0]]
    assert faults["correct"] > 0 and faults["clear error"] > 0, proc.stdout  # retried, and reported
    assert "the fault hit 8 of 8 files' reads" in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
