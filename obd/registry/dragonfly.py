"""Dragonfly's two client modes for blob reads: dfdaemon's forward proxy, and overlaybd's URL prefix.

obd has no P2P of its own; a fleet plugs it into Dragonfly (docs/fleet.md) the way nydus and
overlaybd do:

- **Proxy mode** (``--p2p-proxy URL``, nydus' ``backend.config.proxy``): blob data requests go
  through dfdaemon's HTTP proxy port as ordinary forward-proxy requests, carrying
  ``X-Dragonfly-Priority`` (6 for on-demand reads, 3 for prefetch and readahead, nydus' values) and
  ``X-Dragonfly-Use-P2P: true``. The proxy's health is checked before use and again every
  ``check_interval`` seconds: a GET of ``--p2p-ping-url`` (dfdaemon's health endpoint, nydus'
  ``ping_url``) when given, else a TCP connect to the proxy's port. While it is down, and as soon as
  a request through it fails to connect, reads go directly to the registry; it is probed again
  after the interval.
- **Prefix mode** (``--p2p-address URL``, overlaybd's ``p2pConfig.address``): every blob data URL,
  after redirects, becomes ``address + "/" + URL`` (``http://localhost:9731/accelerator/https://…``),
  used while a TCP connect to the address works (overlaybd's check), with the same fallback.

Only blob data requests (ranged reads, whole-blob downloads) take these routes: manifests and
tokens are small and per image, and Dragonfly's proxy rules match ``/blobs/sha256:`` URLs anyway.
Every health check is a request in ``--stats`` (``requests``) and in ``p2p_checks``; requests
routed through Dragonfly count ``p2p_requests``, fallbacks to direct reads ``p2p_fallbacks``.

The priority of a read travels in a context variable (:mod:`obd.io.priority`, re-exported here):
:func:`background_reads` marks everything a thread does inside it (trace replay, metadata
prefetch, ``obd pull``) as prefetch, and :class:`~obd.registry.blob.RemoteBlob` marks its
readahead itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from yarl import URL

from obd.errors import ConfigError
from obd.io.priority import PRIORITY_ON_DEMAND, PRIORITY_PREFETCH, background_reads, read_priority, reads_at
from obd.observability import stats as st

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("obd.registry")

HEADER_PRIORITY = "X-Dragonfly-Priority"
HEADER_USE_P2P = "X-Dragonfly-Use-P2P"
#: Seconds between health checks, and before a proxy that failed is tried again (nydus' default).
DEFAULT_CHECK_INTERVAL = 5.0
#: A health check gives up after this many seconds.
CHECK_TIMEOUT = 2.0

PROXY = "proxy"
PREFIX = "prefix"

#: Counters in :mod:`obd.observability.stats` terms.
P2P_CHECKS = "p2p_checks"
P2P_REQUESTS = "p2p_requests"
P2P_FALLBACKS = "p2p_fallbacks"


def _endpoint(url: str, field: str) -> URL:
    try:
        u = URL(url if "://" in url else f"http://{url}")
    except ValueError:
        raise ConfigError("not a URL", field=field, value=url) from None
    if u.scheme not in ("http", "https") or not u.host:
        raise ConfigError("want http://host:port[/path]", field=field, value=url)
    if u.query_string or u.fragment:
        raise ConfigError("takes no query or fragment", field=field, value=url)
    return u


@dataclass(frozen=True)
class P2PConfig:
    """Where Dragonfly is: ``mode`` is :data:`PROXY` (``url`` is dfdaemon's proxy, ``ping_url`` its
    health endpoint or None for a TCP connect) or :data:`PREFIX` (``url`` is the address blob URLs
    are appended to). Validated on construction (ConfigError naming the option)."""

    mode: str
    url: str
    ping_url: str | None = None
    check_interval: float = DEFAULT_CHECK_INTERVAL

    def __post_init__(self) -> None:
        if self.mode not in (PROXY, PREFIX):
            raise ConfigError("want proxy or prefix", field="p2p mode", value=self.mode)
        option = "--p2p-proxy" if self.mode == PROXY else "--p2p-address"
        u = _endpoint(self.url, option)
        if self.mode == PROXY and u.path not in ("", "/"):
            raise ConfigError("a proxy URL has no path", field=option, value=self.url)
        # a bare host:port means http://host:port, as in overlaybd's default address
        object.__setattr__(self, "url", str(u).rstrip("/"))
        if self.ping_url is not None:
            object.__setattr__(self, "ping_url", str(_endpoint(self.ping_url, "--p2p-ping-url")))
        if self.check_interval <= 0:
            raise ConfigError("must be positive", field="p2p check interval", value=self.check_interval)

    @classmethod
    def from_options(
        cls, proxy: str | None, address: str | None, ping_url: str | None = None
    ) -> P2PConfig | None:
        """The config the ``--p2p-proxy``/``--p2p-address``/``--p2p-ping-url`` options describe."""
        if proxy and address:
            raise ConfigError("give --p2p-proxy or --p2p-address, not both", field="--p2p-address")
        if ping_url and not proxy:
            raise ConfigError("only the proxy mode has a ping URL (--p2p-proxy)", field="--p2p-ping-url")
        if proxy:
            return cls(PROXY, proxy, ping_url)
        if address:
            return cls(PREFIX, address)
        return None

    @property
    def hostport(self) -> tuple[str, int]:
        u = URL(self.url)
        return str(u.host), int(u.port or (443 if u.scheme == "https" else 80))


class P2PRoute:
    """The health of one Dragonfly endpoint and how a blob request is routed through it."""

    def __init__(self, config: P2PConfig, stats: st.Stats):
        self.config = config
        self.stats = stats
        self._checked_at = -1e18  # monotonic time of the last check
        self._healthy = False
        self._checking: asyncio.Future[bool] | None = None

    @property
    def is_proxy(self) -> bool:
        return self.config.mode == PROXY

    def prefixed(self, url: URL) -> URL:
        """overlaybd's ``address + "/" + URL`` (the data URL kept verbatim, not re-quoted)."""
        return URL(f"{self.config.url}/{url}", encoded=True)

    async def usable(self, session: aiohttp.ClientSession) -> bool:
        """Whether to route through Dragonfly now: the last check's answer, checked again when older
        than ``check_interval`` (concurrent callers share one check)."""
        if time.monotonic() - self._checked_at < self.config.check_interval:
            return self._healthy
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._check(session))
            self._checking.add_done_callback(lambda _: setattr(self, "_checking", None))
        return await asyncio.shield(self._checking)

    def failed(self, error: BaseException) -> None:
        """A request through Dragonfly could not connect: read directly until the next check."""
        self.stats.incr(P2P_FALLBACKS)
        if self._healthy:
            log.warning(
                "p2p %s %s failed (%s); reading directly from the registry, checking again in %.0f s",
                self.config.mode,
                self.config.url,
                error,
                self.config.check_interval,
            )
        self._healthy = False
        self._checked_at = time.monotonic()

    async def _check(self, session: aiohttp.ClientSession) -> bool:
        self.stats.incr(P2P_CHECKS)
        self.stats.incr(st.REQUESTS)
        ok, why = await self._probe(session)
        if ok != self._healthy:
            if ok:
                log.info("p2p %s %s is up: blob reads go through it", self.config.mode, self.config.url)
            else:
                log.warning(
                    "p2p %s %s is down (%s): blob reads go directly to the registry",
                    self.config.mode,
                    self.config.url,
                    why,
                )
        self._healthy, self._checked_at = ok, time.monotonic()
        return ok

    async def _probe(self, session: aiohttp.ClientSession) -> tuple[bool, str]:
        import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

        if self.config.ping_url is not None:
            try:
                timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
                async with session.get(self.config.ping_url, timeout=timeout, allow_redirects=False) as resp:
                    await resp.read()
                    return resp.status < 300, f"{self.config.ping_url} answered HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                return False, f"{self.config.ping_url}: {type(e).__name__}: {e}"
        host, port = self.config.hostport
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CHECK_TIMEOUT)
        except (TimeoutError, OSError) as e:
            return False, f"cannot connect to {host}:{port}: {e}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, ""


__all__ = [
    "DEFAULT_CHECK_INTERVAL",
    "HEADER_PRIORITY",
    "HEADER_USE_P2P",
    "P2P_CHECKS",
    "P2P_FALLBACKS",
    "P2P_REQUESTS",
    "PREFIX",
    "PRIORITY_ON_DEMAND",
    "PRIORITY_PREFETCH",
    "PROXY",
    "P2PConfig",
    "P2PRoute",
    "background_reads",
    "read_priority",
    "reads_at",
]
