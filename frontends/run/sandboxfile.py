"""Sandboxfiles: named, repeatable ``obd run`` settings in YAML (docs/sandboxfile.md).

In the spirit of the Sandboxfile microsandbox users write::

    sandboxes:
      hello:
        image: registry.example.com/python:3.11
        memory: 512            # MiB, or "1G" / "512M"
        cpus: 1
        envs: [GREETING=hi]    # or a mapping {GREETING: hi}
        workdir: /app
        scripts:
          start: python3 -c 'print("hello world!")'
          version: [python3, --version]

``obd run -f Sandboxfile hello`` runs the ``start`` script; ``hello~version`` (or ``--script
version``) another one; ``-- CMD...`` a command of your own. :func:`load` validates everything up
front and names the file and field of any mistake.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from obd.errors import ConfigError, UnsupportedError

DEFAULT_NAMES = ("Sandboxfile", "Sandboxfile.yaml", "Sandboxfile.yml")
#: A Sandboxfile larger than this is refused (it is a settings file).
MAX_BYTES = 1 << 20

_KNOWN = {
    "image",
    "memory",
    "cpus",
    "envs",
    "env",
    "workdir",
    "user",
    "entrypoint",
    "command",
    "shell",
    "scripts",
    "start",
    "rw",
    "snapshot",
    "read_only",
    "sparse",
    "timeout",
    "trace",
    "record_trace",
    "platform",
    "insecure_registry",
    "accel",
    "hosts_dir",
    "proxy",
    "p2p_proxy",
    "p2p_ping_url",
    "p2p_address",
}
#: microsandbox keys obd has no counterpart for (yet): refused with a clear message, not ignored.
_UNSUPPORTED = {
    "volumes": "host directories",
    "ports": "port forwarding",
    "imports": "imports",
    "exports": "exports",
    "depends_on": "dependencies between sandboxes",
}


@dataclass
class Sandbox:
    """One ``sandboxes:`` entry, validated; paths made absolute against the Sandboxfile's directory."""

    name: str
    image: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    entrypoint: list[str] | None = None
    command: list[str] | None = None
    shell: str = "/bin/sh"
    scripts: dict[str, list[str] | str] = field(default_factory=dict)
    rw: str | bool = False
    """True: a fresh upper directory; a path: that upper directory."""
    snapshot: str | None = None
    read_only: bool = False
    """No writes at all (``--read-only``); by default the writes are thrown away after the run."""
    sparse: bool = False
    timeout: float | None = None
    trace: str | None = None
    record_trace: str | None = None
    platform: str | None = None
    insecure_registry: list[str] = field(default_factory=list)
    accel: str | None = None
    #: registry and Dragonfly settings, as ``--hosts-dir``, ``--proxy`` and ``--p2p-*`` (docs/fleet.md)
    hosts_dir: list[str] | None = None
    proxy: str | None = None
    p2p_proxy: str | None = None
    p2p_ping_url: str | None = None
    p2p_address: str | None = None

    def script_argv(self, script: str) -> list[str]:
        """The command of script ``script``: a list is an argv, a string runs with ``shell -c``."""
        if script not in self.scripts:
            known = ", ".join(sorted(self.scripts)) or "none"
            raise ConfigError(
                f"no script {script!r} (scripts: {known})", field=f"sandboxes.{self.name}.scripts"
            )
        body = self.scripts[script]
        return list(body) if isinstance(body, list) else [self.shell, "-c", body]

    def default_args(self) -> list[str]:
        """What runs when no command is given: ``scripts.start``, else ``command``, else the image's."""
        if "start" in self.scripts:
            return self.script_argv("start")
        return list(self.command or [])


@dataclass
class Sandboxfile:
    path: str
    sandboxes: dict[str, Sandbox]

    def get(self, name: str) -> Sandbox:
        if name not in self.sandboxes:
            known = ", ".join(sorted(self.sandboxes)) or "none"
            raise ConfigError(f"no sandbox {name!r} (sandboxes: {known})", path=self.path, field="sandboxes")
        return self.sandboxes[name]


def find(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or the Sandboxfile in directory ``path``."""
    p = Path(path)
    if p.is_dir():
        for name in DEFAULT_NAMES:
            if (p / name).is_file():
                return p / name
        raise ConfigError(f"no {' / '.join(DEFAULT_NAMES)} in this directory", path=str(p))
    if not p.is_file():
        raise ConfigError("Sandboxfile not found", path=str(p))
    return p


def load(path: str | os.PathLike[str]) -> Sandboxfile:
    """Parse and validate a Sandboxfile (YAML; JSON works too)."""
    p = find(path)
    where = str(p)
    size = p.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"{size} bytes is too large for a Sandboxfile", path=where, field="size")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{at}: {getattr(e, 'problem', None) or e}", path=where) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=where) from None
    if not isinstance(doc, Mapping):
        raise ConfigError("must be a mapping with a 'sandboxes' key", path=where, field="(top level)")
    boxes = doc.get("sandboxes")
    if not isinstance(boxes, Mapping) or not boxes:
        raise ConfigError("must map sandbox names to their settings", path=where, field="sandboxes")
    base = p.resolve().parent
    out = {}
    for name, body in boxes.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(
                "sandbox names are letters, digits, '_', '.', '-'", path=where, field="sandboxes", value=name
            )
        out[name] = _sandbox(name, body, where, base)
    return Sandboxfile(where, out)


def _sandbox(name: str, body: Any, where: str, base: Path) -> Sandbox:
    at = f"sandboxes.{name}"
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise ConfigError("must be a mapping of settings", path=where, field=at)
    for key in body:
        if key in _UNSUPPORTED:
            raise UnsupportedError(
                f"{_UNSUPPORTED[key]} are not supported by obd run", path=where, field=f"{at}.{key}"
            )
        if key not in _KNOWN:
            raise ConfigError(
                f"unknown setting (known: {', '.join(sorted(_KNOWN))})", path=where, field=f"{at}.{key}"
            )

    def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = body.get(key, default)
        if value is None:
            return default
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            raise ConfigError(f"must be {_kind_name(kind)}", path=where, field=f"{at}.{key}", value=value)
        return value

    def path_of(value: str | None) -> str | None:
        return None if value is None else str((base / os.path.expanduser(value)).resolve())

    box = Sandbox(name)
    box.image = get("image", str)
    box.memory_mib = memory_setting(body.get("memory"), where, f"{at}.memory")
    box.cpus = get("cpus", int)
    if box.cpus is not None and not 1 <= box.cpus <= 64:
        raise ConfigError("must be between 1 and 64", path=where, field=f"{at}.cpus", value=box.cpus)
    if "envs" in body and "env" in body:
        raise ConfigError("give envs or env, not both", path=where, field=f"{at}.env")
    env_key = "env" if "env" in body else "envs"
    box.env = _env(body.get(env_key), where, f"{at}.{env_key}")
    box.workdir = get("workdir", str)
    if box.workdir is not None and not box.workdir.startswith("/"):
        raise ConfigError("must be an absolute path", path=where, field=f"{at}.workdir", value=box.workdir)
    user = body.get("user")
    box.user = str(user) if isinstance(user, int) and not isinstance(user, bool) else get("user", str)
    box.entrypoint = _argv(body.get("entrypoint"), where, f"{at}.entrypoint")
    box.command = _argv(body.get("command"), where, f"{at}.command")
    box.shell = get("shell", str, "/bin/sh")
    scripts = get("scripts", Mapping, {})
    for key, value in scripts.items():
        if not isinstance(key, str) or not key:
            raise ConfigError("script names are strings", path=where, field=f"{at}.scripts", value=key)
        if isinstance(value, str):
            box.scripts[key] = value
        else:
            argv = _argv(value, where, f"{at}.scripts.{key}")
            if not argv:
                raise ConfigError("must not be empty", path=where, field=f"{at}.scripts.{key}")
            box.scripts[key] = argv
    start = body.get("start")
    if start is not None:
        if "start" in box.scripts:
            raise ConfigError("give start or scripts.start, not both", path=where, field=f"{at}.start")
        start_argv = start if isinstance(start, str) else _argv(start, where, f"{at}.start")
        if not start_argv:
            raise ConfigError("must not be empty", path=where, field=f"{at}.start")
        box.scripts["start"] = start_argv
    rw = body.get("rw", False)
    if isinstance(rw, str) and rw.strip():
        box.rw = path_of(rw) or False
    elif isinstance(rw, bool):
        box.rw = rw
    else:
        raise ConfigError("must be true/false or an upper directory", path=where, field=f"{at}.rw", value=rw)
    box.snapshot = get("snapshot", str)
    if box.snapshot is not None and not box.snapshot.strip():
        raise ConfigError("must be a sandbox name", path=where, field=f"{at}.snapshot", value=box.snapshot)
    if box.snapshot is not None and box.rw:
        raise ConfigError("give rw or snapshot, not both", path=where, field=f"{at}.snapshot")
    box.read_only = get("read_only", bool, False)
    if box.read_only and (box.rw or box.snapshot is not None):
        raise ConfigError(
            "a read-only sandbox keeps no writes: drop rw/snapshot", path=where, field=f"{at}.read_only"
        )
    box.sparse = get("sparse", bool, False)
    timeout = get("timeout", (int, float))
    if timeout is not None and timeout <= 0:
        raise ConfigError("must be positive (seconds)", path=where, field=f"{at}.timeout", value=timeout)
    box.timeout = float(timeout) if timeout is not None else None
    box.trace = path_of(get("trace", str))
    box.record_trace = path_of(get("record_trace", str))
    box.platform = get("platform", str)
    insecure = body.get("insecure_registry")
    if isinstance(insecure, str):
        box.insecure_registry = [insecure]
    elif insecure is True:
        box.insecure_registry = ["*"]
    elif isinstance(insecure, list) and all(isinstance(h, str) for h in insecure):
        box.insecure_registry = list(insecure)
    elif insecure not in (None, False):
        raise ConfigError(
            "must be a host, a list of hosts or true",
            path=where,
            field=f"{at}.insecure_registry",
            value=insecure,
        )
    box.accel = get("accel", str)
    if box.accel is not None and box.accel not in ("auto", "kvm", "tcg"):
        raise ConfigError("must be auto, kvm or tcg", path=where, field=f"{at}.accel", value=box.accel)
    hosts_dir = body.get("hosts_dir")
    if isinstance(hosts_dir, str):
        hosts_dir = [hosts_dir]
    if isinstance(hosts_dir, list) and hosts_dir and all(isinstance(d, str) and d for d in hosts_dir):
        box.hosts_dir = [str(path_of(d)) for d in hosts_dir]
    elif hosts_dir is not None:
        raise ConfigError(
            "must be a directory or a list of them", path=where, field=f"{at}.hosts_dir", value=hosts_dir
        )
    box.proxy = get("proxy", str)
    box.p2p_proxy = get("p2p_proxy", str)
    box.p2p_ping_url = get("p2p_ping_url", str)
    box.p2p_address = get("p2p_address", str)
    if box.p2p_proxy and box.p2p_address:
        raise ConfigError("give p2p_proxy or p2p_address, not both", path=where, field=f"{at}.p2p_address")
    return box


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "a whole number",
        float: "a number",
        bool: "true or false",
        Mapping: "a mapping",
    }
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_memory(value: Any) -> int:
    """MiB from ``512``, ``"512"``, ``"512M"``, ``"1G"``, ``"1.5GiB"``; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        mib = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mg])?(?:i?b)?\s*", str(value), re.I)
        if not m:
            raise ValueError(value)
        mib = int(float(m.group(1)) * (1024 if (m.group(2) or "m").lower() == "g" else 1))
    if not 16 <= mib <= 1 << 20:
        raise ValueError(value)
    return mib


def memory_setting(value: Any, where: str | None, at: str) -> int | None:
    """:func:`parse_memory` of a setting (``None`` stays ``None``), a :class:`ConfigError` naming
    file ``where`` and field ``at`` when it is not a memory size."""
    if value is None:
        return None
    try:
        return parse_memory(value)
    except ValueError:
        raise ConfigError(
            "must be MiB (512) or a size (512M, 2G), at least 16 MiB", path=where, field=at, value=value
        ) from None


def _env(value: Any, where: str, at: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            if not isinstance(k, str) or not k or "=" in k:
                raise ConfigError(
                    "variable names are non-empty strings without '='", path=where, field=at, value=k
                )
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise ConfigError("values are strings or numbers", path=where, field=f"{at}.{k}", value=v)
            out.append(f"{k}={v}")
        return out
    if isinstance(value, list) and all(isinstance(e, str) and e.find("=") != 0 and e for e in value):
        return list(value)
    raise ConfigError("must be a list of NAME=value or a mapping", path=where, field=at, value=value)


def _argv(value: Any, where: str, at: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as e:
            raise ConfigError(f"cannot split into words: {e}", path=where, field=at, value=value) from None
    if isinstance(value, list) and all(
        isinstance(a, str | int | float) and not isinstance(a, bool) for a in value
    ):
        return [str(a) for a in value]
    raise ConfigError("must be a list of arguments or a command string", path=where, field=at, value=value)
