"""obd's configuration file: the registry, Dragonfly and cache settings a host gives every command.

A fleet host sets once what every ``obd run``/``obd nbd``/``obd mount`` on it would otherwise take
as options (docs/fleet.md). The file is TOML, as containerd's ``config.toml`` is::

    [registry]
    hosts_dir = "/etc/obd/certs.d"          # or a list; --hosts-dir
    proxy = "http://proxy.example.com:3128" # --proxy
    insecure = ["registry.local:5000"]      # --insecure-registry (docker's insecure-registries)
    tls_verify = true                       # --tls-verify
    ca_file = "/etc/obd/registry-ca.pem"    # --ca-file

    [p2p]                                   # Dragonfly: give proxy (and ping_url) or address
    proxy = "http://127.0.0.1:65001"        # --p2p-proxy
    ping_url = "http://127.0.0.1:40901/server/ping"  # --p2p-ping-url
    address = "http://127.0.0.1:19145/dragonfly"     # --p2p-address

    [cache]
    dir = "/var/cache/obd"                  # --cache-dir (one cache per host)
    limit = "20G"                           # --cache-limit

Which file: ``obd --config FILE COMMAND``, else ``$OBD_CONFIG``, else the first of
``$XDG_CONFIG_HOME/obd/config.toml`` (``~/.config/obd/config.toml``) and ``/etc/obd/config.toml``
that exists. Relative paths in it are taken from the file's directory. An option given on the
command line wins over the file's value for it; any ``--p2p-*`` option replaces the whole
``[p2p]`` section (so a command line never mixes two Dragonfly modes). Unknown sections and keys
are errors that name the file and the key, so a typo does not silently drop a setting.
"""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obd.errors import ConfigError, ObdError

log = logging.getLogger("obd.cli")

#: Environment variable naming the configuration file (``obd --config`` wins over it).
ENV_CONFIG = "OBD_CONFIG"
#: The system-wide file, read when the user has none.
SYSTEM_CONFIG = "/etc/obd/config.toml"
#: A configuration file larger than this is refused (it is a settings file).
MAX_BYTES = 1 << 20

# (section, key) → (argparse dest, kind). Kinds: "str", "path", "paths" (a path or a list of
# them), "hosts" (a string or a list of them), "bool", "size".
KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("registry", "hosts_dir"): ("hosts_dir", "paths"),
    ("registry", "proxy"): ("proxy", "str"),
    ("registry", "insecure"): ("insecure_registry", "hosts"),
    ("registry", "tls_verify"): ("tls_verify", "bool"),
    ("registry", "ca_file"): ("ca_file", "path"),
    ("p2p", "proxy"): ("p2p_proxy", "str"),
    ("p2p", "ping_url"): ("p2p_ping_url", "str"),
    ("p2p", "address"): ("p2p_address", "str"),
    ("cache", "dir"): ("cache_dir", "path"),
    ("cache", "limit"): ("cache_limit", "size"),
}
SECTIONS = frozenset(section for section, _ in KEYS)
P2P_DESTS = ("p2p_proxy", "p2p_ping_url", "p2p_address")


def default_config_paths() -> list[Path]:
    """``$XDG_CONFIG_HOME/obd/config.toml`` (else ``~/.config/obd/config.toml``), then the system file."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return [base / "obd" / "config.toml", Path(SYSTEM_CONFIG)]


@dataclass
class Settings:
    """The values of one configuration file, by argparse destination (``hosts_dir``, ``proxy``...)."""

    path: str | None = None
    values: dict[str, Any] = field(default_factory=dict)


def find_config(explicit: str | None = None) -> Path | None:
    """The configuration file to read: ``explicit``, else ``$OBD_CONFIG``, else the first default
    that exists; None when there is none. A file named explicitly or by the environment must exist."""
    named = explicit or os.environ.get(ENV_CONFIG, "")
    if named:
        path = Path(named)
        if not path.is_file() and path != Path(os.devnull):
            where = "--config" if explicit else ENV_CONFIG
            raise ConfigError("no such configuration file", path=named, field=where)
        return path
    return next((p for p in default_config_paths() if p.is_file()), None)


def _value(kind: str, value: Any, base: Path, path: str, where: str) -> Any:
    def text(v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise ConfigError("must be a non-empty string", path=path, field=where, value=v)
        return v

    def strings(v: Any) -> list[str]:
        items = v if isinstance(v, list) else [v]
        if not items:
            raise ConfigError("must not be an empty list", path=path, field=where)
        return [text(item) for item in items]

    if kind == "str":
        return text(value)
    if kind == "path":
        return str(base / os.path.expanduser(text(value)))
    if kind == "paths":
        return [str(base / os.path.expanduser(p)) for p in strings(value)]
    if kind == "hosts":
        return strings(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError("must be true or false", path=path, field=where, value=value)
        return value
    # "size": the cache module (and numpy with it) loads only when a file sets a limit
    from obd.cache.store import parse_size

    try:
        parse_size(text(value))
    except ConfigError:
        raise
    except ObdError as e:  # names no file: name it here
        raise ConfigError(e.detail, path=path, field=where, value=value) from None
    return value


def parse_config(raw: bytes, path: str) -> Settings:
    """Parse and validate a configuration file's bytes; ConfigError naming ``path`` and the key."""
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"larger than {MAX_BYTES} bytes: not a configuration file", path=path)
    try:
        doc = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path=path) from None
    base = Path(os.path.abspath(path)).parent
    settings = Settings(path)
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section (known: {', '.join(sorted(SECTIONS))})", path=path, field=section
            )
        if not isinstance(table, dict):
            raise ConfigError("must be a table", path=path, field=section)
        for key, value in table.items():
            where = f"{section}.{key}"
            if (section, key) not in KEYS:
                known = ", ".join(k for s, k in KEYS if s == section)
                raise ConfigError(f"unknown key (known in [{section}]: {known})", path=path, field=where)
            dest, kind = KEYS[section, key]
            settings.values[dest] = _value(kind, value, base, path, where)
    if "p2p_proxy" in settings.values and "p2p_address" in settings.values:
        raise ConfigError("give p2p.proxy or p2p.address, not both", path=path, field="p2p")
    return settings


def load_config(explicit: str | None = None) -> Settings:
    """The settings of :func:`find_config`'s file (empty settings when there is none)."""
    path = find_config(explicit)
    if path is None:
        return Settings()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path=str(path)) from None
    return parse_config(raw, str(path))


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value != []


def apply_config(args: argparse.Namespace, settings: Settings) -> None:
    """Fill the registry options of ``args`` the command line left unset from ``settings``.

    ``args.config_filled`` lists the destinations filled, so that a Sandboxfile (which sits between
    the command line and the file) can replace them: see :func:`set_unless_given`.
    """
    filled: set[str] = set(getattr(args, "config_filled", ()))
    p2p_given = any(_given(args, d) for d in P2P_DESTS)
    for dest, value in settings.values.items():
        if dest == "cache_limit" and not hasattr(args, dest) and hasattr(args, "cache_dir"):
            dest = "limit"  # `obd cache` spells it --limit
        if not hasattr(args, dest) or _given(args, dest) or (dest in P2P_DESTS and p2p_given):
            continue
        setattr(args, dest, list(value) if isinstance(value, list) else value)
        filled.add(dest)
    args.config_filled = filled
    args.config_path = settings.path


def set_unless_given(args: argparse.Namespace, dest: str, value: Any) -> None:
    """Set option ``dest`` of ``args`` to ``value`` unless the command line gave it (a value the
    configuration file filled in is replaced)."""
    filled: set[str] = getattr(args, "config_filled", set())
    if value is None or (_given(args, dest) and dest not in filled):
        return
    if dest in P2P_DESTS:  # one Dragonfly mode: the file's p2p section goes as a whole
        for other in P2P_DESTS:
            if other in filled:
                setattr(args, other, None)
                filled.discard(other)
    setattr(args, dest, value)
    filled.discard(dest)


def configure(args: argparse.Namespace) -> None:
    """Apply the configuration file ``args.settings_file`` (``obd --config``) or the default one to
    a command that has any of the options it sets (the registry options, or ``obd cache``'s
    ``--cache-dir``); other commands do not read it."""
    if not any(hasattr(args, dest) for dest, _ in KEYS.values()):
        return
    settings = load_config(getattr(args, "settings_file", None))
    apply_config(args, settings)
    if settings.path is not None:
        filled = ", ".join(sorted(args.config_filled)) or "nothing the command line did not give"
        log.info("configuration %s: took %s", settings.path, filled)


__all__ = [
    "ENV_CONFIG",
    "KEYS",
    "SYSTEM_CONFIG",
    "Settings",
    "apply_config",
    "configure",
    "default_config_paths",
    "find_config",
    "load_config",
    "parse_config",
    "set_unless_given",
]
