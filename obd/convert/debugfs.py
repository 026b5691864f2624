"""A long-running ``debugfs`` (e2fsprogs) process that reads and writes an ext4 image file.

debugfs goes through libext2fs — what overlaybd-apply uses too — so files land in the image without
a mount, without root and without touching the journal. One process serves a whole layer: commands
are fed on stdin (``debugfs -f -``) and answers read back from its unbuffered stdout.

To know where the answer to a batch ends, each batch is followed by a comment line (``# obd-<nonce>``,
which debugfs echoes to stdout once everything before it has run) and by an unknown command
(``obd-<nonce>``, which makes debugfs complain on stderr): when both markers have arrived, every
byte the batch produced on either stream has too, and anything else on stderr is an error of that
batch. The nonce makes the markers impossible to forge from file names.

Arguments are passed in double quotes with embedded quotes doubled (debugfs' ``ss`` parser); names
with a line break cannot be passed at all (the tar reader refuses them).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence

from obd.errors import ObdError
from obd.host.programs import find_program

_BANNER = re.compile(rb"^debugfs \S+ \(.*\)$|^\s*Using EXT2FS Library version .*$")
#: How long one batch may take before the process is presumed stuck.
BATCH_TIMEOUT = 600.0
# One `ls -p` record: /ino/mode/uid/gid/name/size/ — a name cannot hold '/', but may hold anything else.
_LS_RECORD = re.compile(rb"/(\d+)/([0-7]{6})/(-?\d+)/(-?\d+)/([^/]*)/(\d*)/\n", re.S)
_LINKS = re.compile(rb"^Links: (\d+)", re.M)


class Ext4Error(ObdError):
    """debugfs (or another e2fsprogs program) is missing, failed, or reported an error."""


def find_tool(name: str) -> str:
    """Full path of e2fsprogs program ``name`` (the sbin directories included)."""
    return find_program(name, "e2fsprogs", error=Ext4Error)


def quote(arg: bytes) -> bytes:
    """``arg`` as one debugfs argument."""
    if b"\n" in arg or b"\r" in arg or b"\x00" in arg:
        raise Ext4Error(f"cannot pass {arg!r} to debugfs (line break or NUL)")
    return b'"' + arg.replace(b'"', b'""') + b'"'


def parse_ls(text: bytes) -> list[tuple[bytes, int, int]]:
    """``(name, inode, mode)`` records of an ``ls -p`` answer, ``.`` and ``..`` left out."""
    out = []
    pos = 0
    end = len(text)
    while pos < end:
        if text[pos] == 0x0A:
            pos += 1
            continue
        m = _LS_RECORD.match(text, pos)
        if not m:
            raise Ext4Error(f"cannot parse debugfs `ls -p` output near {text[pos : pos + 80]!r}")
        name = m.group(5)
        if name not in (b".", b".."):
            out.append((name, int(m.group(1)), int(m.group(2), 8)))
        pos = m.end()
    return out


def parse_links(text: bytes) -> int:
    """The link count of a ``stat`` answer."""
    m = _LINKS.search(text)
    if not m:
        raise Ext4Error(f"debugfs `stat` output shows no link count: {text[:120]!r}")
    return int(m.group(1))


class _Pipe:
    """Collects one output stream of the process in a background thread."""

    def __init__(self, fd: int, cond: threading.Condition):
        self.fd = fd
        self.cond = cond
        self.data = bytearray()
        self.eof = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="debugfs-reader")
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                chunk = b""
            with self.cond:
                if chunk:
                    self.data += chunk
                else:
                    self.eof = True
                self.cond.notify_all()
            if not chunk:
                return


class Debugfs:
    """``debugfs [-w] -f - IMAGE`` driven batch by batch.

    ``epoch`` is exported as ``E2FSPROGS_FAKE_TIME``: libext2fs then stamps inodes and the superblock
    with it instead of the wall clock, so the same input always gives the same image bytes.
    """

    def __init__(self, image: str | os.PathLike[str], *, writable: bool = False, epoch: int | None = None):
        self.image = os.fspath(image)
        argv = [find_tool("debugfs")]
        if writable:
            argv.append("-w")
        argv += ["-f", "-", self.image]
        env = {**os.environ, "DEBUGFS_PAGER": "__none__", "PAGER": "__none__"}
        env.pop("DEBUGFS_LOGFILE", None)
        if epoch is not None:
            env["E2FSPROGS_FAKE_TIME"] = str(max(1, epoch))
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._cond = threading.Condition()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._out = _Pipe(self.proc.stdout.fileno(), self._cond)
        self._err = _Pipe(self.proc.stderr.fileno(), self._cond)
        self._nonce = secrets.token_hex(8).encode()
        self._seq = 0
        self.commands = 0
        self._closed = False

    # -- protocol --------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()

    def _died(self) -> None:
        self.proc.wait(timeout=30)
        err = bytes(self._err.data).decode("utf-8", "replace").strip()
        raise Ext4Error(f"debugfs exited (rc {self.proc.returncode}): {err[-500:]}", path=self.image)

    def _sync(self) -> tuple[bytes, list[str]]:
        """Wait for everything sent so far; return its stdout and its error lines."""
        self._seq += 1
        tag = self._nonce + b"-%d" % self._seq
        out_mark = b"# obd-" + tag + b"\n"
        err_mark = b"Command not found obd-" + tag
        self._write(out_mark + b"obd-" + tag + b"\n")
        deadline = time.monotonic() + BATCH_TIMEOUT
        out_from = err_from = 0
        with self._cond:
            while True:
                oi = self._out.data.find(out_mark, out_from)
                ei = self._err.data.find(err_mark, err_from)
                if oi >= 0 and ei >= 0:
                    break
                # next time, search only what arrives (a mark may straddle the old end)
                if oi < 0:
                    out_from = max(0, len(self._out.data) - len(out_mark))
                if ei < 0:
                    err_from = max(0, len(self._err.data) - len(err_mark))
                if self._out.eof or self._err.eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self.proc.kill()
                    raise Ext4Error("debugfs did not answer in time", path=self.image)
                self._cond.wait(min(left, 1.0))
            if oi < 0 or ei < 0:
                self._died()
            out = bytes(self._out.data[:oi])
            del self._out.data[: oi + len(out_mark)]
            bol = self._err.data.rfind(b"\n", 0, ei) + 1
            eol = self._err.data.find(b"\n", ei)
            eol = len(self._err.data) if eol < 0 else eol + 1
            err = bytes(self._err.data[:bol])
            del self._err.data[:eol]
        return out, _errors(err)

    # -- public ----------------------------------------------------------------------------------

    def run(self, commands: Sequence[bytes]) -> list[bytes]:
        """Run ``commands`` (no line breaks) and return each one's stdout; stderr output is an error."""
        if not commands:
            return []
        self._write(b"".join(c + b"\n" for c in commands))
        self.commands += len(commands)
        out, errors = self._sync()
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise Ext4Error(f"debugfs: {errors[0]}{more}", path=self.image)
        return _split(out, commands)

    def execute(self, commands: Iterable[bytes], *, batch: int = 20000) -> None:
        """Run ``commands`` for their effect, ``batch`` at a time; the first error stops with
        :class:`Ext4Error` naming the batch's commands around it."""
        pending: list[bytes] = []
        for cmd in commands:
            pending.append(cmd)
            if len(pending) >= batch:
                self._execute(pending)
                pending = []
        if pending:
            self._execute(pending)

    def _execute(self, commands: list[bytes]) -> None:
        self._write(b"".join(c + b"\n" for c in commands))
        self.commands += len(commands)
        _, errors = self._sync()
        if errors:
            raise Ext4Error(
                f"debugfs failed: {errors[0]}"
                + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""),
                path=self.image,
            )

    def listdirs(self, inodes: Sequence[int]) -> list[list[tuple[bytes, int, int]]]:
        """The entries ``(name, inode, mode)`` of each directory inode."""
        outs = self.run([b"ls -p <%d>" % ino for ino in inodes])
        return [parse_ls(o) for o in outs]

    def links(self, inodes: Sequence[int]) -> list[int]:
        """The link count of each inode."""
        return [parse_links(o) for o in self.run([b"stat <%d>" % ino for ino in inodes])]

    def close(self) -> None:
        """End the session: debugfs closes (and so flushes) the file system on end of input."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=BATCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Ext4Error("debugfs did not exit", path=self.image) from None
        self._out.thread.join(10)
        self._err.thread.join(10)
        tail = _errors(bytes(self._err.data))
        for p in (self.proc.stdout, self.proc.stderr):
            if p is not None:
                p.close()
        if tail:
            raise Ext4Error(f"debugfs reported on exit: {tail[0]}", path=self.image)

    def abort(self) -> None:
        """Stop without waiting for outstanding work (the image is to be thrown away)."""
        if self._closed:
            return
        self._closed = True
        self.proc.kill()
        self.proc.wait()
        for p in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if p is not None:
                try:
                    p.close()
                except OSError:
                    pass

    def __enter__(self) -> Debugfs:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _errors(err: bytes) -> list[str]:
    """The error lines of some stderr output: all but the banner and our own markers."""
    return [
        line.decode("utf-8", "replace").strip()
        for line in err.splitlines()
        if line.strip() and not _BANNER.match(line) and b"Command not found obd-" not in line
    ]


def _split(out: bytes, commands: Sequence[bytes]) -> list[bytes]:
    """Cut a batch's stdout at the echo lines ``debugfs: <command>`` debugfs prints before each."""
    results = []
    pos = 0
    # the echo of the previous batch's error-marker command may lead
    if out.startswith(b"debugfs: obd-"):
        pos = out.index(b"\n") + 1
    marks = [b"debugfs: " + c + b"\n" for c in commands]
    for i, mark in enumerate(marks):
        if not out.startswith(mark, pos):
            start = out.find(mark, pos)
            if start < 0:
                raise Ext4Error(f"debugfs output lacks the echo of {commands[i]!r}")
            pos = start
        body = pos + len(mark)
        end = out.find(marks[i + 1], body) if i + 1 < len(marks) else len(out)
        if end < 0:
            raise Ext4Error(f"debugfs output lacks the echo of {commands[i + 1]!r}")
        results.append(out[body:end])
        pos = end
    return results


def run_tool(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    """Run an e2fsprogs program; its combined output, or :class:`Ext4Error` if it fails."""
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode != 0:
        raise Ext4Error(f"{os.path.basename(argv[0])} failed (rc {proc.returncode}): {text.strip()[-800:]}")
    return text


__all__ = ["Debugfs", "Ext4Error", "find_tool", "parse_links", "parse_ls", "quote", "run_tool"]
