"""HTTP transport of the registry client: session, authentication round trips, retries, redirects.

:class:`HttpTransport` is the base the request families of :class:`~obd.registry.client.RegistryClient`
(manifests, blob reads, uploads) are built on. It owns what every request shares:

- **One aiohttp session per event loop** (and per process: a runner restarted after ``fork`` gets a
  new one), with a connection limit and connect/read timeouts on every attempt.
- **Auth** (see :mod:`obd.registry.auth`): the challenge is learnt once per registry, tokens are
  cached per scope and refreshed before expiry, and a 401 on a request that carried a token drops
  that token and retries with a new one.
- **Retries** with exponential backoff and jitter on 5xx, 429 (honouring ``Retry-After``),
  connection errors, timeouts and whatever a request family raises as :class:`Retry` (short or
  inconsistent bodies), ``attempts`` times at most.
- **Redirects** of blob requests (blob storage behind the registry) are followed without
  ``Authorization`` or cookies; the final URL is cached per blob for ``redirect_ttl`` seconds and
  re-resolved through the registry as soon as it answers 401/403/404/410. An https → http redirect
  is refused unless the target host is marked insecure.
- **Mirrors** (see :mod:`obd.registry.hosts`): reads go to the ``hosts.toml`` mirrors that have the
  capability (``resolve`` for a tag, ``pull`` for a digest) in order, each with at most
  ``mirror_attempts`` attempts, then to the origin. A mirror that failed other than with a 404 is
  skipped for ``mirror_cooldown`` seconds. Each host's headers and TLS settings go with its requests.
- **Proxies** (:mod:`obd.registry.proxy`): ``proxy`` (``--proxy``) or ``HTTP_PROXY``/``HTTPS_PROXY``
  from the environment, except for the hosts ``NO_PROXY`` lists; requests (Range headers included)
  are forwarded unchanged.
- **Dragonfly** (``p2p``, see :mod:`obd.registry.dragonfly`): blob data requests through dfdaemon's
  proxy or overlaybd's URL prefix while it is healthy, directly otherwise.
- **TLS without verification** (``tls_verify=False``, skopeo's ``--tls-verify=false``, for every
  host; ``skip_verify`` hosts, docker's ``--insecure-registry``, for those): HTTPS without certificate
  checks first; a host that does not speak TLS there is reached over plain HTTP from then on
  (docker's rule for insecure registries).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from yarl import URL

from obd.errors import AuthError, ConfigError, ObdError, RegistryError
from obd.observability import stats as st
from obd.registry.auth import (
    Challenge,
    CredentialResolver,
    Credentials,
    TokenCache,
    TokenServiceError,
    parse_challenge,
    safe_url,
)
from obd.registry.content import ContentCache
from obd.registry.dragonfly import (
    HEADER_PRIORITY,
    HEADER_USE_P2P,
    P2P_REQUESTS,
    P2PConfig,
    P2PRoute,
    read_priority,
)
from obd.registry.hosts import PULL, RESOLVE, HostsConfig, HostsResolver, RegistryHost
from obd.registry.proxy import Proxies, hostport
from obd.registry.reference import Reference, parse_reference

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("obd.registry")

T = TypeVar("T")

#: Whole-blob reads into memory (``get_blob``) are refused above this by default.
DEFAULT_MAX_BLOB_BYTES = 64 << 20
#: Blobs larger than this are pushed in PATCH chunks of this size instead of one PUT.
DEFAULT_CHUNK_SIZE = 64 << 20
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "obd/0.1 (+overlaybd-py)"
#: Attempts per request in the current task when lower than the client's (set while trying a mirror).
_ATTEMPTS: contextvars.ContextVar[int | None] = contextvars.ContextVar("obd_registry_attempts", default=None)


class NotFoundError(RegistryError):
    """The registry answered 404: the repository, manifest or blob is not there."""


class Retry(Exception):
    """A failure worth another attempt (raised inside an attempt); never escapes the client."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Redirect:
    url: URL
    expires_at: float


@dataclass
class _UsedAuth:
    header: str
    token_key: Any = None
    token_value: str | None = None


@dataclass
class _HostAuth:
    challenge: Challenge | None = None


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime  # an HTTP date: rare, and email costs 10 ms to import

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:<hex>`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` value, without parameters, lowercased."""
    return (content_type or "").split(";", 1)[0].strip().lower()


class HttpTransport:
    """The connection settings and request plumbing of a registry client (see the module docstring).

    ``insecure`` is ``True`` (every registry over plain http) or the hosts (``host:port``) to reach
    over plain http; everything else uses https with certificate verification, which
    ``tls_verify=False`` turns off for every host and ``skip_verify`` (docker's insecure registries)
    for the hosts it names: those are tried over https without certificate checks, then plain http.
    ``stats`` defaults to the process-wide :data:`obd.observability.stats.STATS`. ``max_blob_bytes``
    and ``chunk_size`` are the limits of whole-blob reads and of upload chunks. ``hosts`` gives the
    mirrors and per-host settings (``hosts.toml`` directories, or a resolver; default
    :func:`~obd.registry.hosts.default_hosts_dirs`). ``proxy`` is an HTTP proxy URL for every request;
    without it ``HTTP_PROXY``/``HTTPS_PROXY`` and ``NO_PROXY`` of the environment apply (``NO_PROXY``
    applies to ``proxy`` too). ``p2p`` routes blob
    data requests through Dragonfly (:class:`~obd.registry.dragonfly.P2PConfig`).
    """

    def __init__(
        self,
        *,
        credentials: CredentialResolver | Credentials | Mapping[str, Credentials] | None = None,
        insecure: bool | Iterable[str] = False,
        tls_verify: bool = True,
        skip_verify: Iterable[str] = (),
        ca_file: str | os.PathLike[str] | None = None,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        request_timeout: float | None = 120.0,
        attempts: int = 4,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_retry_after: float = 30.0,
        redirect_ttl: float = 300.0,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        stats: st.Stats | None = None,
        user_agent: str = _USER_AGENT,
        hosts: HostsResolver | Sequence[str | os.PathLike[str]] | None = None,
        mirror_attempts: int = 2,
        mirror_cooldown: float = 30.0,
        proxy: str | None = None,
        p2p: P2PConfig | None = None,
        content_cache: ContentCache | None = None,
    ):
        if attempts < 1:
            raise ConfigError("attempts must be at least 1", field="attempts", value=attempts)
        if max_connections < 1:
            raise ConfigError(
                "max_connections must be at least 1", field="max_connections", value=max_connections
            )
        if isinstance(credentials, CredentialResolver):
            self.credentials = credentials
        else:
            self.credentials = CredentialResolver(credentials)
        self._insecure_hosts: frozenset[str]
        if isinstance(insecure, bool):
            self._insecure_all, self._insecure_hosts = insecure, frozenset()
        else:
            self._insecure_all, self._insecure_hosts = False, frozenset(h.lower() for h in insecure)
        self.tls_verify = tls_verify
        self._skip_verify = frozenset(h.lower() for h in skip_verify)
        self.ca_file = os.fspath(ca_file) if ca_file else None
        self.max_connections = max_connections
        self._timeouts = (request_timeout, connect_timeout, read_timeout)
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.redirect_ttl = redirect_ttl
        self.max_blob_bytes = max_blob_bytes
        #: Manifests and configs kept by digest (:mod:`obd.registry.content`), or None.
        self.content_cache = content_cache
        self.chunk_size = chunk_size
        self.stats = stats if stats is not None else st.default_stats()
        self.user_agent = user_agent
        self._session_obj: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._session_pid = 0
        self._tokens = TokenCache()
        self._hosts: dict[str, _HostAuth] = {}
        self._redirects: dict[tuple[str, str, str], _Redirect] = {}
        self._creds: dict[str, Credentials | None] = {}
        self.hosts = hosts if isinstance(hosts, HostsResolver) else HostsResolver.from_dirs(hosts)
        self.mirror_attempts = max(1, mirror_attempts)
        self.mirror_cooldown = mirror_cooldown
        self._mirror_down: dict[str, float] = {}
        #: settings of the hosts named in hosts.toml files, by ``host:port``
        self._host_settings: dict[str, RegistryHost] = {}
        self._host_ssl: dict[str, ssl.SSLContext | bool] = {}
        #: the proxy of each request (``proxy`` or the environment's, NO_PROXY applied)
        self._proxy_for = Proxies.from_option(proxy).for_url
        self.p2p = P2PRoute(p2p, self.stats) if p2p is not None else None
        #: hosts found not to speak TLS while tls_verify is off: reached over plain http since
        self._http_fallback: set[str] = set()
        self._tls_ok: set[str] = set()

    # -- plumbing ------------------------------------------------------------------------------

    def is_insecure(self, host: str) -> bool:
        """Whether ``host`` (``name[:port]``) is reached over plain http (marked so, or found not to
        speak TLS while its certificate checks are off)."""
        if self._insecure_all or host.lower() in self._insecure_hosts or host.lower() in self._http_fallback:
            return True
        configured = self._host_settings.get(host.lower())
        return configured is not None and configured.is_http

    def may_use_http(self, host: str) -> bool:
        """Whether plain http to ``host`` is allowed (a redirect to it, its token realm)."""
        return self.is_insecure(host) or host.lower() in self._skip_verify

    def _lenient(self, host: str) -> bool:
        """Whether ``host``'s certificate goes unchecked (and plain http follows if it has no TLS)."""
        return not self.tls_verify or host.lower() in self._skip_verify

    def _hosts_of(self, registry: str) -> HostsConfig:
        config = self.hosts.hosts(registry)
        for h in (*config.mirrors, *((config.origin,) if config.origin else ())):
            if h.hostport.lower() not in self._host_settings:
                self._host_settings[h.hostport.lower()] = h
                if h.has_tls_settings:
                    self._host_ssl[h.hostport.lower()] = h.ssl_context(self.ca_file)
        return config

    @functools.cached_property
    def timeout(self) -> aiohttp.ClientTimeout:
        """A request's timeouts: whole request, connect, each read (made on first use: aiohttp)."""
        import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

        total, connect, read = self._timeouts
        return aiohttp.ClientTimeout(total=total, sock_connect=connect, sock_read=read)

    @functools.cached_property
    def stream_timeout(self) -> aiohttp.ClientTimeout:
        """A streamed body's timeouts: no limit on the whole, the connect and read ones of :attr:`timeout`."""
        import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

        _total, connect, read = self._timeouts
        return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)

    def _dial_timeout(self, where: str, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
        """``timeout`` with the connect timeout ``hosts.toml`` sets for host ``where`` (``dial_timeout``)."""
        import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

        configured = self._host_settings.get(where)
        if configured is None or configured.dial_timeout is None:
            return timeout
        return aiohttp.ClientTimeout(
            total=timeout.total, sock_read=timeout.sock_read, sock_connect=configured.dial_timeout
        )

    def _origin(self, ref: Reference) -> Reference:
        """``ref`` pointed at the ``server`` its hosts.toml names (unchanged without one)."""
        if ref.api_root is not None:
            return ref
        origin = self._hosts_of(ref.registry).origin
        return ref if origin is None else dataclasses.replace(ref, api_root=origin.url)

    async def _via_hosts(self, ref: Reference, capability: str, op: Callable[[Reference], Awaitable[T]]) -> T:
        """``op`` on the first mirror of ``ref``'s registry with ``capability`` that answers, else origin."""
        for mirror in self._hosts_of(ref.registry).mirrors_for(capability):
            if self._mirror_down.get(mirror.url, 0.0) > time.monotonic():
                continue
            at_mirror = Reference(mirror.hostport, ref.repository, ref.tag, ref.digest, api_root=mirror.url)
            token = _ATTEMPTS.set(min(self.attempts, self.mirror_attempts))
            try:
                return await op(at_mirror)
            except ObdError as e:
                if not isinstance(e, NotFoundError):
                    self._mirror_down[mirror.url] = time.monotonic() + self.mirror_cooldown
                log.info("mirror %s failed (%s); trying the next host", mirror.url, e)
            finally:
                _ATTEMPTS.reset(token)
        return await op(ref)

    def _read_capability(self, target: str) -> str:
        return PULL if target.startswith(("sha256:", "sha512:")) else RESOLVE

    def base_url(self, ref: Reference) -> URL:
        return URL(ref.base_url(self.is_insecure(ref.api_host)))

    def blob_url(self, ref: Reference, digest: str) -> URL:
        return self.base_url(ref) / ref.repository / "blobs" / digest

    def manifest_url(self, ref: Reference, target: str) -> URL:
        return self.base_url(ref) / ref.repository / "manifests" / target

    async def _session(self) -> aiohttp.ClientSession:
        import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

        loop = asyncio.get_running_loop()
        if self._session_obj is None or self._session_loop is not loop or self._session_pid != os.getpid():
            # a new loop (first use, or a runner restarted after fork): the old session is unusable
            ssl_arg: ssl.SSLContext | bool = True
            if not self.tls_verify:
                ssl_arg = False
            elif self.ca_file:
                ssl_arg = ssl.create_default_context(cafile=self.ca_file)
            connector = aiohttp.TCPConnector(limit=self.max_connections, ssl=ssl_arg)
            self._session_obj = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self.user_agent, "Accept-Encoding": "identity"},
            )
            self._session_loop = loop
            self._session_pid = os.getpid()
            self._tokens = TokenCache()
        return self._session_obj

    async def aclose(self) -> None:
        """Close the HTTP session (on the loop it was created on)."""
        sess, self._session_obj = self._session_obj, None
        if sess is not None and self._session_pid == os.getpid() and not sess.closed:
            await sess.close()

    def _repo(self, repo: Reference | str) -> Reference:
        return self._origin(repo if isinstance(repo, Reference) else parse_reference(repo))

    async def _credentials(self, registry: str) -> Credentials | None:
        if registry not in self._creds:
            # config.json and credential helpers are read off the loop (a helper is a subprocess)
            self._creds[registry] = await asyncio.to_thread(self.credentials.lookup, registry)
        return self._creds[registry]

    async def _authorization(self, ref: Reference, scopes: tuple[str, ...]) -> _UsedAuth | None:
        host = self._hosts.get(ref.api_host)
        if host is None or host.challenge is None:
            return None
        creds = await self._credentials(ref.registry)
        if host.challenge.scheme == "basic":
            if creds is None or not creds.username:
                return None
            return _UsedAuth(creds.basic_header())
        if host.challenge.scheme == "bearer":
            session = await self._session()
            key, tok = await self._tokens.get(
                session,
                host.challenge,
                scopes,
                creds,
                timeout=self.timeout,
                allow_http=self.base_url(ref).scheme == "http"
                or self.may_use_http(hostport(host.challenge.realm)),
                on_request=self._count_token,
                proxy_for=self._proxy_for,
            )
            return _UsedAuth("Bearer " + tok.value, key, tok.value)
        return None

    def _count_token(self) -> None:
        self.stats.incr(st.REQUESTS)
        self.stats.incr(st.TOKENS)

    async def _on_unauthorized(
        self, ref: Reference, resp: aiohttp.ClientResponse, used: _UsedAuth | None, scopes: list[str]
    ) -> bool:
        """Learn from a 401; True when a retry with (new) credentials makes sense."""
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            return False
        host = self._hosts.setdefault(ref.api_host, _HostAuth())
        if used is not None and used.token_key is not None:
            self._tokens.invalidate(used.token_key, used.token_value)
        if challenge.scheme == "basic":
            creds = await self._credentials(ref.registry)
            if creds is None or not creds.username or (used is not None and used.token_key is None):
                return False  # nothing to send, or what we sent was refused
        for scope in challenge.scopes:
            if scope not in scopes:
                scopes.append(scope)
        host.challenge = Challenge(
            challenge.scheme, {k: v for k, v in challenge.params.items() if k != "scope"}
        )
        return True

    @contextlib.asynccontextmanager
    async def _open(
        self,
        method: str,
        url: URL,
        ref: Reference | None,
        scopes: Sequence[str] = (),
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        blob: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; with ``ref``, authenticate to that registry and answer its 401s.

        Without ``ref`` (a redirect target) no ``Authorization`` is ever sent. ``blob`` marks blob data
        requests, the ones Dragonfly may carry. The response is released when the block ends; a 401
        that survives re-authentication becomes AuthError.
        """
        session = await self._session()
        want = list(scopes)
        configured = self._host_settings.get(hostport(url).lower())
        via_p2p = blob and self.p2p is not None and await self.p2p.usable(session)
        for auth_round in range(3):
            hdrs = dict(configured.headers) if configured is not None else {}
            hdrs.update(headers or {})
            used = await self._authorization(ref, tuple(want)) if ref is not None else None
            if used is not None:
                hdrs["Authorization"] = used.header
            started = time.monotonic()
            resp, url, via_p2p = await self._send(session, method, url, hdrs, data, timeout, via_p2p)
            try:
                if ref is not None and resp.status == 401:
                    if auth_round < 2 and await self._on_unauthorized(ref, resp, used, want):
                        continue
                    raise await self._auth_error(ref, url, resp, used)
                if ref is not None and resp.status == 403:
                    raise await self._auth_error(ref, url, resp, used)
                yield resp
                return
            finally:
                resp.release()
                self.stats.observe_latency(time.monotonic() - started)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: dict[str, str],
        data: bytes | None,
        timeout: aiohttp.ClientTimeout | None,
        via_p2p: bool,
    ) -> tuple[aiohttp.ClientResponse, URL, bool]:
        """One request on the wire, counted in ``requests``; returns it, the URL it went to (``url``,
        or its plain-http twin) and whether it went through Dragonfly. A Dragonfly endpoint that cannot
        be reached, or (with ``tls_verify`` off) an https host that never spoke TLS to us, costs one
        failed request: the request is sent again directly, or over plain http."""
        import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

        while True:
            target, hdrs, extra = url, headers, dict[str, Any]()
            where = hostport(url).lower()
            if where in self._host_ssl and url.scheme == "https":
                extra["ssl"] = self._host_ssl[where]
            elif where in self._skip_verify and url.scheme == "https":
                extra["ssl"] = False
            if via_p2p and self.p2p is not None:
                hdrs = {**headers, HEADER_PRIORITY: str(read_priority())}
                if self.p2p.is_proxy:
                    extra["proxy"] = self.p2p.config.url
                    hdrs[HEADER_USE_P2P] = "true"
                else:
                    target = self.p2p.prefixed(url)
                    extra.pop("ssl", None)
                self.stats.incr(P2P_REQUESTS)
            else:
                proxy = self._proxy_for(url)
                if proxy:
                    extra["proxy"] = proxy
            self.stats.incr(st.REQUESTS)
            try:
                resp = await session.request(
                    method,
                    target,
                    headers=hdrs,
                    data=data,
                    allow_redirects=False,
                    timeout=self._dial_timeout(where, timeout or self.timeout),
                    **extra,
                )
            except aiohttp.ClientConnectionError as e:
                if via_p2p and self.p2p is not None:
                    self.p2p.failed(e)
                    via_p2p = False
                    continue
                if (
                    url.scheme == "https"
                    and self._lenient(where)
                    and where not in self._tls_ok
                    and _not_tls(e)
                ):
                    self._http_fallback.add(where)
                    log.info("%s does not speak TLS (%s); using plain http for it", where, _describe(e))
                    url = url.with_scheme("http")
                    continue
                raise
            if url.scheme == "https":
                self._tls_ok.add(where)
            if method != "HEAD" and resp.content_length:
                self.stats.incr(st.BYTES_RECEIVED, resp.content_length)  # the wire's count (--stats)
            return resp, url, via_p2p

    async def _auth_error(
        self, ref: Reference, url: URL, resp: aiohttp.ClientResponse, used: _UsedAuth | None
    ) -> AuthError:
        creds = self._creds.get(ref.registry)
        detail = await _error_detail(resp)
        if creds is None:
            hint = (
                "no credentials found for this registry (looked at flags, OBD_REGISTRY_USER/"
                f"OBD_REGISTRY_PASSWORD, {self.credentials.config_path})"
            )
        else:
            hint = f"credentials from {creds.source or 'flags'} (user {creds.username!r}) were not accepted"
        if resp.status == 403:
            hint = "access denied" + (f"; {hint}" if creds is None else f" for user {creds.username!r}")
        return AuthError(f"HTTP {resp.status}: {hint}{detail}", path=safe_url(url))

    async def _retrying(self, what: str, url: URL, attempt: Callable[[int], Awaitable[T]]) -> T:
        import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

        last: Retry | None = None
        attempts = _ATTEMPTS.get() or self.attempts
        for i in range(attempts):
            if i:
                self.stats.incr(st.RETRIES)
                delay = self._delay(i, last)
                log.info(
                    "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                    what,
                    i,
                    attempts,
                    last,
                    delay,
                )
                if delay:
                    await asyncio.sleep(delay)
            try:
                return await attempt(i)
            except Retry as e:
                last = e
            except TokenServiceError as e:
                last = Retry(str(e))
            except aiohttp.ClientSSLError as e:
                self.stats.incr(st.ERRORS)
                raise RegistryError(f"{what}: TLS failure: {e}", path=safe_url(url)) from None
            except aiohttp.InvalidURL as e:
                self.stats.incr(st.ERRORS)
                raise RegistryError(f"{what}: {type(e).__name__}: {e}", path=safe_url(url)) from None
            except (aiohttp.ClientError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
                last = Retry(_describe(e))
            except ObdError:
                self.stats.incr(st.ERRORS)
                raise
        self.stats.incr(st.ERRORS)
        raise RegistryError(f"{what}: failed after {attempts} attempts; last: {last}", path=safe_url(url))

    def _delay(self, attempt: int, last: Retry | None) -> float:
        base = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        delay = base / 2 + random.uniform(0, base / 2)
        if last is not None and last.retry_after is not None:
            delay = min(max(delay, last.retry_after), self.max_retry_after)
        return delay

    async def _fail(self, resp: aiohttp.ClientResponse, url: URL, what: str) -> None:
        """Raise for a status that is not the success the caller wanted (retryable or final)."""
        status = resp.status
        detail = await _error_detail(resp)
        if status == 429:
            raise Retry(
                f"HTTP 429 (too many requests){detail}", _parse_retry_after(resp.headers.get("Retry-After"))
            )
        if status >= 500:
            raise Retry(f"HTTP {status}{detail}")
        if status == 404:
            raise NotFoundError(f"{what}: not found (HTTP 404){detail}", path=safe_url(url))
        if status == 416:
            said = resp.headers.get("Content-Range", "")
            raise RegistryError(f"{what}: range not satisfiable (HTTP 416, {said!r})", path=safe_url(url))
        if status in (401, 403):
            raise AuthError(f"{what}: HTTP {status}{detail}", path=safe_url(url))
        raise RegistryError(f"{what}: unexpected HTTP {status}{detail}", path=safe_url(url))

    # -- blob requests, through the redirect cache -----------------------------------------------

    async def _blob_get(
        self,
        ref: Reference,
        digest: str,
        headers: Mapping[str, str],
        handle: Callable[[aiohttp.ClientResponse, URL], Awaitable[T]],
        *,
        method: str = "GET",
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> T:
        """One attempt at a blob request, through the cached redirect URL or the registry."""
        key = (ref.api_host, ref.repository, digest)
        cached = self._redirects.get(key)
        if cached is not None:
            if cached.expires_at <= time.monotonic():
                del self._redirects[key]
            else:
                async with self._open(
                    method, cached.url, None, headers=headers, timeout=timeout, blob=True
                ) as resp:
                    if resp.status in (200, 206):
                        return await handle(resp, cached.url)
                    self._redirects.pop(key, None)
                    if resp.status >= 500 or resp.status == 429:
                        await self._fail(resp, cached.url, f"blob {digest}")
                    log.info("redirect URL for %s answered %d; resolving it again", digest, resp.status)
        url = self.blob_url(ref, digest)
        scopes = (f"repository:{ref.repository}:pull",)
        async with self._open(method, url, ref, scopes, headers=headers, timeout=timeout, blob=True) as resp:
            if resp.status in (200, 206):
                return await handle(resp, url)
            if resp.status not in REDIRECT_STATUSES:
                await self._fail(resp, url, f"blob {digest}")
            target = self._redirect_target(url, resp)
        for _ in range(MAX_REDIRECTS):
            self.stats.incr(st.REDIRECTS)
            log.debug("blob %s redirected to %s", digest, safe_url(target))
            async with self._open(method, target, None, headers=headers, timeout=timeout, blob=True) as resp:
                if resp.status in (200, 206):
                    self._redirects[key] = _Redirect(target, time.monotonic() + self.redirect_ttl)
                    return await handle(resp, target)
                if resp.status not in REDIRECT_STATUSES:
                    if resp.status in (401, 403, 404, 410):
                        raise Retry(f"redirect target {safe_url(target)} answered HTTP {resp.status}")
                    await self._fail(resp, target, f"blob {digest}")
                target = self._redirect_target(target, resp)
        raise RegistryError(f"blob {digest}: more than {MAX_REDIRECTS} redirects", path=safe_url(url))

    def _redirect_target(self, url: URL, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise Retry(f"HTTP {resp.status} without a Location header")
        try:
            target = url.join(URL(location))
        except ValueError:
            raise RegistryError("redirect Location is not a URL", path=safe_url(url)) from None
        if target.scheme not in ("http", "https"):
            raise RegistryError("redirect to a non-http URL", path=safe_url(url), value=safe_url(target))
        if url.scheme == "https" and target.scheme == "http" and not self.may_use_http(hostport(target)):
            raise RegistryError(
                "refusing a redirect from https to plain http (mark the host insecure to allow it)",
                path=safe_url(url),
                value=safe_url(target),
            )
        return target


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body up to ``limit`` bytes (to the end when shorter)."""
    parts = []
    got = 0
    while got < limit:
        chunk = await resp.content.read(min(limit - got, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def read_capped(resp: aiohttp.ClientResponse, limit: int, url: URL, what: str) -> bytes:
    """The whole body, refused (RegistryError) above ``limit`` bytes; a body shorter than its
    ``Content-Length`` is retried."""
    if resp.content_length is not None and resp.content_length > limit:
        raise RegistryError(
            f"{what} of {resp.content_length} bytes is larger than the {limit}-byte limit", path=safe_url(url)
        )
    data = await read_body(resp, limit + 1)
    if len(data) > limit:
        raise RegistryError(f"{what} is larger than the {limit}-byte limit", path=safe_url(url))
    if resp.content_length is not None and len(data) != resp.content_length:
        raise Retry(f"{what} body of {len(data)} bytes, Content-Length {resp.content_length}")
    return data


async def _error_detail(resp: aiohttp.ClientResponse) -> str:
    """``: CODE: message`` from a registry error body, if there is one (at most 200 characters)."""
    import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

    if resp.method == "HEAD":
        return ""
    try:
        body = await asyncio.wait_for(resp.content.read(4096), 2.0)
        obj = json.loads(body)
        err = obj["errors"][0]
        text = f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, aiohttp.ClientError, TimeoutError):
        return ""
    return f": {text[:200]}" if text else ""


def _not_tls(e: aiohttp.ClientConnectionError) -> bool:
    """Whether a failed https connection says the server does not speak TLS on that port (a TLS
    handshake error, the server hanging up on the handshake, or nothing listening)."""
    import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

    return isinstance(
        e, aiohttp.ClientSSLError | aiohttp.ServerDisconnectedError | aiohttp.ClientConnectorError
    )


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, asyncio.IncompleteReadError):
        return f"connection closed after {len(e.partial)} of {e.expected} body bytes"
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_BLOB_BYTES",
    "MAX_REDIRECTS",
    "REDIRECT_STATUSES",
    "HttpTransport",
    "NotFoundError",
    "Retry",
    "digest_of",
    "media_type",
    "read_body",
    "read_capped",
]
