"""Boot a disk in a QEMU ``microvm``, run one command in it, and return its output and exit code.

The guest side is ``initramfs_init.sh`` (see :mod:`frontends.run.vm.assets`); this module builds the QEMU
command line, passes the command to the init (``obd.cmd=`` on the kernel command line, or a file
appended to the initramfs when it is too long), reads the serial console, and splits it into boot
noise, the command's output and the exit code using marker lines that carry a per-boot random nonce.

``accel="auto"`` tries KVM with a tiny probe boot of the same kernel and initramfs and falls back to
TCG when the probe fails or hangs (present-but-unusable KVM, such as nested PVM, is common on cloud
VMs). The result is remembered per process and, keyed by the host's boot id, in the asset cache.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from frontends.run.vm.assets import Assets
from frontends.run.vm.cpio import CpioWriter
from obd.errors import ConfigError, ObdError
from obd.io.publish import publish_bytes

#: The PATH a command gets when its environment has none (Docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: x86 kernels keep at most 2048 bytes of command line; a longer command goes into the initramfs.
CMDLINE_LIMIT = 2000

#: How long the KVM probe boot may take before KVM counts as unusable.
KVM_PROBE_TIMEOUT = 5.0

#: After the exit marker the guest only syncs and powers off; give QEMU this long to exit.
SHUTDOWN_GRACE = 15.0

ENCODING_VERSION = "1"

OutputCallback = Callable[[bytes], None]


class VMError(ObdError):
    """The VM could not run the command (QEMU failed, no root filesystem, the guest died...).

    ``console`` holds the tail of the serial console for diagnosis, ``output`` what the command had
    written so far.
    """

    def __init__(self, message: str, *, console: bytes = b"", output: bytes = b"", **kwargs):
        super().__init__(message, **kwargs)
        self.console = console
        self.output = output


class GuestError(VMError):
    """The guest reported a setup error (``OBD-ERROR``) or ended without reporting an exit code."""


class VMTimeoutError(VMError):
    """The time limit ran out; QEMU was killed."""


@dataclass(frozen=True)
class NbdDisk:
    """An NBD export as the VM's disk: a unix socket or a TCP server, plus an export name."""

    socket: str | None = None
    host: str | None = None
    port: int = 10809
    export: str = ""
    reconnect_delay: int | None = None
    """Seconds QEMU keeps retrying a lost connection before failing requests (QEMU ``reconnect-delay``)."""

    @classmethod
    def parse(cls, uri: str, *, reconnect_delay: int | None = None) -> NbdDisk:
        """``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT`` (the NBD URI standard)."""
        parts = urlsplit(uri)
        export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
        if parts.scheme == "nbd+unix":
            sockets = parse_qs(parts.query).get("socket")
            if not sockets:
                raise ConfigError("an nbd+unix URI needs ?socket=PATH", field="disk", value=uri)
            return cls(socket=sockets[0], export=export, reconnect_delay=reconnect_delay)
        if parts.scheme == "nbd":
            if not parts.hostname:
                raise ConfigError("an nbd:// URI needs a host", field="disk", value=uri)
            return cls(
                host=parts.hostname, port=parts.port or 10809, export=export, reconnect_delay=reconnect_delay
            )
        raise ConfigError("not an NBD URI (nbd+unix:// or nbd://)", field="disk", value=uri)

    def blockdev(self, *, readonly: bool) -> dict:
        if self.socket is not None:
            server: dict = {"type": "unix", "path": str(self.socket)}
        elif self.host is not None:
            server = {"type": "inet", "host": self.host, "port": str(self.port)}
        else:
            raise ConfigError("an NBD disk needs a socket or a host", field="disk")
        node: dict = {"driver": "nbd", "server": server, "read-only": readonly}
        if self.export:
            node["export"] = self.export
        if self.reconnect_delay is not None:
            node["reconnect-delay"] = int(self.reconnect_delay)
        return node


Disk = str | os.PathLike[str] | NbdDisk


@dataclass
class BootResult:
    """What one :func:`boot` produced."""

    exit_code: int
    output: bytes
    """Everything the command wrote to stdout and stderr (one stream: both are the serial console)."""
    timings: dict[str, float]
    """Seconds: ``boot`` (launch to command start), ``command``, ``shutdown``, ``total``; ``accel_probe``
    when this call ran the KVM probe."""
    accel: str = "tcg"
    console: bytes = field(default=b"", repr=False)
    """Serial console before the command started (kernel and init messages), for diagnosis."""


# --- the command encoding --------------------------------------------------------------------------


def _to_bytes(value: str | bytes, what: str) -> bytes:
    raw = value if isinstance(value, bytes) else os.fsencode(value)
    if b"\0" in raw:
        raise ConfigError("contains a NUL byte", field=what, value=value)
    return raw


def _env_entries(env: Mapping[str, str] | Sequence[str] | None) -> list[bytes]:
    if env is None:
        items: list[bytes] = []
    elif isinstance(env, Mapping):
        items = []
        for name, value in env.items():
            name_b = _to_bytes(name, "env")
            if not name_b or b"=" in name_b:
                raise ConfigError("environment variable names must be non-empty and without '='", value=name)
            items.append(name_b + b"=" + _to_bytes(value, f"env.{name}"))
    else:
        items = []
        for entry in env:
            raw = _to_bytes(entry, "env")
            if raw.find(b"=") < 1:
                raise ConfigError("environment entries must look like NAME=value", field="env", value=entry)
            items.append(raw)
    if not any(item.startswith(b"PATH=") for item in items):
        items.insert(0, b"PATH=" + DEFAULT_PATH.encode())
    return items


def encode_command(
    argv: Sequence[str | bytes],
    *,
    env: Mapping[str, str] | Sequence[str] | None = None,
    workdir: str | bytes | None = None,
    user: str | bytes | None = None,
) -> str:
    """The ``obd.cmd=`` value: ``1`` then base64 fields (``-`` for empty), comma-separated.

    Fields: workdir, user, number of environment entries, the entries, the argv elements. Base64
    leaves nothing for the kernel's command-line parser or the init's shell to interpret.
    A missing ``PATH`` is set to :data:`DEFAULT_PATH`; ``workdir`` must be absolute.
    """
    if not argv:
        raise ConfigError("the command is empty", field="argv")
    wd = _to_bytes(workdir if workdir is not None else "/", "workdir")
    if not wd.startswith(b"/"):
        raise ConfigError("the working directory must be an absolute path", field="workdir", value=workdir)
    entries = _env_entries(env)
    values = [
        wd,
        _to_bytes(user or "", "user"),
        str(len(entries)).encode(),
        *entries,
        *(_to_bytes(a, "argv") for a in argv),
    ]
    fields = [base64.b64encode(v).decode("ascii") if v else "-" for v in values]
    return ",".join([ENCODING_VERSION, *fields])


def decode_command(spec: str) -> dict:
    """Inverse of :func:`encode_command` (what the init does): ``{argv, env, workdir, user}`` as bytes."""
    version, *fields = spec.split(",")
    if version != ENCODING_VERSION or len(fields) < 3:
        raise ConfigError("not an obd command encoding", value=spec[:40])
    values = [b"" if f == "-" else base64.b64decode(f, validate=True) for f in fields]
    count = int(values[2])
    return {
        "workdir": values[0],
        "user": values[1],
        "env": values[3 : 3 + count],
        "argv": values[3 + count :],
    }


# --- the console protocol --------------------------------------------------------------------------


class ConsoleScanner:
    """Splits the serial console into boot messages, command output and the result markers.

    Feed it bytes as they arrive (any chunking); output bytes go to ``on_output`` as soon as they
    cannot be the start of the exit marker. The markers carry the boot's nonce, so command output
    cannot be mistaken for them by accident.
    """

    def __init__(self, nonce: str, on_output: OutputCallback | None = None):
        self._start = f"OBD-START-{nonce}".encode()
        self._exit = f"OBD-EXIT-{nonce}: ".encode()
        self._error = f"OBD-ERROR-{nonce}: ".encode()
        self._probe = f"OBD-PROBE-OK-{nonce}".encode()
        self._on_output = on_output
        self._pending = bytearray()
        self.state = "boot"  # boot -> run -> done
        self.console = bytearray()
        self.output = bytearray()
        self.tail = bytearray()
        self.exit_code: int | None = None
        self.error: str | None = None
        self.probe_ok = False
        self.started_at: float | None = None
        self.exited_at: float | None = None

    def feed(self, data: bytes) -> None:
        self._pending += data
        while self._pending:
            before = len(self._pending), self.state
            if self.state == "boot":
                self._scan_boot()
            elif self.state == "run":
                self._scan_run()
            else:
                self.tail += self._pending
                del self._pending[:]
            if (len(self._pending), self.state) == before:
                return  # need more bytes

    def _scan_boot(self) -> None:
        buf = self._pending
        newline = buf.rfind(b"\n")
        if newline < 0:
            return
        # Whole lines only: a marker is never split across feeds.
        lines = bytes(buf[: newline + 1])
        del buf[: newline + 1]
        at = 0
        while at < len(lines):
            end = lines.index(b"\n", at) + 1
            line = lines[at:end]
            at = end
            self.console += line
            text = line.rstrip(b"\r\n")
            if self._error in text:
                msg = text.split(self._error, 1)[1].decode("utf-8", "replace")
                self.error = msg if self.error is None else self.error
            elif self._probe in text:
                self.probe_ok = True
            elif self._start in text:
                self.state = "run"
                self.started_at = time.monotonic()
                self._pending[:0] = lines[at:]
                return

    def _scan_run(self) -> None:
        buf = self._pending
        marker = self._exit
        idx = buf.find(marker)
        if idx < 0:
            keep = 0
            for k in range(min(len(buf), len(marker) - 1), 0, -1):
                if buf.endswith(marker[:k]):
                    keep = k
                    break
            self._emit(bytes(buf[: len(buf) - keep]))
            del buf[: len(buf) - keep]
            return
        end = buf.find(b"\n", idx)
        if idx:
            self._emit(bytes(buf[:idx]))
            del buf[:idx]
            return
        if end < 0:
            return
        value = bytes(buf[len(marker) : end]).strip()
        try:
            self.exit_code = int(value)
        except ValueError:
            self.error = f"malformed exit marker {value[:20]!r}"
        self.exited_at = time.monotonic()
        self.state = "done"
        del buf[: end + 1]

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.output += data
        if self._on_output is not None:
            self._on_output(data)


def write_stdout(chunk: bytes) -> None:
    """An ``on_output`` callback streaming the command's output to this process's stdout."""
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        out.write(chunk)
    else:
        sys.stdout.write(chunk.decode("utf-8", "replace"))
    sys.stdout.flush()


# --- QEMU ------------------------------------------------------------------------------------------


def find_qemu(qemu: str | None = None) -> str:
    """Full path of the QEMU binary (``$OBD_QEMU`` or ``qemu-system-x86_64``)."""
    name = qemu or os.environ.get("OBD_QEMU") or "qemu-system-x86_64"
    found = shutil.which(name)
    if found is None:
        raise ObdError(
            f"{name} not found: install the Debian package qemu-system-x86", field="qemu", value=name
        )
    return found


def _accel_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        return ["-accel", "tcg"]
    raise ConfigError("accel must be 'auto', 'kvm' or 'tcg'", field="accel", value=accel)


def _disk_args(disk: Disk, *, readonly: bool, extra: Mapping | None) -> list[str]:
    if isinstance(disk, str) and disk.startswith(("nbd://", "nbd+unix://")):
        disk = NbdDisk.parse(disk)
    if isinstance(disk, NbdDisk):
        node = disk.blockdev(readonly=readonly)
    else:
        path = Path(disk)
        if not path.exists():
            raise ObdError("disk image not found", path=path)
        node = {"driver": "raw", "read-only": readonly, "file": {"driver": "file", "filename": str(path)}}
    node["node-name"] = "d0"
    if extra:
        node.update(extra)
    return ["-blockdev", json.dumps(node), "-device", "virtio-blk-device,drive=d0"]


def qemu_command(
    assets: Assets,
    *,
    cmdline: str,
    initrd: str | os.PathLike[str],
    accel: str,
    disk_args: Sequence[str] = (),
    memory_mib: int = 512,
    cpus: int = 1,
    qemu: str | None = None,
) -> list[str]:
    """The QEMU argv for one microvm boot (serial console on stdout, no other devices)."""
    return [
        find_qemu(qemu),
        "-M",
        "microvm",
        *_accel_args(accel),
        "-m",
        str(int(memory_mib)),
        "-smp",
        str(int(cpus)),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(assets.kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        *disk_args,
    ]


_libc = None


def _child_setup() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: QEMU dies if we are killed outright
    # A QEMU that aborts (the KVM probe on a host whose KVM cannot run the guest) dumps no core.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _spawn(argv: list[str]) -> subprocess.Popen:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(None, use_errno=True)
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop QEMU ourselves
        preexec_fn=_child_setup,
    )


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _pump(
    proc: subprocess.Popen, scanner: ConsoleScanner, deadline: float | None, stop: Callable[[], bool]
) -> tuple[bytes, bool]:
    """Read QEMU's stdout into ``scanner`` and collect stderr until both close, ``stop()`` or ``deadline``.

    Returns (stderr bytes, whether the deadline passed).
    """
    assert proc.stdout is not None and proc.stderr is not None
    errors = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        while sel.get_map():
            if stop():
                return bytes(errors), False
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return bytes(errors), True
            for key, _ in sel.select(None if wait is None else min(wait, 1.0)):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.data == "out":
                    scanner.feed(data)
                elif len(errors) < 1 << 20:
                    errors += data
    return bytes(errors), False


def _tail(data: bytes | bytearray, lines: int = 25) -> str:
    text = bytes(data).replace(b"\r", b"").decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


# --- KVM or TCG ------------------------------------------------------------------------------------

_accel_memo: dict[str, str] = {}
_accel_lock = threading.Lock()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def probe_kvm(assets: Assets, *, timeout: float = KVM_PROBE_TIMEOUT, qemu: str | None = None) -> bool:
    """True when a KVM boot of ``assets`` reaches the init's userspace within ``timeout`` seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    nonce = secrets.token_hex(8)
    cmdline = f"{assets.cmdline_base} obd.probe=1 obd.nonce={nonce}"
    argv = qemu_command(
        assets, cmdline=cmdline, initrd=assets.initramfs, accel="kvm", memory_mib=256, qemu=qemu
    )
    scanner = ConsoleScanner(nonce)
    proc = _spawn(argv)
    try:
        _pump(proc, scanner, time.monotonic() + timeout, lambda: scanner.probe_ok)
    finally:
        _kill(proc)
    return scanner.probe_ok


def resolve_accel(
    assets: Assets, accel: str = "auto", *, qemu: str | None = None, probe_timeout: float = KVM_PROBE_TIMEOUT
) -> str:
    """``"kvm"`` or ``"tcg"``: ``auto`` probes KVM once per host boot (remembered in the asset cache)."""
    return _resolve_accel(assets, accel, qemu=qemu, probe_timeout=probe_timeout)[0]


def _resolve_accel(assets: Assets, accel: str, *, qemu: str | None, probe_timeout: float) -> tuple[str, bool]:
    """(accelerator, whether a probe boot ran for this answer)."""
    if accel != "auto":
        _accel_args(accel)
        return accel, False
    qemu_path = find_qemu(qemu)
    try:
        st = os.stat(qemu_path)
        qemu_id = f"{os.path.realpath(qemu_path)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        qemu_id = qemu_path
    key = f"{_boot_id()}|{qemu_id}|{assets.kernel_version}|{assets.kernel.name}"
    probed = False
    with _accel_lock:
        if key in _accel_memo:
            return _accel_memo[key], False
        memo_file = Path(assets.cache_dir) / "accel-probe.json"
        try:
            saved = json.loads(memo_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        if not isinstance(saved, dict) or saved.get("key") != key or saved.get("accel") not in ("kvm", "tcg"):
            result = "kvm" if probe_kvm(assets, timeout=probe_timeout, qemu=qemu_path) else "tcg"
            probed = True
            with contextlib.suppress(OSError):  # without the memo the next process probes again
                memo = {"key": key, "accel": result, "probed": time.time()}
                publish_bytes(memo_file, json.dumps(memo).encode(), durable=False)
        else:
            result = saved["accel"]
        _accel_memo[key] = result
        return result, probed


# --- boot ------------------------------------------------------------------------------------------


def boot(
    assets: Assets,
    disk: Disk,
    argv: Sequence[str | bytes],
    *,
    env: Mapping[str, str] | Sequence[str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    readonly: bool = True,
    memory_mib: int = 512,
    cpus: int = 1,
    timeout: float | None = 300.0,
    accel: str = "auto",
    extra_drive_opts: Mapping | None = None,
    extra_cmdline: str = "",
    on_output: OutputCallback | None = None,
    qemu: str | None = None,
) -> BootResult:
    """Boot ``disk`` (an ext4 root) in a microvm, run ``argv`` in it, return its exit code and output.

    ``disk`` is an image file, an :class:`NbdDisk` or an NBD URI (``nbd+unix:///?socket=PATH``).
    ``env`` (a mapping or ``NAME=value`` list; ``PATH`` defaults to :data:`DEFAULT_PATH`), ``workdir``
    (absolute, default ``/``) and ``user`` (OCI ``user[:group]``, names from the image's passwd/group,
    default root) apply to the command; ``argv[0]`` is looked up in the command's ``PATH`` inside the
    image. ``readonly=False`` mounts the root read-write and syncs it before the exit is reported.
    ``extra_drive_opts`` are merged into the disk's ``-blockdev`` JSON (e.g. ``{"cache": {"direct": True}}``).

    The output (stdout and stderr interleaved, as written) is passed to ``on_output`` as it arrives
    (:func:`write_stdout` streams it to the terminal) and returned in the result. ``timeout`` bounds
    the whole call: QEMU is killed and :class:`VMTimeoutError` raised. QEMU is killed on any
    exception (Ctrl-C included) and temporary files are removed. A guest that cannot run the command
    raises :class:`GuestError` with the console tail; a missing command gives exit code 127.
    """
    t0 = time.monotonic()
    deadline = None if timeout is None else t0 + timeout
    spec = encode_command(argv, env=env, workdir=workdir, user=user)
    nonce = secrets.token_hex(8)
    timings: dict[str, float] = {}
    accel, probed = _resolve_accel(assets, accel, qemu=qemu, probe_timeout=KVM_PROBE_TIMEOUT)
    if probed:
        timings["accel_probe"] = time.monotonic() - t0
    disk_args = _disk_args(disk, readonly=readonly, extra=extra_drive_opts)

    words = [assets.cmdline_base, "ro" if readonly else "rw", f"obd.nonce={nonce}"]
    if extra_cmdline:
        words.append(extra_cmdline)
    with contextlib.ExitStack() as stack:
        initrd: Path = assets.initramfs
        inline = " ".join([*words, f"obd.cmd={spec}"])
        if len(inline) <= CMDLINE_LIMIT:
            cmdline = inline
        else:
            cmdline = " ".join(words)
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="obd-vm-")))
            initrd = tmp / "initrd"
            _write_initrd_with_command(initrd, assets.initramfs, spec)
        argv_qemu = qemu_command(
            assets,
            cmdline=cmdline,
            initrd=initrd,
            accel=accel,
            disk_args=disk_args,
            memory_mib=memory_mib,
            cpus=cpus,
            qemu=qemu,
        )
        scanner = ConsoleScanner(nonce, on_output)
        launched = time.monotonic()
        proc = _spawn(argv_qemu)
        stack.callback(_kill, proc)
        stderr, timed_out = _pump(proc, scanner, deadline, lambda: scanner.state == "done")
        if scanner.state == "done" and not timed_out:
            grace = time.monotonic() + SHUTDOWN_GRACE
            more, _ = _pump(proc, scanner, grace if deadline is None else min(grace, deadline), lambda: False)
            stderr += more
        if timed_out:
            log = _tail(scanner.console + scanner.tail)
            raise VMTimeoutError(
                f"the VM did not finish within {timeout} s; QEMU was killed\n{log}",
                console=bytes(scanner.console),
                output=bytes(scanner.output),
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=SHUTDOWN_GRACE if scanner.state != "done" else 1)
        ended = time.monotonic()

    if scanner.started_at is None:
        console = bytes(scanner.console + scanner.tail)
        if scanner.error is not None:
            message = f"the guest could not run the command: {scanner.error}"
        elif proc.returncode not in (0, None) and stderr.strip():
            raise VMError(
                f"QEMU failed (exit {proc.returncode}): {_tail(stderr, 5)}", console=console, field="qemu"
            )
        else:
            message = "the guest stopped before the command started"
        raise GuestError(f"{message}\n{_tail(console)}", console=console, output=bytes(scanner.output))
    if scanner.exit_code is None:
        console = bytes(scanner.console + scanner.output[-4096:] + scanner.tail)
        reason = scanner.error or "the VM stopped before the command's exit code was reported"
        raise GuestError(f"{reason}\n{_tail(stderr, 5)}", console=console, output=bytes(scanner.output))

    timings["boot"] = scanner.started_at - launched
    timings["command"] = (scanner.exited_at or ended) - scanner.started_at
    timings["shutdown"] = ended - (scanner.exited_at or ended)
    timings["total"] = ended - t0
    return BootResult(
        exit_code=scanner.exit_code,
        output=bytes(scanner.output),
        timings=timings,
        accel=accel,
        console=bytes(scanner.console),
    )


def _write_initrd_with_command(out: Path, initramfs: Path, spec: str) -> None:
    """A per-boot initrd: a small cpio holding ``/obd/cmd``, then the cached initramfs.

    The kernel unpacks concatenated archives one after the other (each must start 4-byte aligned;
    :meth:`CpioWriter.finish` pads to 512).
    """
    cpio = CpioWriter()
    cpio.add_dir("obd")
    cpio.add_file("obd/cmd", spec.encode("ascii"), 0o600)
    with open(out, "wb") as dst, open(initramfs, "rb") as src:
        dst.write(cpio.finish())
        shutil.copyfileobj(src, dst, 1 << 20)
