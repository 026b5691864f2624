"""A private local registry: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

The demo and the cold-start benchmark need a registry on machines without internet; this starts
one on a free port with filesystem storage in a directory of the caller's choosing (keep it to
reuse pushed images), no authentication, and stops it again. Used as a context manager it never
outlives the block, Ctrl-C included; it also dies with its parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from obd.errors import ObdError
from obd.host.programs import find_program

START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalRegistry:
    """``docker-registry serve`` on ``127.0.0.1:PORT`` storing blobs under ``storage``."""

    def __init__(
        self, storage: str | os.PathLike[str], *, port: int | None = None, binary: str | None = None
    ):
        self.storage = Path(storage)
        self.port = port or free_port()
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.storage / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {secrets.token_hex(16)}",
            *self._auth_config(),
        ]
        return "\n".join(lines) + "\n"

    def _auth_config(self) -> list[str]:
        """The ``auth:`` section of the registry's configuration (none: anyone may push and pull)."""
        return []

    def start(self) -> LocalRegistry:
        binary = self.binary or find_program("docker-registry", "docker-registry")
        (self.storage / "data").mkdir(parents=True, exist_ok=True)
        config = self.storage / "config.yml"
        config.write_text(self._config())
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self.proc = None
                raise ObdError(f"docker-registry exited at start: {tail}", path=str(config))
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as resp:
                    resp.read()
                return self
            except urllib.error.HTTPError:
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise ObdError(f"docker-registry did not answer within {START_TIMEOUT:.0f} s", path=str(config))

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-1000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> LocalRegistry:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
