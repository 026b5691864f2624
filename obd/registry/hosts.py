"""Registry mirrors and per-host settings from containerd's ``hosts.toml`` convention.

A hosts directory holds one folder per registry namespace, named ``host[:port]`` as written in
image references (``docker.io``, ``registry.example.com:5000``), plus ``_default`` for every
registry without a folder of its own. Each folder's ``hosts.toml`` says::

    server = "https://registry-1.docker.io"      # the origin (default: the registry itself)

    [host."https://mirror.example.com"]          # mirrors, tried in file order
      capabilities = ["pull", "resolve"]         # default: pull, resolve and push
      ca = "/etc/certs/mirror-ca.pem"            # string or list of CA bundles
      skip_verify = false
      client = [["/etc/certs/client.pem", "/etc/certs/client.key"]]
      override_path = false                      # true: the URL path is the API root itself
      dial_timeout = "2s"                        # connect timeout (Go duration; default: the client's)
      [host."https://mirror.example.com".header]
        x-custom = "value"

``skip_verify``, ``ca``, ``client``, ``header`` and ``dial_timeout`` at the top level apply to the
``server``. A host URL without a path gets ``/v2`` as its API root; with a path and no
``override_path``, ``/v2`` is appended (containerd's rule). Reads that resolve a tag go to hosts
with ``resolve``, reads by digest (blobs, manifests by digest) to hosts with ``pull``; the origin
comes last and is the fallback. Pushes use the origin only. The directories searched are ``--hosts-dir`` when
given, else :func:`default_hosts_dirs`.

A folder without ``hosts.toml`` follows docker's ``certs.d`` convention, as containerd does: its
``*.crt`` files are CA bundles and each ``NAME.cert`` with its ``NAME.key`` a client certificate,
for the registry itself (``/etc/docker/certs.d`` folders can be used as they are).
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from obd.errors import ConfigError
from obd.registry.reference import DOCKER_HUB_ALIASES, DOCKER_HUB_API

PULL = "pull"
RESOLVE = "resolve"
PUSH = "push"
CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})
#: containerd's system-wide hosts directory, used when it exists.
CONTAINERD_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_NAMESPACE = "_default"
HOSTS_FILE = "hosts.toml"

_HOST_KEYS = frozenset(
    {"capabilities", "ca", "skip_verify", "client", "header", "override_path", "dial_timeout"}
)
#: Go's time.ParseDuration units, in seconds (containerd's dial_timeout is parsed by it).
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_TOP_KEYS = _HOST_KEYS - {"override_path"} | {"server", "host"}


def default_hosts_dirs() -> list[str]:
    """``/etc/containerd/certs.d`` when it exists, then ``$XDG_CONFIG_HOME/obd/certs.d``."""
    dirs = [CONTAINERD_HOSTS_DIR] if os.path.isdir(CONTAINERD_HOSTS_DIR) else []
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    dirs.append(os.path.join(config_home, "obd", "certs.d"))
    return dirs


@dataclass(frozen=True)
class RegistryHost:
    """One place a registry's content can be read from: a mirror, or the origin (``server``).

    ``url`` is the API root (``https://mirror.example.com/v2``); ``headers`` are sent with every
    request to it; ``ca``, ``client`` and ``skip_verify`` are its TLS settings.
    """

    url: str
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    #: seconds to wait for a connection (containerd's ``dial_timeout``); None: the client's default
    dial_timeout: float | None = None

    @property
    def hostport(self) -> str:
        """``host[:port]`` of the URL."""
        u = URL(self.url)
        return f"{u.host}:{u.explicit_port}" if u.explicit_port else str(u.host)

    @property
    def is_http(self) -> bool:
        return URL(self.url).scheme == "http"

    @property
    def has_tls_settings(self) -> bool:
        return self.skip_verify or bool(self.ca) or bool(self.client)

    def ssl_context(self, default_ca: str | None = None) -> ssl.SSLContext | bool:
        """The TLS setting for requests to this host (``False``: no verification)."""
        if self.skip_verify and not self.client:
            return False
        ctx = ssl.create_default_context(cafile=default_ca)
        for ca in self.ca:
            ctx.load_verify_locations(cafile=ca)
        for cert, key in self.client:
            ctx.load_cert_chain(cert, key)
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True)
class HostsConfig:
    """The hosts of one registry namespace: ``mirrors`` in order, then the ``origin``.

    ``origin`` is None when ``hosts.toml`` names no ``server`` and sets nothing for it: the
    registry's own API host is used, reached the way the client's ``insecure`` setting says.
    """

    registry: str
    path: str | None = None
    mirrors: tuple[RegistryHost, ...] = ()
    origin: RegistryHost | None = None

    def mirrors_for(self, capability: str) -> list[RegistryHost]:
        """The mirrors that serve ``capability`` (``pull``, ``resolve`` or ``push``), in order."""
        return [m for m in self.mirrors if capability in m.capabilities]


def _str_list(value: Any, path: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError("must be a string or a list of strings", path=path, field=where, value=value)


def _client_pairs(value: Any, path: str, where: str) -> tuple[tuple[str, str | None], ...]:
    """containerd's ``client``: ``"cert"``, ``["cert", "key"]`` or a list of either."""
    if isinstance(value, str):
        return ((value, None),)
    if not isinstance(value, list):
        raise ConfigError("must be a path, a [cert, key] pair or a list of them", path=path, field=where)
    if len(value) == 2 and all(isinstance(v, str) for v in value):
        return ((value[0], value[1]),)
    pairs: list[tuple[str, str | None]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            pairs.append((item, None))
        elif isinstance(item, list) and len(item) in (1, 2) and all(isinstance(v, str) for v in item):
            pairs.append((item[0], item[1] if len(item) == 2 else None))
        else:
            raise ConfigError("must be a path or a [cert, key] pair", path=path, field=f"{where}[{i}]")
    return tuple(pairs)


def _headers(value: Any, path: str, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError("must be a table of header names", path=path, field=where)
    out: list[tuple[str, str]] = []
    for name, v in value.items():
        # containerd allows a list of values for one header; HTTP joins them with commas
        out.append((name, ", ".join(_str_list(v, path, f"{where}.{name}"))))
    return tuple(out)


def parse_go_duration(text: str, path: str = HOSTS_FILE, where: str = "dial_timeout") -> float:
    """Seconds of a Go duration such as ``"500ms"``, ``"2s"``, ``"1m30s"`` (``time.ParseDuration``)."""
    body = text.strip()
    pos, total = 0, 0.0
    for m in _GO_PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ConfigError("not a duration (examples: 500ms, 2s, 1m30s)", path=path, field=where, value=text)
    if total <= 0:
        raise ConfigError("must be positive", path=path, field=where, value=text)
    return total


def _api_root(url: str, override_path: bool, path: str, where: str) -> str:
    raw = url if "://" in url else f"https://{url}"
    try:
        u = URL(raw)
    except ValueError:
        raise ConfigError("not a URL", path=path, field=where, value=url) from None
    if u.scheme not in ("http", "https") or not u.host:
        raise ConfigError("want http(s)://host[:port][/path]", path=path, field=where, value=url)
    if u.query_string or u.fragment:
        raise ConfigError("a host URL has no query or fragment", path=path, field=where, value=url)
    root = u.path.rstrip("/")
    if not override_path and not root.endswith("/v2"):
        root += "/v2"
    return str(u.with_path(root))


def _host(table: dict[str, Any], url: str, path: str, where: str, *, top: bool = False) -> RegistryHost:
    allowed = _TOP_KEYS if top else _HOST_KEYS
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"unknown key (known: {', '.join(sorted(allowed))})", path=path, field=where + key
            )
    caps = CAPABILITIES
    if "capabilities" in table and not top:
        caps = frozenset(_str_list(table["capabilities"], path, where + "capabilities"))
        unknown = caps - CAPABILITIES
        if unknown:
            raise ConfigError(
                "unknown capability (want pull, resolve, push)",
                path=path,
                field=where + "capabilities",
                value=sorted(unknown)[0],
            )
    for flag in ("skip_verify", "override_path"):
        if flag in table and not isinstance(table[flag], bool):
            raise ConfigError("must be true or false", path=path, field=where + flag, value=table[flag])
    return RegistryHost(
        url=_api_root(url, bool(table.get("override_path", False)), path, where.rstrip(".") or "server"),
        capabilities=caps,
        skip_verify=bool(table.get("skip_verify", False)),
        ca=_str_list(table["ca"], path, where + "ca") if "ca" in table else (),
        client=_client_pairs(table["client"], path, where + "client") if "client" in table else (),
        headers=_headers(table["header"], path, where + "header") if "header" in table else (),
        dial_timeout=_dial_timeout(table, path, where + "dial_timeout"),
    )


def _dial_timeout(table: dict[str, Any], path: str, where: str) -> float | None:
    value = table.get("dial_timeout")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError('must be a duration string such as "2s"', path=path, field=where, value=value)
    return parse_go_duration(value, path, where)


def cert_files(folder: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Docker's ``certs.d`` files of ``folder``: ``(CA bundles, (client cert, key) pairs)``, sorted.

    ``*.crt`` are CA bundles; ``NAME.cert`` is a client certificate whose key is ``NAME.key``. A
    certificate without its key, or a key without its certificate, is a ConfigError (as in docker).
    """
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return (), ()
    except OSError as e:
        raise ConfigError(f"cannot list: {e.strerror}", path=os.fspath(folder)) from None
    cas = tuple(os.path.join(folder, n) for n in names if n.endswith(".crt"))
    pairs = []
    for n in names:
        stem, ext = os.path.splitext(n)
        if ext == ".cert":
            if f"{stem}.key" not in names:
                raise ConfigError(
                    f"client certificate without its key {stem}.key", path=os.path.join(folder, n)
                )
            pairs.append((os.path.join(folder, n), os.path.join(folder, f"{stem}.key")))
        elif ext == ".key" and f"{stem}.cert" not in names:
            raise ConfigError(f"client key without its certificate {stem}.cert", path=os.path.join(folder, n))
    return cas, tuple(pairs)


def default_server(registry: str) -> str:
    """The origin URL of ``registry`` when ``hosts.toml`` names none (Docker Hub: registry-1.docker.io)."""
    return f"https://{DOCKER_HUB_API if registry in DOCKER_HUB_ALIASES else registry}"


def parse_hosts_toml(text: str | bytes, registry: str, path: str = HOSTS_FILE) -> HostsConfig:
    """Parse one ``hosts.toml`` for ``registry``; ConfigError naming ``path`` and the field when invalid."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise ConfigError("not UTF-8 text", path=path) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path=path) from None
    server = doc.get("server")
    if server is not None and not isinstance(server, str):
        raise ConfigError("must be a URL string", path=path, field="server", value=server)
    origin_keys = {k: v for k, v in doc.items() if k not in ("server", "host")}
    origin = None
    if server is not None or origin_keys:
        # the origin keeps every capability: it is the fallback of everything
        origin = _host(origin_keys, server or default_server(registry), path, "", top=True)
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise ConfigError('must be [host."URL"] tables', path=path, field="host")
    mirrors = []
    for url, table in hosts.items():
        where = f'host."{url}".'
        if not isinstance(table, dict):
            raise ConfigError("must be a table", path=path, field=where.rstrip("."))
        mirrors.append(_host(table, url, path, where))
    return HostsConfig(registry, path, tuple(mirrors), origin)


def load_hosts(registry: str, dirs: Sequence[str | os.PathLike[str]]) -> HostsConfig:
    """The hosts of ``registry`` from the first ``<dir>/<registry>/hosts.toml``, else ``_default``.

    Without any file, the registry is its own only host (no mirrors).
    """
    names = [registry]
    if registry in DOCKER_HUB_ALIASES:
        names = ["docker.io", *sorted(DOCKER_HUB_ALIASES - {"docker.io"})]
    for name in [*names, DEFAULT_NAMESPACE]:
        for d in dirs:
            candidate = Path(d) / name / HOSTS_FILE
            try:
                data = candidate.read_bytes()
            except FileNotFoundError:
                found = _certs_d(registry, candidate.parent)
                if found is not None:
                    return found
                continue
            except OSError as e:
                raise ConfigError(f"cannot read: {e.strerror}", path=candidate) from None
            return parse_hosts_toml(data, registry, str(candidate))
    return HostsConfig(registry)


def _certs_d(registry: str, folder: Path) -> HostsConfig | None:
    """The hosts of ``registry`` from a docker-style certificate folder; None if it has no such files."""
    cas, pairs = cert_files(folder)
    if not cas and not pairs:
        return None
    url = _api_root(default_server(registry), False, str(folder), "server")
    return HostsConfig(registry, str(folder), (), RegistryHost(url, ca=cas, client=pairs))


@dataclass
class HostsResolver:
    """Looks up and caches :class:`HostsConfig` per registry from ``dirs`` (or :func:`default_hosts_dirs`)."""

    dirs: tuple[str, ...] = field(default_factory=lambda: tuple(default_hosts_dirs()))
    _cache: dict[str, HostsConfig] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dirs(cls, dirs: Iterable[str | os.PathLike[str]] | None) -> HostsResolver:
        """A resolver over ``dirs``, or the default directories when ``dirs`` is None."""
        return cls() if dirs is None else cls(tuple(os.fspath(d) for d in dirs))

    def hosts(self, registry: str) -> HostsConfig:
        """The hosts of ``registry`` (read once per resolver)."""
        found = self._cache.get(registry)
        if found is None:
            found = self._cache[registry] = load_hosts(registry, self.dirs)
        return found


__all__ = [
    "CAPABILITIES",
    "CONTAINERD_HOSTS_DIR",
    "PULL",
    "PUSH",
    "RESOLVE",
    "HostsConfig",
    "HostsResolver",
    "RegistryHost",
    "cert_files",
    "default_hosts_dirs",
    "default_server",
    "load_hosts",
    "parse_go_duration",
    "parse_hosts_toml",
]
