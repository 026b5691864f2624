"""The README's first command, ``./setup.sh demo``, run as a new user runs it: install (a no-op once
the suite runs), then ``obd demo``: the bundled overlaybd fixture checked byte for byte, a python
image built with debootstrap from the apt mirror, pushed to a private registry and cold-started
lazily in a QEMU microVM twice (recording a trace, then with it attached as an acceleration layer).

The build cache is a fresh directory, so this is the first-run path a fresh machine takes."""

from __future__ import annotations

import os
import re
import subprocess

from fixtures import REPO, require_tool


def test_setup_sh_demo_runs_the_main_job(tmp_path):
    for tool in ("root", "qemu-system-x86_64", "nbdkit", "docker-registry", "debootstrap"):
        require_tool(tool)
    env = {**os.environ, "OBD_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        ["./setup.sh", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "has the same /hello: yes" in out, out[-4000:]
    assert out.count("| hello world!") == 2, out[-4000:]
    starts = re.findall(r"cold start: ([0-9.]+) s to the first output", out)
    assert len(starts) == 2, out[-4000:]
    fetched = re.search(r"fetched ([0-9.]+ \w+) of the ([0-9.]+ \w+) layer", out)
    assert fetched is not None, out[-4000:]
    assert "trace attach" in out and "acceleration layer" in out
