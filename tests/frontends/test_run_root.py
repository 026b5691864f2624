"""``obd run``'s root, the Docker way: writable with the writes thrown away, ``--rw``/``--snapshot`` to keep
them, ``--read-only`` for none; the throw-away upper directory gone on every way out; and the
FROM-scratch hello-world image (no /proc, /sys, /dev, /tmp or /run) booted in both modes.

The plan and the clean-up are checked without a VM; the two boots use the overlaybd-converted
hello-world fixture pushed to a real local registry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from registry_server import RegistryServer

from fixtures import FIXTURES, require_tool, vm_cache_dir
from frontends.run.launcher import RootDisk, RunOptions, root_disk, run_image
from obd.cli import build_parser, main
from obd.cli.run import build_options
from obd.errors import ConfigError

pytestmark = pytest.mark.timeout(300)

OBD = Path(sys.prefix) / "bin" / "obd"
HELLO = f"oci:{FIXTURES / 'aci-hello-world'}:amd64-converted"


def parse(*argv: str):
    return build_options(build_parser().parse_args(["run", *argv]))


# --- the plan -------------------------------------------------------------------------------------


def test_the_default_root_is_a_throwaway_upper_inside_the_run_directory(tmp_path):
    disk = root_disk(RunOptions(), tmp_path)
    assert disk == RootDisk(str(tmp_path / "upper"), throwaway=True) and not disk.readonly
    kept = root_disk(RunOptions(upper="rel/vm1"), tmp_path)
    assert kept == RootDisk(os.path.abspath("rel/vm1")) and not kept.throwaway
    assert root_disk(RunOptions(read_only=True), tmp_path) == RootDisk(None)
    assert root_disk(RunOptions(read_only=True), tmp_path).readonly
    with pytest.raises(ConfigError, match="not both"):
        root_disk(RunOptions(read_only=True, upper="vm1"), tmp_path)


def test_cli_flags_choose_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_STATE_DIR", str(tmp_path / "state"))
    _, _, opts = parse("IMG")
    assert (opts.upper, opts.read_only) == (None, False)
    _, _, opts = parse("--read-only", "IMG", "--", "ls")
    assert (opts.upper, opts.read_only) == (None, True)
    _, _, opts = parse("IMG", "--rw", str(tmp_path / "vm1"))
    assert (opts.upper, opts.read_only) == (str(tmp_path / "vm1"), False)
    _, _, opts = parse("IMG", "--snapshot", "dev")
    assert opts.upper == str(tmp_path / "state" / "sandboxes" / "dev")
    with pytest.raises(ConfigError, match="thrown away"):
        parse("IMG", "--commit")
    with pytest.raises(ConfigError, match="thrown away"):
        parse("--read-only", "IMG", "--commit")
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --rw
        parse("--read-only", "--rw", "vm1", "IMG")


def test_a_sandboxfile_can_ask_for_a_read_only_root(tmp_path):
    sf = tmp_path / "Sandboxfile"
    sf.write_text("sandboxes:\n  ro: {image: IMG, read_only: true}\n  rw: {image: IMG}\n")
    assert parse("-f", str(sf), "ro")[2].read_only
    assert not parse("-f", str(sf), "rw")[2].read_only
    assert not parse("-f", str(sf), "ro", "--rw", str(tmp_path / "vm"))[2].read_only  # the CLI wins
    sf.write_text("sandboxes:\n  bad: {image: IMG, read_only: true, rw: true}\n")
    with pytest.raises(ConfigError) as err:
        parse("-f", str(sf), "bad")
    assert err.value.field == "sandboxes.bad.read_only"


# --- the throw-away upper is gone on every way out ----------------------------------------------


@pytest.fixture
def private_tmp(monkeypatch):
    """A private temporary directory for the run's directory (and so the throw-away upper)."""
    tmp = Path(tempfile.mkdtemp(prefix="obdr", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_the_throwaway_upper_is_removed_after_an_error(private_tmp, tmp_path):
    said: list[str] = []
    opts = RunOptions(trace=str(tmp_path / "missing.trace"), say=said.append)
    with pytest.raises(ConfigError, match="trace file not found"):
        run_image(HELLO, [], opts)
    assert os.listdir(private_tmp) == []


def test_the_throwaway_upper_is_removed_after_an_interrupt_and_is_logged(private_tmp):
    said: list[str] = []
    made: list[Path] = []

    def say(msg: str) -> None:
        said.append(msg)
        if msg.startswith("writable root"):
            # Ctrl-C right after the upper directory was made: the fault a real user can cause any time
            made.append(Path(msg.rsplit(" ", 1)[1]))
            assert (made[0] / "config.v1.json").is_file()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_image(HELLO, [], RunOptions(say=say))
    assert made and made[0].parent.parent == private_tmp
    assert "throw-away upper directory" in said[-1]
    assert os.listdir(private_tmp) == []


# --- FROM scratch, booted -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    """The converted hello-world in a fresh local registry, as ``HOST/aci/hello:1``."""
    for tool in ("qemu-system-x86_64", "nbdkit"):
        require_tool(tool)
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    try:
        assert main(["push", HELLO, f"{reg.host}/aci/hello:1", "--insecure-registry", reg.host]) == 0
        yield f"{reg.host}/aci/hello:1"
    finally:
        reg.stop()


@pytest.fixture
def env(tmp_path):
    """A CLI run's environment: private caches and state, a short private TMPDIR (for the socket)."""
    xdg = tmp_path / "xdg"
    (xdg / "obd").mkdir(parents=True)
    (xdg / "obd" / "vm").symlink_to(vm_cache_dir())
    tmp = Path(tempfile.mkdtemp(prefix="obdt", dir="/tmp"))
    e = dict(os.environ)
    e.update(
        XDG_CACHE_HOME=str(xdg),
        OBD_CACHE_DIR=str(tmp_path / "blockcache"),
        OBD_STATE_DIR=str(tmp_path / "state"),
        TMPDIR=str(tmp),
    )
    yield e
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("mode", [[], ["--read-only"]], ids=["throwaway", "read-only"])
def test_hello_world_from_scratch_runs(hello, env, mode):
    host = hello.split("/", 1)[0]
    res = subprocess.run(
        [str(OBD), "-v", "run", "--insecure-registry", host, "--accel", "tcg", *mode, hello],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "Hello from Docker!" in res.stdout
    assert ("read-only root" if mode else "throw-away upper directory") in res.stderr
    assert os.listdir(env["TMPDIR"]) == []  # the run's directory, with the throw-away upper, is gone
