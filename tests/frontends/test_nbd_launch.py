"""Starting the nbd frontend: the plugin script in nbdkit's embedded Python, and ``obd nbd``.

Also the harness the other test_nbd_* modules share: :class:`NbdServer` runs a real nbdkit with
obd's plugin (foreground, ``--exit-with-parent``, on a Unix socket under tmp_path) and
:func:`libnbd` imports Debian's python3-libnbd binding into this venv.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from fixtures import REPO, materialize, require_tool, stack

PLUGIN = REPO / "frontends" / "nbd" / "plugin.py"
OBD = Path(sys.prefix) / "bin" / "obd"
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
#: What nbdkit sees: no venv, no pyenv, no PYTHONPATH; the plugin finds the engine by itself.
CLEAN_ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}


def libnbd() -> Any:
    """Debian's libnbd Python binding (python3-libnbd), made importable from the project venv."""
    try:
        import nbd
    except ImportError:
        if (
            os.path.isfile(os.path.join(DEBIAN_DIST_PACKAGES, "nbd.py"))
            and DEBIAN_DIST_PACKAGES not in sys.path
        ):
            sys.path.append(DEBIAN_DIST_PACKAGES)
        try:
            import nbd
        except ImportError:
            pytest.fail(
                "Python module 'nbd' not found: it comes from Debian package 'python3-libnbd' "
                "(add it to setup.sh's PACKAGES and run ./setup.sh)",
                pytrace=False,
            )
    return nbd


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class NbdServer:
    """A real ``nbdkit python plugin.py PARAMS…`` on a Unix socket, restartable and killable."""

    def __init__(self, tmp_path: Path, params: list[str], *, readonly: bool = False, name: str = "obd"):
        self.nbdkit = require_tool("nbdkit")
        self.params = list(params)
        self.readonly = readonly
        self.sock = tmp_path / f"{name}.sock"
        self.log_path = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._handles: list[weakref.ref[Any]] = []

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def command(self) -> list[str]:
        ro = ["-r"] if self.readonly else []
        return [
            self.nbdkit,
            "-f",
            "--exit-with-parent",
            *(["-v"] if os.environ.get("OBD_NBD_TEST_VERBOSE") else []),
            *ro,
            "-U",
            str(self.sock),
            "python",
            str(PLUGIN),
            *self.params,
        ]

    def start(self, timeout: float = 30.0) -> NbdServer:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()  # a killed server's socket
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=CLEAN_ENV
            )
        wait_for_socket(self.sock, timeout, self.proc, self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Send ``sig`` and wait; after ``timeout`` s fall back to SIGKILL."""
        if sig == signal.SIGKILL:
            self._handles.clear()  # their connections die with the server
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)

    def stop(self) -> None:
        """Disconnect this harness's clients, then SIGTERM (nbdkit 1.32 waits for connected clients;
        if one is left, SIGKILL after 10 s)."""
        self.disconnect_all()
        self.kill(signal.SIGTERM, timeout=10.0)

    def restart(self) -> NbdServer:
        self.stop()
        return self.start()

    def connect(self) -> Any:
        """A libnbd handle on the server; the server disconnects it (cleanly) when it stops."""
        h = libnbd().NBD()
        h.connect_uri(self.uri)
        self._handles.append(weakref.ref(h))
        return h

    def disconnect_all(self) -> None:
        for ref in self._handles:
            h = ref()
            if h is not None:
                with contextlib.suppress(Exception):
                    h.shutdown()
        self._handles.clear()

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_socket(sock: Path, timeout: float, proc: Any = None, log: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"nbdkit exited with {proc.returncode} before listening:\n{log() if log else ''}")
        if sock.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    pytest.fail(f"nbdkit did not listen on {sock} within {timeout} s:\n{log() if log else ''}")


def read_device(h: Any, chunk: int = 4 << 20) -> bytes:
    size = h.get_size()
    out = bytearray(size)
    mv = memoryview(out)
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        mv[off : off + n] = h.pread(n, off)
    return bytes(out)


def layer_params(entry: dict[str, Any]) -> list[str]:
    return [f"layer={materialize(r)}" for r in entry["layers"]]


# --- tests: the plugin in nbdkit's embedded Python ------------------------------------------------
def test_plugin_loads_in_nbdkits_python_from_a_clean_environment(tmp_path):
    """No venv, no PYTHONPATH: plugin.py finds the checkout and its .venv (numpy, lz4…) itself."""
    entry = stack("L0L1L2/lz4")
    with NbdServer(tmp_path, layer_params(entry)) as srv:
        h = srv.connect()
        assert h.is_read_only() and h.can_multi_conn() and h.can_cache()
        assert sha256(read_device(h)) == entry["sha256"]
        h.shutdown()
    dump = subprocess.run(
        [require_tool("nbdkit"), "python", str(PLUGIN), "--dump-plugin"],
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "obd_version=" in dump and "obd_python=3.11" in dump


def test_venv_parameter_when_the_checkout_has_no_venv(tmp_path):
    """A copy of the code without .venv: the engine's wheels come from venv=, given as a parameter."""
    root = tmp_path / "copy"
    for pkg in ("obd", "frontends"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    entry = stack("L0/lz4")
    srv = NbdServer(tmp_path, [f"venv={sys.prefix}", *layer_params(entry)])
    plugin = str(root / "frontends" / "nbd" / "plugin.py")
    cmd = srv.command()
    cmd[cmd.index(str(PLUGIN))] = plugin
    srv.command = lambda: cmd  # type: ignore[method-assign]
    with srv:
        assert sha256(read_device(srv.connect())) == entry["sha256"]
    # without it the error says what to do
    bad = subprocess.run(
        [
            require_tool("nbdkit"),
            "-f",
            "-U",
            str(tmp_path / "x.sock"),
            "python",
            plugin,
            *layer_params(entry),
        ],
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "cannot import the obd engine" in bad.stderr and "venv=" in bad.stderr


def test_bad_image_stops_nbdkit_before_it_listens(tmp_path):
    bad = tmp_path / "bad.commit"
    bad.write_bytes(b"\0" * 10000)
    res = subprocess.run(
        [require_tool("nbdkit"), "-U", str(tmp_path / "x.sock"), "python", str(PLUGIN), f"image={bad}"],
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "bad.commit" in res.stderr
    assert not (tmp_path / "x.sock").exists()


def test_params_from_a_file_that_appears_later(tmp_path):
    """``params-from=FILE``: nbdkit starts and imports the engine, and waits (not listening) until
    FILE appears with the image's parameters, as ``obd run`` writes them once it has resolved the
    image; a malformed file stops nbdkit with an error naming the parameter."""
    entry = stack("L0L1/lz4")
    late = tmp_path / "params.json"
    srv = NbdServer(tmp_path, [f"params-from={late}"])
    srv.proc = subprocess.Popen(srv.command(), stdin=subprocess.DEVNULL, env=CLEAN_ENV)
    try:
        time.sleep(1.0)
        assert srv.proc.poll() is None and not srv.sock.exists()
        pairs = [p.split("=", 1) for p in layer_params(entry)]
        tmp = tmp_path / "params.tmp"
        tmp.write_text(json.dumps(pairs))
        tmp.rename(late)
        wait_for_socket(srv.sock, 30, srv.proc, srv.log)
        assert sha256(read_device(srv.connect())) == entry["sha256"]
    finally:
        srv.stop()
    for text, why in (("{", "cannot read the parameters"), ('[["a"]]', "JSON list of [key, value]")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        res = subprocess.run(
            [
                require_tool("nbdkit"),
                "-f",
                "-U",
                str(tmp_path / "x.sock"),
                "python",
                str(PLUGIN),
                f"params-from={bad}",
            ],
            env=CLEAN_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode != 0 and "params-from" in res.stderr and why in res.stderr


# --- tests: obd nbd -------------------------------------------------------------------------------
def obd_nbd(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OBD), "nbd", *args], env=env or CLEAN_ENV, capture_output=True, text=True, timeout=120, **kw
    )


def test_obd_nbd_from_a_clean_environment_daemonises_and_restarts_on_a_stale_socket(tmp_path):
    require_tool("nbdkit")
    entry = stack("L0L1/lz4")
    files = [str(materialize(r)) for r in entry["layers"]]
    sock, pid = tmp_path / "d.sock", tmp_path / "d.pid"
    res = obd_nbd(*files, "--socket", str(sock), "--pidfile", str(pid))
    assert res.returncode == 0, res.stderr
    assert f"nbd+unix:///?socket={sock}" in res.stderr
    try:
        h = libnbd().NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        assert sha256(read_device(h)) == entry["sha256"]
        h.shutdown()
        os.kill(int(pid.read_text()), signal.SIGKILL)  # leaves the socket file behind
        time.sleep(0.2)
        assert sock.exists()
        res = obd_nbd(*files, "--socket", str(sock), "--pidfile", str(pid))
        assert res.returncode == 0, res.stderr
        h = libnbd().NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        assert h.get_size() == entry["vsize"]
        h.shutdown()
        # a live server is not clobbered
        res = obd_nbd(*files, "--socket", str(sock))
        assert res.returncode == 1 and "already listening" in res.stderr
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(pid.read_text()), signal.SIGTERM)


def test_obd_nbd_foreground_tcp_and_extra_nbdkit_args(tmp_path):
    require_tool("nbdkit")
    entry = stack("L0/plain")
    f = str(materialize(entry["layers"][0]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(OBD), "nbd", f, "--port", str(port), "-f", "--", "--filter=stats", "statsfile=/dev/stderr"],
        env=CLEAN_ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        h = libnbd().NBD()
        while True:
            try:
                h.connect_uri(f"nbd://127.0.0.1:{port}")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
                h = libnbd().NBD()
        assert sha256(h.pread(entry["vsize"], 0)) == entry["sha256"]
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert "read:" in err  # the stats filter's report: the `--` arguments reached nbdkit


def test_obd_nbd_print_command(tmp_path):
    res = obd_nbd(
        "--upper", str(tmp_path / "u"), "--sparse", "--socket", "s.sock", "--print-command", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert f"-U {tmp_path}/s.sock" in line and f"python {PLUGIN}" in line
    assert f"upper={tmp_path}/u" in line and "sparse=true" in line and "OBD_VENV=" in line
    res = obd_nbd("--sparse", "x.commit", "--print-command")
    assert res.returncode == 1 and "--sparse needs --upper" in res.stderr
