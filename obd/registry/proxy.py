"""Which proxy a registry request goes through: ``--proxy``, or the environment's, minus ``NO_PROXY``.

Curl's and Go's rules, as docker and containerd follow them: ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
``ALL_PROXY`` (either case) by the request's scheme, and no proxy for a host that ``NO_PROXY``
lists (``*``, a name, a ``.suffix`` or a bare domain that also covers its subdomains, a
``host:port``). A ``proxy`` option replaces the environment's proxies for both schemes but keeps its
``NO_PROXY``.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

from obd.errors import ConfigError


def hostport(url: URL | str | None) -> str:
    """``host[:port]`` of ``url`` ("" when it has no host)."""
    try:
        u = URL(str(url or ""))
    except ValueError:
        return ""
    if not u.host:
        return ""
    return f"{u.host}:{u.explicit_port}" if u.explicit_port else u.host


def bypasses(host: str, no_proxy: str) -> bool:
    """Whether ``host`` matches the comma-separated NO_PROXY list (``*``, names, ``.suffix``, host:port)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*" or entry in (host.lower(), name.lower()):
            return True
        suffix = entry if entry.startswith(".") else "." + entry
        if name.lower().endswith(suffix):
            return True
    return False


@dataclass(frozen=True)
class Proxies:
    """Scheme (``http``, ``https``, ``all``) → proxy URL, and the ``NO_PROXY`` list."""

    by_scheme: dict[str, str]
    no_proxy: str = ""

    @classmethod
    def from_option(cls, proxy: str | None) -> Proxies:
        """``proxy`` for every scheme if given (ConfigError unless ``http[s]://host[:port]``), else
        the environment's proxies; ``NO_PROXY`` from the environment either way."""
        import urllib.request  # here: with http.client and email, 10 ms of the plugin's start

        env = urllib.request.getproxies_environment()
        no_proxy = env.get("no", "")
        if not proxy:
            return cls({k: v for k, v in env.items() if k in ("http", "https", "all")}, no_proxy)
        try:
            u = URL(proxy)
        except ValueError:
            raise ConfigError("not a URL", field="proxy", value=proxy) from None
        if u.scheme not in ("http", "https") or not u.host:
            raise ConfigError("want http://host:port", field="proxy", value=proxy)
        return cls({"http": proxy, "https": proxy}, no_proxy)

    def for_url(self, url: URL) -> str | None:
        """The proxy for a request to ``url`` (None: connect directly)."""
        proxy = self.by_scheme.get(url.scheme) or self.by_scheme.get("all")
        if not proxy or not url.host:
            return None
        if self.no_proxy and bypasses(hostport(url), self.no_proxy):
            return None
        return proxy


__all__ = ["Proxies", "bypasses", "hostport"]
