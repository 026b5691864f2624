"""``obd run``: run a command in a fresh microVM whose root disk is an overlaybd image, read lazily.

One run, start to end (:func:`run_image`):

1. **resolve** the image once, in this process: a registry reference becomes its manifest, its OCI
   config (how to run it: ``Entrypoint``, ``Cmd``, ``Env``, ``WorkingDir``, ``User``) and an
   overlaybd ``config.v1.json`` of ``digest`` lowers under a ``repoBlobUrl`` — nothing else is
   fetched; ``oci:DIR[:TAG]`` layouts, layer files and ``config.v1.json`` files work too;
2. **serve** it: nbdkit with obd's nbd plugin (:func:`obd.host.nbdkit.plugin_path`, with a
   statistics file) on a Unix socket in a private temporary directory, in the foreground as our
   child (``--exit-with-parent``); a trace can be replayed into the block cache from the start
   (``trace=``) or recorded (``record-trace=``);
3. **boot** QEMU ``-M microvm`` with that socket as its virtio-blk root disk (KVM when a probe boot
   proves it works, else TCG; see :mod:`frontends.run.vm`) and run the command the way Docker would;
   its output (stdout and stderr, one stream: the serial console) is streamed as it arrives;
4. **tear down** in every case — normal exit, error, timeout, Ctrl-C: QEMU is killed, nbdkit is
   stopped (so it writes the trace and its statistics), the temporary directory with the socket
   is removed.

The root is writable, as in ``docker run``: the writes land in an overlaybd RW layer in an *upper
directory* (:mod:`obd.image.upper`). By default that is a throw-away one in the run's temporary
directory, deleted with it (:func:`root_disk`); with ``--rw [DIR]`` or ``--snapshot NAME`` it is kept:
``obd snapshot DIR`` commits its writes into a layer, ``obd fork DIR NEW`` branches off, and later runs
of the same directory see them. ``--read-only`` serves the image as it is (the guest mounts it
read-only, with tmpfs on ``/tmp`` and ``/run``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frontends.run.vm import NbdDisk, boot, ensure_assets
from obd.errors import ConfigError, ObdError
from obd.host.nbdkit import find_nbdkit, nbdkit_env, plugin_path
from obd.image.config import ImageConfig
from obd.image.remote import RemoteOptions
from obd.io.publish import publish_bytes
from obd.registry.blob import READAHEAD_AUTO

#: How long nbdkit may take to open the image and listen (a slow registry makes this long).
SERVER_START_TIMEOUT = 120.0
#: How long nbdkit gets to write its trace and statistics after QEMU is gone.
SERVER_STOP_TIMEOUT = 15.0
#: The environment variable naming where named sandboxes (``--snapshot NAME``) keep their state.
STATE_ENV = "OBD_STATE_DIR"

OutputCallback = Callable[[bytes], None]
Say = Callable[[str], None]


# --- images -----------------------------------------------------------------------------------------


@dataclass
class ResolvedImage:
    """An image ready to serve: its overlaybd config and how to run it."""

    config: ImageConfig
    """``config.v1.json`` with every path absolute (registry lowers: digests under ``repoBlobUrl``)."""
    process: dict[str, Any]
    """The OCI image config's ``config`` object (``Entrypoint``, ``Cmd``, ``Env``...); may be empty."""
    label: list[str]
    """The image as given (paths absolute), as upper directories record it."""
    reference: str | None = None
    """The registry reference (with the manifest digest), when it came from a registry."""


def resolve_image(
    image: str | Sequence[str], remote: RemoteOptions, *, platform: str | None = None
) -> ResolvedImage:
    """Resolve ``image`` (registry reference, ``oci:DIR[:TAG]``, layer files, ``config.v1.json``).

    A registry image costs its manifest and config (plus a token round trip on registries that
    want one); the layers are not touched.
    """
    from obd.image.resolve import image_config, image_label, looks_like_reference

    specs = [image] if isinstance(image, str) else list(image)
    if not specs:
        raise ConfigError("no image given", field="image")
    label = image_label(specs)
    if len(specs) == 1 and not os.path.exists(specs[0]) and looks_like_reference(specs[0]):
        from dataclasses import replace

        from obd.image.remote import image_to_config
        from obd.image.remote import resolve_image as resolve_remote

        opts = remote if not platform or platform == remote.platform else replace(remote, platform=platform)
        ref, img = resolve_remote(specs[0], opts)
        cfg = image_to_config(ref, img, opts, label=specs[0])
        return ResolvedImage(cfg, _process_config(img.config), label, f"{ref}@{img.manifest_digest}")
    cfg = image_config(specs, platform=platform, remote=remote)
    process: dict[str, Any] = {}
    if len(specs) == 1 and specs[0].startswith("oci:"):
        from obd.oci.layout import OCILayout, parse_oci_reference

        root, tag = parse_oci_reference(specs[0])
        process = _process_config(OCILayout(root).resolve(tag, platform=platform).config)
    return ResolvedImage(cfg, process, label)


def _process_config(oci_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run-relevant part of an OCI image config, type-checked (bad types are dropped, not fatal)."""
    inner = (oci_config or {}).get("config") if isinstance(oci_config, Mapping) else None
    if not isinstance(inner, Mapping):
        return {}
    out: dict[str, Any] = {}
    for key in ("Entrypoint", "Cmd", "Env"):
        value = inner.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = list(value)
    for key in ("WorkingDir", "User"):
        value = inner.get(key)
        if isinstance(value, str) and value:
            out[key] = value
    return out


# --- the command, the Docker way ----------------------------------------------------------------------


def command_line(
    process: Mapping[str, Any], args: Sequence[str], *, entrypoint: Sequence[str] | None = None
) -> list[str]:
    """What runs: the entrypoint, then ``args`` or else the image's ``Cmd`` (``docker run`` rules).

    ``entrypoint`` replaces the image's (an empty list removes it) and, as in Docker, also drops
    the image's ``Cmd``.
    """
    entry = list(entrypoint) if entrypoint is not None else list(process.get("Entrypoint") or [])
    if args:
        rest = list(args)
    elif entrypoint is not None:
        rest = []
    else:
        rest = list(process.get("Cmd") or [])
    argv = entry + rest
    if not argv:
        raise ConfigError(
            "no command: give one after `--` (the image has no Entrypoint or Cmd)", field="command"
        )
    return argv


def environment(
    process: Mapping[str, Any], overrides: Sequence[str] = (), *, host: Mapping[str, str] | None = None
) -> list[str]:
    """The image's ``Env`` with ``overrides`` applied (``NAME=value``, or ``NAME`` for the host's value)."""
    host = os.environ if host is None else host
    order: list[str] = []
    values: dict[str, str] = {}

    def put(entry: str, where: str) -> None:
        name, sep, value = entry.partition("=")
        if not name:
            raise ConfigError("environment entries look like NAME=value", field=where, value=entry)
        if not sep:
            if name not in host:
                return  # docker: `-e NAME` with NAME unset on the host sets nothing
            value = host[name]
        if name not in values:
            order.append(name)
        values[name] = value

    for entry in process.get("Env") or []:
        put(entry, "image Env")
    for entry in overrides:
        put(entry, "env")
    return [f"{name}={values[name]}" for name in order]


# --- the server ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:  # between fork and exec
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NbdServer:
    """nbdkit serving one image on a Unix socket in ``workdir``, as a child of this process."""

    def __init__(
        self,
        workdir: Path,
        params: Sequence[str],
        *,
        threads: int = 16,
        verbose: bool = False,
        log_path: str | os.PathLike[str] | None = None,
    ):
        self.workdir = workdir
        self.socket = workdir / "disk.sock"
        self.log_path = Path(log_path) if log_path else workdir / "nbdkit.log"
        self.stats_path = workdir / "server-stats.json"
        self.argv = [
            find_nbdkit(),
            "-f",
            "--exit-with-parent",
            "-U",
            str(self.socket),
            "-t",
            str(threads),
            *(["-v"] if verbose else []),
            "python",
            str(plugin_path()),
            *params,
            f"stats-file={self.stats_path}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, env: Mapping[str, str] | None = None, timeout: float = SERVER_START_TIMEOUT) -> None:
        """Start nbdkit and wait until it listens; a failure raises with nbdkit's own message."""
        self.spawn(env=env)
        self.wait_ready(timeout)

    def spawn(self, *, env: Mapping[str, str] | None = None) -> None:
        """Start nbdkit (it loads the engine and opens the image before it listens: see wait_ready)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=nbdkit_env(dict(env) if env is not None else None),
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop nbdkit after QEMU
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        """Wait until nbdkit listens; a failure raises with nbdkit's own message."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise ObdError(f"the nbd server could not start:\n{self.log_tail()}", field="nbdkit")
            if time.monotonic() > deadline:
                raise ObdError(f"the nbd server did not listen within {timeout:.0f} s", field="nbdkit")
            time.sleep(0.005)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT) -> None:
        """SIGTERM (nbdkit closes the image, saving a recorded trace and its statistics), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def stats(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stats_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def remote_params(remote: RemoteOptions) -> list[str]:
    """nbdkit plugin parameters that carry ``remote`` (credentials travel in the environment)."""
    params: list[str] = []
    if remote.insecure is True:
        params.append("insecure-registry=true")
    else:
        params += [f"insecure-registry={h}" for h in remote.insecure or ()]
    if not remote.tls_verify:
        params.append("tls-verify=false")
    if remote.ca_file:
        params.append(f"ca-file={os.path.abspath(remote.ca_file)}")
    if remote.no_cache:
        params.append("no-cache=true")
    if remote.cache_dir:
        params.append(f"cache-dir={os.path.abspath(remote.cache_dir)}")
    if remote.cache_limit:
        params.append(f"cache-limit={remote.cache_limit}")
    if remote.readahead != READAHEAD_AUTO:
        params.append(f"readahead={remote.readahead}")
    params += [f"hosts-dir={os.path.abspath(d)}" for d in remote.hosts_dirs or ()]
    if remote.proxy:
        params.append(f"proxy={remote.proxy}")
    if remote.p2p is not None:
        p2p = remote.p2p
        params.append(f"{'p2p-proxy' if p2p.mode == 'proxy' else 'p2p-address'}={p2p.url}")
        params += [f"p2p-ping-url={p2p.ping_url}"] if p2p.ping_url else []
    return params


def _server_env(remote: RemoteOptions) -> dict[str, str]:
    from obd.registry.auth import ENV_PASSWORD, ENV_USER

    env = dict(os.environ)
    creds = remote.credentials
    if creds is not None and creds.username:
        env[ENV_USER] = creds.username
        env[ENV_PASSWORD] = creds.password
    return env


# --- upper directories ----------------------------------------------------------------------------


def state_dir() -> Path:
    """Named sandboxes' home: ``$OBD_STATE_DIR``, else ``$XDG_DATA_HOME/obd`` (``~/.local/share/obd``)."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "obd"


def sandbox_dir(name: str) -> Path:
    """The upper directory of the named sandbox ``name`` (``--snapshot NAME``)."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ConfigError("a sandbox name is a plain file name", field="snapshot", value=name)
    return state_dir() / "sandboxes" / name


def prepare_upper(
    path: str | os.PathLike[str],
    image: ResolvedImage | None,
    *,
    sparse: bool = False,
    remote: RemoteOptions | None = None,
) -> tuple[ImageConfig, dict[str, Any]]:
    """Create the upper directory over ``image`` on first use, or check and reopen it.

    Returns its config and the run config recorded in it (an existing directory may be used without
    naming its image again). The directory is left unlocked: the server takes the lock.
    """
    from obd.image.remote import set_default_remote_options
    from obd.image.upper import UpperDir

    ud = UpperDir(path)
    with ud.locked():
        if ud.exists():
            cfg = ud.load()
            meta = ud.meta(cfg)
            if image is not None and list(meta.get("image") or []) != image.label:
                raise ConfigError(
                    f"was made for image {' '.join(meta.get('image') or ['?'])}, not {' '.join(image.label)}",
                    path=ud.path,
                    field="obd.image",
                )
            process = meta.get("run")
            if not isinstance(process, dict):
                process = image.process if image is not None else {}
            return cfg, process
        if image is None:
            raise ConfigError("no image given, and this is not an upper directory yet", path=ud.path)
        if remote is not None:
            set_default_remote_options(remote)  # the new RW layer's parent uuid is read from the image
        cfg = ud.create(image.config, image=image.label, sparse=sparse, extra={"run": image.process})
        return cfg, image.process


def process_of_upper(path: str | os.PathLike[str], remote: RemoteOptions) -> dict[str, Any]:
    """The run config an upper directory recorded, or its image's (a fork records none)."""
    from obd.image.upper import UpperDir

    ud = UpperDir(path)
    meta = ud.meta(ud.load())
    if isinstance(meta.get("run"), dict):
        return meta["run"]
    label = meta.get("image") or []
    if label:
        with contextlib.suppress(ObdError):
            return resolve_image(label, remote).process
    return {}


# --- running --------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Everything about one run besides the image and the command arguments."""

    memory_mib: int = 512
    cpus: int = 1
    env: list[str] = field(default_factory=list)
    """``NAME=value`` (or ``NAME``: the host's value) on top of the image's ``Env``."""
    workdir: str | None = None
    user: str | None = None
    entrypoint: list[str] | None = None
    upper: str | None = None
    """An upper directory that keeps the writes (created on first use); None: a throw-away one."""
    read_only: bool = False
    """Serve the image read-only, with no upper directory at all (``docker run --read-only``)."""
    sparse: bool = False
    trace: str | None = None
    """A prefetch trace replayed into the block cache while the VM boots."""
    record_trace: str | None = None
    """Record the blocks this run reads into this trace file."""
    prefetch_meta: bool | str = True
    """Fetch the root file system's metadata in the background from the start: True or ``"inodes"``
    (superblock, group descriptors, used inode tables), ``"all"`` (also every directory), False."""
    prefetch_exec: bool = True
    """With ``prefetch_meta``: also fetch what starting the command reads (its path, ELF loader and
    libraries: :mod:`obd.prefetch.startup`)."""
    timeout: float | None = None
    accel: str = "auto"
    platform: str | None = None
    remote: RemoteOptions = field(default_factory=RemoteOptions)
    on_output: OutputCallback | None = None
    say: Say | None = None
    """Progress lines (what obd does, not the command's output)."""
    vm_cache_dir: str | None = None
    threads: int = 16
    nbdkit_verbose: bool = False
    server_log: str | None = None
    """Keep nbdkit's messages (``nbdkit_verbose``: its debug log too) in this file."""
    extra_cmdline: str = ""


@dataclass
class RunResult:
    exit_code: int
    output: bytes
    timings: dict[str, float]
    """Seconds from the start of :func:`run_image`: ``resolve``, ``server`` (nbdkit listening),
    ``first_output`` (the command's first byte), ``exit`` (its exit code arrived), ``total``;
    plus QEMU's own ``boot``/``command``/``shutdown`` durations."""
    stats: dict[str, Any]
    """The nbd server's fetch and cache counters (``bytes_fetched``, ``requests``, ``cache_hits``...)."""
    resolve_stats: dict[str, Any]
    accel: str
    upper: str | None = None
    """The kept upper directory (None for a throw-away or read-only root)."""
    argv: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RootDisk:
    """Where a run's writes go: the plan :func:`root_disk` makes before anything starts."""

    upper: str | None
    """The upper directory the nbd server writes to (absolute); None: the disk is read-only."""
    throwaway: bool = False
    """``upper`` lives in the run's temporary directory and is deleted with it."""

    @property
    def readonly(self) -> bool:
        return self.upper is None


def root_disk(options: RunOptions, runtime: str | os.PathLike[str]) -> RootDisk:
    """Docker's rule for the root: writable, the writes thrown away after the run unless kept.

    ``options.upper`` keeps them there; ``options.read_only`` makes the disk read-only; otherwise a
    throw-away upper directory inside ``runtime`` (the run's private temporary directory, removed on
    every way out of :func:`run_image`) takes them.
    """
    if options.read_only and options.upper:
        raise ConfigError(
            "a read-only run keeps no writes: give --read-only or --rw/--snapshot, not both",
            field="read_only",
        )
    if options.upper:
        return RootDisk(os.path.abspath(options.upper))
    if options.read_only:
        return RootDisk(None)
    return RootDisk(os.path.join(os.path.abspath(runtime), "upper"), throwaway=True)


def _runtime_dir() -> Path:
    base = tempfile.gettempdir()
    if len(base) > 60:  # a Unix socket path must stay under 108 bytes
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="obd-run-", dir=base))


def run_image(image: str | Sequence[str] | None, args: Sequence[str], options: RunOptions) -> RunResult:
    """Run ``args`` (or the image's default command) in a microVM booted from ``image``.

    ``image`` may be None with an existing ``options.upper``. Raises
    :class:`~frontends.run.vm.VMTimeoutError` when ``options.timeout`` runs out,
    :class:`~frontends.run.vm.GuestError` when the guest cannot start the command, and
    :class:`~obd.errors.ObdError` for image or server problems; ``KeyboardInterrupt`` propagates.
    Whatever happens, QEMU and nbdkit are gone and the temporary directory (with a throw-away upper
    directory, see :func:`root_disk`) is removed on return.
    """
    say = options.say or (lambda _m: None)
    remote = options.remote
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    resolve_before = remote.stats.snapshot()
    runtime = _runtime_dir()
    server: NbdServer | None = None
    late = runtime / "params.json"  # the image's own server parameters, once resolved
    first: list[float] = []
    on_output = options.on_output

    def output(chunk: bytes) -> None:
        if not first:
            first.append(time.monotonic())
        if on_output is not None:
            on_output(chunk)

    warming: threading.Thread | None = None
    try:
        if image:
            # nbdkit embeds Python and imports the engine and the registry client (≈ 0.4 s) while
            # the image is resolved; the parameters that need the image follow in params-from
            server = _server(options, runtime, [*remote_params(remote), f"params-from={late}"])
            server.spawn(env=_server_env(remote))
        resolved = None
        if image:
            resolved = resolve_image(image, remote, platform=options.platform)
            say(f"resolved {' '.join(resolved.label)}: {len(resolved.config.lowers)} layer(s)")
        elif not options.upper:
            raise ConfigError(
                "no image given (IMAGE, or an existing --rw DIR / --snapshot NAME)", field="image"
            )
        timings["resolve"] = time.monotonic() - t0
        if options.trace and not os.path.isfile(options.trace):
            raise ConfigError("trace file not found", path=options.trace, field="trace")
        if resolved is not None and resolved.config.repoBlobUrl and not remote.no_cache:
            # Fetch what opening the layers reads (headers, ZFile jump tables, LSMT indexes) into the
            # shared block cache now, while the upper is made and nbdkit loads the engine (≈ 0.3 s):
            # nbdkit then opens them without waiting on the registry.
            warming = threading.Thread(
                target=_warm_open, args=(resolved.config, remote), name="obd-warm-open", daemon=True
            )
            warming.start()
        disk = root_disk(options, runtime)
        if disk.upper is not None:
            _, process = prepare_upper(disk.upper, resolved, sparse=options.sparse, remote=remote)
            if not process and resolved is None:
                process = process_of_upper(disk.upper, remote)
            kind = "a throw-away upper directory (deleted after the run)" if disk.throwaway else "upper"
            say(f"writable root: the writes go to {kind} {disk.upper}")
        else:
            assert resolved is not None
            process = resolved.process
            say("read-only root (tmpfs on /tmp and /run)")
        argv = command_line(process, args, entrypoint=options.entrypoint)
        env = environment(process, options.env)
        workdir = options.workdir or process.get("WorkingDir") or "/"
        user = options.user if options.user is not None else process.get("User")

        assets = ensure_assets(options.vm_cache_dir, progress=say)
        timings["prepared"] = time.monotonic() - t0
        params = [] if server is not None else remote_params(remote)
        if disk.upper is not None:
            params.append(f"upper={disk.upper}")
            if options.sparse:
                params.append("sparse=true")
        else:
            assert resolved is not None
            cfg_path = runtime / "config.v1.json"
            resolved.config.save(str(cfg_path))
            params.append(f"config={cfg_path}")
        if options.trace:
            params.append(f"trace={os.path.abspath(options.trace)}")
        if options.record_trace:
            params.append(f"record-trace={os.path.abspath(options.record_trace)}")
        from obd.image.accel import META_KEY as ACCEL_META_KEY

        shipped = resolved is not None and bool((resolved.config.extra.get("obd") or {}).get(ACCEL_META_KEY))
        if options.prefetch_meta and not options.trace and not shipped:  # a trace covers all of it
            value = options.prefetch_meta if isinstance(options.prefetch_meta, str) else "inodes"
            params.append(f"prefetch-meta={value}")
            # and the command's own start: its path, ELF loader and libraries (obd.prefetch.startup)
            search = next((e[5:] for e in env if e.startswith("PATH=")), None)
            if argv and options.prefetch_exec:
                params.append(f"prefetch-exec={argv[0]}")
            if argv and options.prefetch_exec and search:
                params.append(f"prefetch-exec-path={search}")
        if server is None:
            server = _server(options, runtime, params)
            server.spawn(env=_server_env(remote))
        else:
            publish_bytes(late, json.dumps([p.split("=", 1) for p in params]).encode(), durable=False)
        if warming is not None:
            warming.join()
        resolve_stats = _diff(remote.stats.snapshot(), resolve_before)  # resolve + the warming opens
        server.wait_ready()
        timings["server"] = time.monotonic() - t0
        say(f"serving the disk on {server.socket}; booting ({' '.join(argv)})")
        timeout = None
        if options.timeout is not None:
            timeout = max(1.0, options.timeout - (time.monotonic() - t0))
        result = boot(
            assets,
            NbdDisk(socket=str(server.socket)),
            argv,
            env=env,
            workdir=workdir,
            user=user,
            readonly=disk.readonly,
            memory_mib=options.memory_mib,
            cpus=options.cpus,
            timeout=timeout,
            accel=options.accel,
            extra_cmdline=options.extra_cmdline,
            on_output=output,
        )
        timings["exit"] = time.monotonic() - t0
    finally:
        if warming is not None:
            warming.join()  # it uses the caller's registry client, which may be closed after this
        if server is not None:
            # a server still waiting for its parameters has nothing to save: no need to wait on it
            server.stop(SERVER_STOP_TIMEOUT if late.exists() or not image else 0.5)
        stats = server.stats() if server is not None else {}
        shutil.rmtree(runtime, ignore_errors=True)
    ended = time.monotonic()
    if first:
        timings["first_output"] = first[0] - t0
    timings.update({k: v for k, v in result.timings.items() if k != "total"})
    timings["total"] = ended - t0
    return RunResult(
        exit_code=result.exit_code,
        output=result.output,
        timings=timings,
        stats=stats,
        resolve_stats=resolve_stats,
        accel=result.accel,
        upper=os.path.abspath(options.upper) if options.upper else None,
        argv=argv,
    )


def _server(options: RunOptions, runtime: Path, params: Sequence[str]) -> NbdServer:
    return NbdServer(
        runtime, params, threads=options.threads, verbose=options.nbdkit_verbose, log_path=options.server_log
    )


def _warm_open(config: ImageConfig, remote: RemoteOptions) -> None:
    from obd.image.local import open_config

    with contextlib.suppress(ObdError):
        open_config(config, readonly=True, remote=remote).close()


def _diff(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if isinstance(v, int) and not isinstance(v, bool) and v - before.get(k, 0)
    }


def commit_upper(
    path: str | os.PathLike[str], *, compress: str | None = "lz4", message: str = ""
) -> dict[str, Any]:
    """Seal an upper directory's writes into a snapshot layer (``obd snapshot``); its entry."""
    from obd.image.upper import UpperDir
    from obd.layer.tools import OutputOptions

    ud = UpperDir(path)
    with ud.locked():
        return ud.snapshot(options=OutputOptions(compress=compress), message=message)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C (everything is cleaned up on the way out)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt():
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
