"""``obd run`` end to end: a busybox overlaybd image in the local test registry, booted in a microVM.

Each run boots QEMU (TCG on machines without usable KVM, ≈ 2–3 s). The image's OCI config sets a
default command, environment and working directory, so Docker's rules can be checked; CLI runs are
subprocesses with private cache, state and temporary directories, which also proves that nothing
(qemu, nbdkit, sockets) outlives a run, whether it ends normally, by timeout or by a signal.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from registry_server import RegistryServer

from fixtures import require_tool, vm_cache_dir
from frontends.run.images import build_layer, busybox_rootfs, push_image
from frontends.run.launcher import RunOptions, run_image
from obd.image.remote import RemoteOptions
from obd.observability.stats import Stats
from obd.prefetch.trace import load

pytestmark = pytest.mark.timeout(300)

OBD = Path(sys.prefix) / "bin" / "obd"
CONFIG = {
    "Cmd": ["sh", "-c", 'echo "default $GREETING"; pwd'],
    "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=from-image", "IMAGE_ONLY=kept"],
    "WorkingDir": "/srv/app",
}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """``HOST/run/busybox:1`` in a fresh registry: busybox, users, a motd; the OCI config above."""
    for tool in ("qemu-system-x86_64", "nbdkit", "busybox", "mke2fs"):
        require_tool(tool)
    base = tmp_path_factory.mktemp("run-image")
    root = busybox_rootfs(base / "root", files={"etc/motd": "welcome to obd\n", "srv/app/.keep": ""})
    layer = build_layer(root, base / "layer.commit", size=64 << 20)
    reg = RegistryServer(base / "registry", "noauth").start()
    try:
        push_image([layer], f"{reg.host}/run/busybox:1", config=CONFIG, insecure=(reg.host,))
        yield f"{reg.host}/run/busybox:1", reg, layer
    finally:
        reg.stop()


@pytest.fixture
def env(tmp_path):
    """Environment of a CLI run: private caches and state, a short private TMPDIR (for the socket)."""
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


def obd(env, *args, timeout=240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(OBD), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def run_cli(env, image_ref, *args, **kw) -> subprocess.CompletedProcess:
    host = image_ref.split("/", 1)[0]
    return obd(env, "run", "--insecure-registry", host, "--accel", "tcg", *args, **kw)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                if text.encode() in cmd:
                    found.append(cmd.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def assert_nothing_left(env) -> None:
    tmp = env["TMPDIR"]
    deadline = time.monotonic() + 10
    while processes_mentioning(tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(tmp) == []
    assert os.listdir(tmp) == []  # the run's directory and its socket are gone


def options(tmp_path, reg, **kw) -> RunOptions:
    remote = RemoteOptions(insecure=(reg.host,), cache_dir=str(tmp_path / "cache"), stats=Stats())
    kw.setdefault("accel", "tcg")
    kw.setdefault("timeout", 200)
    return RunOptions(remote=remote, vm_cache_dir=str(vm_cache_dir()), **kw)


# --- the API --------------------------------------------------------------------------------------


def test_default_command_environment_and_workdir_come_from_the_image(image, tmp_path):
    ref, reg, _ = image
    streamed = bytearray()
    res = run_image(ref, [], options(tmp_path, reg, on_output=streamed.extend))
    assert res.exit_code == 0
    assert res.output == b"default from-image\n/srv/app\n" == bytes(streamed)
    assert res.argv == CONFIG["Cmd"]
    assert res.stats["bytes_fetched"] > 0 and res.stats["requests"] > 0
    assert res.resolve_stats["requests"] >= 2  # manifest and config
    t = res.timings
    assert t["resolve"] <= t["server"] <= t["first_output"] <= t["exit"] <= t["total"]


# --- the command line -----------------------------------------------------------------------------


def test_output_streams_and_the_exit_code_comes_back(image, env):
    ref = image[0]
    res = run_cli(env, ref, "--stats", ref, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout == "out\nerr\n"  # one stream: the serial console
    assert "fetched" in res.stderr and "requests" in res.stderr
    ok = run_cli(env, ref, ref, "-q", "--", "cat", "/etc/motd")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "welcome to obd\n", "")
    assert_nothing_left(env)


def test_env_workdir_and_user_flags_override_the_image(image, env):
    ref = image[0]
    script = 'echo "$GREETING $EXTRA $IMAGE_ONLY"; pwd; id -u; echo "$HOME"'
    res = run_cli(
        env,
        ref,
        ref,
        "-e",
        "GREETING=hey",
        "-e",
        "EXTRA=1",
        "-w",
        "/home",
        "-u",
        "alice",
        "--",
        "sh",
        "-c",
        script,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["hey 1 kept", "/home", "1000", "/home/alice"]


def test_entrypoint_and_guest_errors(image, env):
    ref = image[0]
    res = run_cli(env, ref, ref, "--entrypoint", "echo entry", "--", "arg")
    assert (res.returncode, res.stdout) == (0, "entry arg\n")
    missing = run_cli(env, ref, ref, "--", "no-such-program")
    assert missing.returncode == 127 and "no-such-program: command not found" in missing.stdout
    nobody = run_cli(env, ref, ref, "-u", "mallory", "--", "true")
    assert nobody.returncode == 125 and "mallory" in nobody.stderr
    bad = run_cli(env, ref, "127.0.0.1:1/nothing:here", "--", "true")
    assert bad.returncode == 125 and "obd: error:" in bad.stderr
    assert_nothing_left(env)


def test_timeout_tears_everything_down(image, env):
    ref = image[0]
    started = time.monotonic()
    res = run_cli(env, ref, ref, "--timeout", "8", "--", "sleep", "1000")
    assert res.returncode == 124, res.stderr
    assert "did not finish within" in res.stderr
    assert time.monotonic() - started < 60
    assert_nothing_left(env)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_tears_everything_down(image, env, sig, code):
    ref = image[0]
    host = ref.split("/", 1)[0]
    proc = subprocess.Popen(
        [
            str(OBD),
            "run",
            "--insecure-registry",
            host,
            "--accel",
            "tcg",
            ref,
            "--",
            "sh",
            "-c",
            "echo ready; sleep 1000",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        got = b""
        deadline = time.monotonic() + 120
        while b"ready" not in got:
            assert time.monotonic() < deadline, "the command never started"
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, proc.stderr.read().decode()
                got += chunk
        proc.send_signal(sig)
        assert proc.wait(60) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert_nothing_left(env)


def test_rw_commit_then_a_second_run_and_a_fork_see_the_write(image, env, tmp_path):
    ref = image[0]
    upper = tmp_path / "vm1"
    first = run_cli(
        env, ref, ref, "--rw", str(upper), "--", "sh", "-c", "echo persisted > /srv/app/note; echo done"
    )
    assert (first.returncode, first.stdout) == (0, "done\n"), first.stderr
    assert (upper / "config.v1.json").is_file()
    snap = obd(env, "snapshot", str(upper))
    assert snap.returncode == 0, snap.stderr
    assert (upper / "layers" / "1.commit").is_file()
    again = run_cli(env, ref, "--rw", str(upper), "--", "cat", "/srv/app/note")
    assert (again.returncode, again.stdout) == (0, "persisted\n"), again.stderr
    fork = obd(env, "fork", str(upper), str(tmp_path / "vm2"))
    assert fork.returncode == 0, fork.stderr
    forked = run_cli(
        env, ref, "--rw", str(tmp_path / "vm2"), "--", "sh", "-c", "cat /srv/app/note; echo more >> /f"
    )
    assert (forked.returncode, forked.stdout) == (0, "persisted\n"), forked.stderr
    # the image's default command is remembered by the upper directory
    default = run_cli(env, ref, "--rw", str(upper))
    assert (default.returncode, default.stdout) == (0, "default from-image\n/srv/app\n")
    # a different image over the same directory is refused
    wrong = run_cli(env, ref, ref.replace(":1", ":2"), "--rw", str(upper), "--", "true")
    assert wrong.returncode == 125
    assert_nothing_left(env)


def test_named_snapshot_with_commit(image, env):
    ref = image[0]
    first = run_cli(env, ref, ref, "--snapshot", "dev", "--commit", "--", "sh", "-c", "echo kept > /root/x")
    assert first.returncode == 0, first.stderr
    state = Path(env["OBD_STATE_DIR"]) / "sandboxes" / "dev"
    assert (state / "layers" / "1.commit").is_file() and "committed" in first.stderr
    again = run_cli(env, ref, "--snapshot", "dev", "--", "cat", "/root/x")
    assert (again.returncode, again.stdout) == (0, "kept\n"), again.stderr


def test_sandboxfile_runs_scripts(image, env, tmp_path):
    ref, reg, _ = image
    (tmp_path / "Sandboxfile").write_text(
        f"""
sandboxes:
  hello:
    image: {ref}
    memory: 256M
    envs: [GREETING=sandboxed]
    workdir: /tmp
    insecure_registry: {reg.host}
    scripts:
      start: echo "start $GREETING"; pwd
      motd: [cat, /etc/motd]
"""
    )
    sf = str(tmp_path / "Sandboxfile")
    start = obd(env, "run", "--accel", "tcg", "-f", sf, "hello")
    assert (start.returncode, start.stdout) == (0, "start sandboxed\n/tmp\n"), start.stderr
    motd = obd(env, "run", "--accel", "tcg", "-f", sf, "hello~motd")
    assert (motd.returncode, motd.stdout) == (0, "welcome to obd\n"), motd.stderr
    own = obd(
        env,
        "run",
        "--accel",
        "tcg",
        "-f",
        sf,
        "hello",
        "-e",
        "GREETING=cli",
        "--",
        "sh",
        "-c",
        "echo $GREETING",
    )
    assert (own.returncode, own.stdout) == (0, "cli\n"), own.stderr
    unknown = obd(env, "run", "-f", sf, "nope")
    assert unknown.returncode == 125 and "no sandbox 'nope'" in unknown.stderr


def test_recorded_trace_replays_on_a_cold_cache(image, tmp_path):
    ref, reg, _ = image
    trace = tmp_path / "boot.trace"
    argv = ["sh", "-c", "cat /etc/motd; ls /bin | wc -l"]
    first = run_image(ref, argv, options(tmp_path / "a", reg, record_trace=str(trace)))
    assert first.exit_code == 0
    records = load(trace)
    assert records and {layer for layer, _, _ in records} == {0}
    second = run_image(ref, argv, options(tmp_path / "b", reg, trace=str(trace)))
    assert (second.exit_code, second.output) == (0, first.output)
    # the replay fetched what the guest needed: it found its blocks in the cache
    assert second.stats["cache_hits"] > 0
    # no more than the first run fetched (which also read the command's files whole on a guess; in
    # fewer, larger requests, so requests are no measure here)
    assert 0 < second.stats["bytes_fetched"] <= first.stats["bytes_fetched"]


def test_default_writes_are_thrown_away_and_read_only_writes_nothing(image, env):
    ref = image[0]
    first = run_cli(env, ref, ref, "--", "sh", "-c", "echo gone > /srv/app/note; cat /srv/app/note")
    assert (first.returncode, first.stdout) == (0, "gone\n"), first.stderr
    again = run_cli(env, ref, ref, "--", "sh", "-c", "cat /srv/app/note || echo missing")
    assert again.stdout.endswith("missing\n"), again.stderr
    # the image has no /run: a read-only root is rebuilt as a skeleton with its mount points
    script = "echo t > /tmp/t && echo r > /run/r && cat /tmp/t /run/r /etc/motd; touch /new || echo ro"
    ro = run_cli(env, ref, "--read-only", ref, "--", "sh", "-c", script)
    assert ro.returncode == 0, ro.stderr
    assert ro.stdout.startswith("t\nr\nwelcome to obd\n") and ro.stdout.endswith("ro\n")
    assert_nothing_left(env)
