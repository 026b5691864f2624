"""An OCI distribution (registry v2) client on aiohttp, built for reading layer blobs on demand.

What it does that overlaybd's ``registryfs_v2`` does not (FORMATS.md §5 lists overlaybd's behaviour):

- **Ranges are checked, not trusted.** A ranged GET must answer 206 with a ``Content-Range`` naming
  exactly the bytes asked for and a body of exactly that length. A 200 (a server that ignored
  ``Range``) is accepted only when the read starts at offset 0, and then only the first ``length``
  bytes are used and the connection is dropped; at any other offset it is retried and, if it
  persists, reported — overlaybd returns the wrong bytes there.
- **Redirects** (blob storage behind the registry) are followed without ``Authorization`` or
  cookies; the final URL is cached per blob for ``redirect_ttl`` seconds and re-resolved through the
  registry as soon as it answers 401/403/404/410. An https → http redirect is refused unless the
  target host is marked insecure.
- **Retries** with exponential backoff and jitter on 5xx, 429 (honouring ``Retry-After``),
  connection errors, timeouts and short or inconsistent bodies, ``attempts`` times at most (default
  4); every attempt has a connect and a read timeout, so nothing waits forever.
- **Auth** (see :mod:`obd.registry.auth`): the challenge is learnt once per registry, tokens are
  cached per scope and refreshed before expiry, and a 401 on a request that carried a token drops
  that token and retries with a new one.
- **Digests**: every manifest and config and every whole blob downloaded is checked against its
  digest.

Every coroutine must run on one event loop per client (the loop of :class:`~obd.registry.loop.AsyncRunner`
in the engine). Errors are :class:`~obd.errors.RegistryError` (or :class:`~obd.errors.AuthError`)
naming the URL without its query string, the HTTP status and what was expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from obd.errors import AuthError, ConfigError, FormatError, ObdError, RegistryError, UnsupportedError
from obd.observability import stats as st
from obd.oci.model import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Image, host_platform
from obd.registry.auth import (
    Challenge,
    CredentialResolver,
    Credentials,
    TokenCache,
    TokenServiceError,
    parse_challenge,
    safe_url,
)
from obd.registry.reference import Reference, parse_reference, validate_digest

log = logging.getLogger("obd.registry")

T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

#: Manifests and configs larger than this are refused before they are read.
MAX_MANIFEST_BYTES = 4 << 20
#: Whole-blob reads into memory (:meth:`RegistryClient.get_blob`) are refused above this by default.
DEFAULT_MAX_BLOB_BYTES = 64 << 20
#: Blobs larger than this are pushed in PATCH chunks of this size instead of one PUT.
DEFAULT_CHUNK_SIZE = 64 << 20
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.I)
_USER_AGENT = "obd/0.1 (+overlaybd-py)"


class _Retry(Exception):
    """A failure worth another attempt; never escapes the client."""

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


@dataclass(frozen=True)
class RawManifest:
    """A manifest or index exactly as the registry sent it (digest verified)."""

    digest: str
    media_type: str
    data: bytes

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.data)
        except ValueError as e:
            raise FormatError(f"manifest is not valid JSON: {e}", path=self.digest) from None
        if not isinstance(obj, dict):
            raise FormatError("manifest must be a JSON object", path=self.digest)
        return obj


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` → (a, b, total or None for ``*``); None if malformed."""
    if not value:
        return None
    m = _CONTENT_RANGE.fullmatch(value)
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _platform_matches(have: str, want: str) -> bool:
    h, w = have.split("/"), want.split("/")
    if h[:2] != w[:2]:
        return False
    if len(w) < 3 or len(h) < 3:
        return True
    return h[2] == w[2]


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class RegistryClient:
    """Talks to OCI registries: manifests, blobs, ranges, uploads. One aiohttp session per client.

    ``insecure`` is ``True`` (every registry over plain http) or the hosts (``host:port``) to reach
    over plain http; everything else uses https with certificate verification, which only
    ``tls_verify=False`` turns off. ``stats`` defaults to the process-wide
    :data:`obd.observability.stats.STATS`.
    """

    def __init__(
        self,
        *,
        credentials: CredentialResolver | Credentials | Mapping[str, Credentials] | None = None,
        insecure: bool | Iterable[str] = False,
        tls_verify: bool = True,
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
        if isinstance(insecure, bool):
            self._insecure_all, self._insecure_hosts = insecure, frozenset()
        else:
            self._insecure_all, self._insecure_hosts = False, frozenset(h.lower() for h in insecure)
        self.tls_verify = tls_verify
        self.ca_file = os.fspath(ca_file) if ca_file else None
        self.max_connections = max_connections
        self.timeout = aiohttp.ClientTimeout(
            total=request_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.redirect_ttl = redirect_ttl
        self.max_blob_bytes = max_blob_bytes
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

    # -- plumbing ------------------------------------------------------------------------------

    def is_insecure(self, host: str) -> bool:
        """Whether ``host`` (``name[:port]``) may be reached over plain http."""
        return self._insecure_all or host.lower() in self._insecure_hosts

    def base_url(self, ref: Reference) -> URL:
        return URL(ref.base_url(self.is_insecure(ref.api_host)))

    def blob_url(self, ref: Reference, digest: str) -> URL:
        return self.base_url(ref) / ref.repository / "blobs" / digest

    def manifest_url(self, ref: Reference, target: str) -> URL:
        return self.base_url(ref) / ref.repository / "manifests" / target

    async def _session(self) -> aiohttp.ClientSession:
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
        return repo if isinstance(repo, Reference) else parse_reference(repo)

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
                allow_http=self.is_insecure(ref.api_host)
                or self.is_insecure(_hostport(host.challenge.realm)),
                on_request=self._count_token,
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
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; with ``ref``, authenticate to that registry and answer its 401s.

        Without ``ref`` (a redirect target) no ``Authorization`` is ever sent. The response is
        released when the block ends; a 401 that survives re-authentication becomes AuthError.
        """
        session = await self._session()
        want = list(scopes)
        for auth_round in range(3):
            hdrs = dict(headers or {})
            used = await self._authorization(ref, tuple(want)) if ref is not None else None
            if used is not None:
                hdrs["Authorization"] = used.header
            self.stats.incr(st.REQUESTS)
            started = time.monotonic()
            resp = await session.request(
                method, url, headers=hdrs, data=data, allow_redirects=False, timeout=timeout or self.timeout
            )
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
        last: _Retry | None = None
        for i in range(self.attempts):
            if i:
                self.stats.incr(st.RETRIES)
                delay = self._delay(i, last)
                log.info(
                    "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                    what,
                    i,
                    self.attempts,
                    last,
                    delay,
                )
                if delay:
                    await asyncio.sleep(delay)
            try:
                return await attempt(i)
            except _Retry as e:
                last = e
            except TokenServiceError as e:
                last = _Retry(str(e))
            except aiohttp.ClientSSLError as e:
                self.stats.incr(st.ERRORS)
                raise RegistryError(f"{what}: TLS failure: {e}", path=safe_url(url)) from None
            except aiohttp.InvalidURL as e:
                self.stats.incr(st.ERRORS)
                raise RegistryError(f"{what}: {type(e).__name__}: {e}", path=safe_url(url)) from None
            except (aiohttp.ClientError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
                last = _Retry(_describe(e))
            except ObdError:
                self.stats.incr(st.ERRORS)
                raise
        self.stats.incr(st.ERRORS)
        raise RegistryError(
            f"{what}: failed after {self.attempts} attempts; last: {last}", path=safe_url(url)
        )

    def _delay(self, attempt: int, last: _Retry | None) -> float:
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
            raise _Retry(
                f"HTTP 429 (too many requests){detail}", _parse_retry_after(resp.headers.get("Retry-After"))
            )
        if status >= 500:
            raise _Retry(f"HTTP {status}{detail}")
        if status == 404:
            raise RegistryError(f"{what}: not found (HTTP 404){detail}", path=safe_url(url))
        if status == 416:
            said = resp.headers.get("Content-Range", "")
            raise RegistryError(f"{what}: range not satisfiable (HTTP 416, {said!r})", path=safe_url(url))
        if status in (401, 403):
            raise AuthError(f"{what}: HTTP {status}{detail}", path=safe_url(url))
        raise RegistryError(f"{what}: unexpected HTTP {status}{detail}", path=safe_url(url))

    # -- manifests -----------------------------------------------------------------------------

    async def fetch_manifest(self, ref: Reference | str, target: str | None = None) -> RawManifest:
        """The manifest or index ``target`` (tag or digest; default: the reference's) exactly as stored."""
        ref = self._repo(ref)
        target = target or ref.target
        want_digest = target if ":" in target else None
        if want_digest:
            validate_digest(want_digest)
        url = self.manifest_url(ref, target)
        scopes = (f"repository:{ref.repository}:pull",)

        async def attempt(_: int) -> RawManifest:
            async with self._open("GET", url, ref, scopes, headers={"Accept": MANIFEST_ACCEPT}) as resp:
                if resp.status != 200:
                    await self._fail(resp, url, f"manifest {target}")
                data = await _read_capped(resp, MAX_MANIFEST_BYTES, url, "manifest")
                header_digest = resp.headers.get("Docker-Content-Digest")
                content_type = _media(resp.headers.get("Content-Type"))
            if want_digest:
                got = _digest_of(data, want_digest.split(":", 1)[0])
                if got != want_digest:
                    raise _Retry(f"manifest content has digest {got}, not {want_digest}")
                digest = want_digest
            else:
                digest = _digest_of(data)
                if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                    raise _Retry(
                        f"manifest content has digest {digest}, Docker-Content-Digest says {header_digest}"
                    )
            media = content_type
            with contextlib.suppress(ValueError, AttributeError):
                media = json.loads(data).get("mediaType") or content_type
            if media in DOCKER_SCHEMA1:
                raise UnsupportedError("Docker schema 1 manifests are not supported", path=str(ref))
            return RawManifest(digest, media, data)

        return await self._retrying(f"GET manifest {target}", url, attempt)

    async def get_manifest(
        self, ref: Reference | str, platform: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``(digest, manifest)`` of an image; an index is resolved to ``platform`` (default: this host's).

        The digest is verified against the reference's digest, or the registry's
        ``Docker-Content-Digest``, and a platform manifest against the index entry naming it.
        """
        ref = self._repo(ref)
        raw = await self.fetch_manifest(ref)
        doc = raw.json()
        if raw.media_type in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = select_platform(doc, platform or host_platform(), str(ref))
            child = await self.fetch_manifest(ref, desc.digest)
            if len(child.data) != desc.size:
                raise FormatError(
                    f"manifest is {len(child.data)} bytes, the index says {desc.size}",
                    path=str(ref),
                    field="manifests.size",
                )
            doc = child.json()
            if "manifests" in doc and "layers" not in doc:
                raise UnsupportedError("nested image indexes are not supported", path=str(ref))
            return child.digest, doc
        return raw.digest, doc

    async def get_image(self, ref: Reference | str, platform: str | None = None) -> Image:
        """Manifest, verified config and layer descriptors of an image (see :class:`obd.oci.model.Image`)."""
        ref = self._repo(ref)
        digest, manifest = await self.get_manifest(ref, platform)
        if "layers" not in manifest or "config" not in manifest:
            raise FormatError("not an image manifest (no layers/config)", path=str(ref))
        cfg = Descriptor.parse(manifest["config"], "config", str(ref))
        if cfg.size > MAX_MANIFEST_BYTES:
            raise FormatError(
                "config is larger than 4 MiB", path=str(ref), field="config.size", value=cfg.size
            )
        raw = await self.get_blob(ref, cfg.digest)
        try:
            config = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"config is not valid JSON: {e}", path=str(ref), field="config") from None
        if not isinstance(config, dict):
            raise FormatError("config must be a JSON object", path=str(ref), field="config")
        layers = [Descriptor.parse(x, f"layers[{i}]", str(ref)) for i, x in enumerate(manifest["layers"])]
        return Image(str(ref.with_target(digest=digest)), digest, manifest, config, layers)

    # -- blobs ---------------------------------------------------------------------------------

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
                async with self._open(method, cached.url, None, headers=headers, timeout=timeout) as resp:
                    if resp.status in (200, 206):
                        return await handle(resp, cached.url)
                    self._redirects.pop(key, None)
                    if resp.status >= 500 or resp.status == 429:
                        await self._fail(resp, cached.url, f"blob {digest}")
                    log.info("redirect URL for %s answered %d; resolving it again", digest, resp.status)
        url = self.blob_url(ref, digest)
        scopes = (f"repository:{ref.repository}:pull",)
        async with self._open(method, url, ref, scopes, headers=headers, timeout=timeout) as resp:
            if resp.status in (200, 206):
                return await handle(resp, url)
            if resp.status not in _REDIRECT_STATUSES:
                await self._fail(resp, url, f"blob {digest}")
            target = self._redirect_target(url, resp)
        for _ in range(MAX_REDIRECTS):
            self.stats.incr(st.REDIRECTS)
            log.debug("blob %s redirected to %s", digest, safe_url(target))
            async with self._open(method, target, None, headers=headers, timeout=timeout) as resp:
                if resp.status in (200, 206):
                    self._redirects[key] = _Redirect(target, time.monotonic() + self.redirect_ttl)
                    return await handle(resp, target)
                if resp.status not in _REDIRECT_STATUSES:
                    if resp.status in (401, 403, 404, 410):
                        raise _Retry(f"redirect target {safe_url(target)} answered HTTP {resp.status}")
                    await self._fail(resp, target, f"blob {digest}")
                target = self._redirect_target(target, resp)
        raise RegistryError(f"blob {digest}: more than {MAX_REDIRECTS} redirects", path=safe_url(url))

    def _redirect_target(self, url: URL, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise _Retry(f"HTTP {resp.status} without a Location header")
        try:
            target = url.join(URL(location))
        except ValueError:
            raise RegistryError("redirect Location is not a URL", path=safe_url(url)) from None
        if target.scheme not in ("http", "https"):
            raise RegistryError("redirect to a non-http URL", path=safe_url(url), value=safe_url(target))
        if url.scheme == "https" and target.scheme == "http" and not self.is_insecure(_hostport(target)):
            raise RegistryError(
                "refusing a redirect from https to plain http (mark the host insecure to allow it)",
                path=safe_url(url),
                value=safe_url(target),
            )
        return target

    async def read_range(
        self, repo: Reference | str, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes:
        """Exactly ``length`` bytes of blob ``digest`` at ``offset``, or an error.

        The answer must be a 206 whose ``Content-Range`` is exactly the range asked for (and whose
        total is ``size`` when given) with a body of exactly ``length`` bytes. A 200 is taken only
        for ``offset == 0``: its first ``length`` bytes are used and the connection is closed.
        """
        ref = self._repo(repo)
        validate_digest(digest)
        if offset < 0 or length < 0:
            raise RegistryError(f"invalid range offset={offset} length={length}", path=str(ref))
        if length == 0:
            return b""
        if size is not None and offset + length > size:
            raise RegistryError(
                f"range [{offset}, {offset + length}) is beyond the blob's {size} bytes",
                path=f"{ref.name}@{digest}",
            )
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}

        async def handle(resp: aiohttp.ClientResponse, url: URL) -> bytes:
            data, _ = await self._range_body(resp, url, offset, length, size)
            return data

        what = f"GET {digest}[{offset}:{offset + length}]"
        return await self._retrying(
            what, self.blob_url(ref, digest), lambda _: self._blob_get(ref, digest, headers, handle)
        )

    async def read_ranges(
        self,
        repo: Reference | str,
        digest: str,
        ranges: Iterable[tuple[int, int]],
        *,
        size: int | None = None,
    ) -> list[bytes]:
        """Several ``(offset, length)`` ranges fetched concurrently (up to the connection limit)."""
        ref = self._repo(repo)
        return list(await asyncio.gather(*(self.read_range(ref, digest, o, n, size=size) for o, n in ranges)))

    async def _range_body(
        self, resp: aiohttp.ClientResponse, url: URL, offset: int, length: int, size: int | None
    ) -> tuple[bytes, int | None]:
        """Validate a range answer and read its body; return (data, total size if known)."""
        end = offset + length - 1
        if resp.status == 206:
            raw_range = resp.headers.get("Content-Range")
            parsed = parse_content_range(raw_range)
            if _media(resp.headers.get("Content-Type")).startswith("multipart/"):
                raise _Retry("multipart answer to a single-range request")
            if parsed is None or parsed[0] != offset or parsed[1] != end:
                raise _Retry(f"Content-Range {raw_range!r} is not the requested bytes {offset}-{end}")
            total = parsed[2]
            if size is not None and total is not None and total != size:
                raise _Retry(f"Content-Range total {total} is not the blob size {size}")
            if resp.content_length is not None and resp.content_length != length:
                raise _Retry(f"Content-Length {resp.content_length} for a {length}-byte range")
            data = await resp.content.readexactly(length)
            if resp.content_length is None and await resp.content.read(1):
                raise _Retry(f"body longer than the {length}-byte range")
        elif resp.status == 200:
            if offset != 0:
                raise _Retry(f"server ignored Range (HTTP 200 for bytes {offset}-{end})")
            total = resp.content_length
            if total is not None and size is not None and total != size:
                raise _Retry(f"HTTP 200 body of {total} bytes for a blob of {size}")
            if total is not None and total < length:
                raise _Retry(f"HTTP 200 body of {total} bytes, {length} wanted")
            data = await resp.content.readexactly(length)
            if total != length:
                resp.close()  # the rest of the body is not wanted: drop the connection
        else:
            raise AssertionError(resp.status)  # pragma: no cover - _blob_get passes only 200/206
        self.stats.incr(st.BYTES_FETCHED, len(data))
        return data, total

    async def blob_size(self, repo: Reference | str, digest: str) -> int:
        """Size of blob ``digest``: HEAD, or a ``Range: bytes=0-0`` GET's ``Content-Range`` total."""
        ref = self._repo(repo)
        validate_digest(digest)
        url = self.blob_url(ref, digest)
        scopes = (f"repository:{ref.repository}:pull",)

        async def head(_: int) -> int | None:
            async with self._open("HEAD", url, ref, scopes) as resp:
                if resp.status == 200 and resp.content_length is not None:
                    said = resp.headers.get("Docker-Content-Digest")
                    if said and said != digest:
                        raise RegistryError(
                            f"HEAD answered for digest {said}",
                            path=safe_url(url),
                            field="Docker-Content-Digest",
                        )
                    return resp.content_length
                if resp.status == 404:
                    await self._fail(resp, url, f"blob {digest}")
                if resp.status >= 500 or resp.status == 429:
                    await self._fail(resp, url, f"HEAD blob {digest}")
                return None  # 200 without length, a redirect, 405…: ask with a ranged GET

        size = await self._retrying(f"HEAD blob {digest}", url, head)
        if size is not None:
            return size

        async def handle(resp: aiohttp.ClientResponse, target: URL) -> int:
            _, total = await self._range_body(resp, target, 0, 1, None)
            if total is None:
                raise RegistryError("the registry does not say the blob's size", path=safe_url(target))
            return total

        headers = {"Range": "bytes=0-0"}
        return await self._retrying(
            f"size of blob {digest}", url, lambda _: self._blob_get(ref, digest, headers, handle)
        )

    async def get_blob(self, repo: Reference | str, digest: str, *, max_bytes: int | None = None) -> bytes:
        """A whole (small) blob in memory, its digest verified. Refused above ``max_bytes``."""
        ref = self._repo(repo)
        validate_digest(digest)
        limit = self.max_blob_bytes if max_bytes is None else max_bytes
        algorithm = digest.split(":", 1)[0]

        async def handle(resp: aiohttp.ClientResponse, url: URL) -> bytes:
            if resp.status != 200:
                raise _Retry(f"HTTP {resp.status} to a GET without Range")
            data = await _read_capped(resp, limit, url, "blob")
            if resp.content_length is not None and len(data) != resp.content_length:
                raise _Retry(f"body of {len(data)} bytes, Content-Length {resp.content_length}")
            self.stats.incr(st.BYTES_FETCHED, len(data))
            got = _digest_of(data, algorithm)
            if got != digest:
                raise _Retry(f"downloaded content has digest {got}")
            return data

        return await self._retrying(
            f"GET blob {digest}",
            self.blob_url(ref, digest),
            lambda _: self._blob_get(ref, digest, {}, handle, timeout=self.stream_timeout),
        )

    async def download_blob(self, repo: Reference | str, digest: str, path: str | os.PathLike[str]) -> int:
        """Stream a whole blob to ``path`` (via a temporary file and an atomic rename); digest verified."""
        ref = self._repo(repo)
        validate_digest(digest)
        dest = os.fspath(path)
        algorithm = digest.split(":", 1)[0]

        async def handle(resp: aiohttp.ClientResponse, url: URL) -> int:
            if resp.status != 200:
                raise _Retry(f"HTTP {resp.status} to a GET without Range")
            h = hashlib.new(algorithm)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), prefix=".part-")
            total = 0
            try:
                with os.fdopen(fd, "wb") as f:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
                        total += len(chunk)
                self.stats.incr(st.BYTES_FETCHED, total)
                if resp.content_length is not None and total != resp.content_length:
                    raise _Retry(f"body of {total} bytes, Content-Length {resp.content_length}")
                got = f"{algorithm}:{h.hexdigest()}"
                if got != digest:
                    raise _Retry(f"downloaded content has digest {got}")
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return total

        return await self._retrying(
            f"download blob {digest}",
            self.blob_url(ref, digest),
            lambda _: self._blob_get(ref, digest, {}, handle, timeout=self.stream_timeout),
        )

    # -- uploads -------------------------------------------------------------------------------

    async def blob_exists(self, repo: Reference | str, digest: str, *, push: bool = False) -> bool:
        """Whether the repository has blob ``digest`` (HEAD). ``push`` asks for a push-scoped token."""
        ref = self._repo(repo)
        validate_digest(digest)
        url = self.blob_url(ref, digest)
        scopes = (f"repository:{ref.repository}:{'pull,push' if push else 'pull'}",)

        async def attempt(_: int) -> bool:
            async with self._open("HEAD", url, ref, scopes) as resp:
                if resp.status in (200, *_REDIRECT_STATUSES):
                    return True
                if resp.status == 404:
                    return False
                await self._fail(resp, url, f"HEAD blob {digest}")
            raise AssertionError("unreachable")  # pragma: no cover

        return await self._retrying(f"HEAD blob {digest}", url, attempt)

    async def put_blob(
        self,
        repo: Reference | str,
        digest: str,
        data: bytes | str | os.PathLike[str],
        *,
        mount_from: str | None = None,
    ) -> str:
        """Upload a blob (bytes, or a file path); ``"mounted"`` or ``"uploaded"``.

        POST then PUT (distribution 2.8 ignores a body on the POST), or PATCH chunks of
        ``chunk_size`` then PUT for larger blobs. With ``mount_from`` (a repository on the same
        registry) the registry is first asked to mount the blob from there.
        """
        ref = self._repo(repo)
        validate_digest(digest)
        if isinstance(data, (bytes, bytearray, memoryview)):
            payload: bytes | None = bytes(data)
            path = None
            size = len(payload)
        else:
            payload = None
            path = os.fspath(data)
            size = os.path.getsize(path)
        scopes = [f"repository:{ref.repository}:pull,push"]
        start = self.base_url(ref) / ref.repository / "blobs" / "uploads" / ""
        if mount_from:
            scopes.append(f"repository:{mount_from}:pull")
            start = start.with_query({"mount": digest, "from": mount_from})

        async def attempt(_: int) -> str:
            async with self._open("POST", start, ref, scopes) as resp:
                if resp.status == 201 and mount_from:
                    return "mounted"
                if resp.status != 202:
                    await self._fail(resp, start, "start upload")
                location = self._upload_location(start, resp)
            if size <= self.chunk_size:
                body = payload if payload is not None else _read_file(path, 0, size)
                final = _with_digest(location, digest)
            else:
                location = await self._patch_chunks(ref, scopes, location, payload, path, size)
                body = b""
                final = _with_digest(location, digest)
            hdrs = {"Content-Type": "application/octet-stream"}
            async with self._open(
                "PUT", final, ref, scopes, headers=hdrs, data=body, timeout=self.stream_timeout
            ) as resp:
                if resp.status != 201:
                    await self._fail(resp, final, f"finish upload of {digest}")
                said = resp.headers.get("Docker-Content-Digest")
                if said and said != digest:
                    raise RegistryError(f"registry stored the blob as {said}", path=safe_url(final))
            return "uploaded"

        return await self._retrying(f"upload blob {digest}", start, attempt)

    def _upload_location(self, url: URL, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"HTTP {resp.status} without a Location header", path=safe_url(url))
        return url.join(URL(location, encoded=True))

    async def _patch_chunks(
        self,
        ref: Reference,
        scopes: Sequence[str],
        location: URL,
        payload: bytes | None,
        path: str | None,
        size: int,
    ) -> URL:
        pos = 0
        while pos < size:
            n = min(self.chunk_size, size - pos)
            chunk = payload[pos : pos + n] if payload is not None else _read_file(path, pos, n)
            hdrs = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{pos}-{pos + n - 1}",
            }
            async with self._open(
                "PATCH", location, ref, scopes, headers=hdrs, data=chunk, timeout=self.stream_timeout
            ) as resp:
                if resp.status != 202:
                    await self._fail(resp, location, "upload chunk")
                location = self._upload_location(location, resp)
            pos += n
        return location

    async def put_manifest(
        self, ref: Reference | str, data: bytes, media_type: str, *, target: str | None = None
    ) -> str:
        """PUT a manifest or index under ``target`` (default: the reference's tag or digest); its digest."""
        ref = self._repo(ref)
        target = target or ref.target
        digest = _digest_of(data)
        url = self.manifest_url(ref, target)
        scopes = (f"repository:{ref.repository}:pull,push",)

        async def attempt(_: int) -> str:
            hdrs = {"Content-Type": media_type}
            async with self._open("PUT", url, ref, scopes, headers=hdrs, data=data) as resp:
                if resp.status not in (200, 201):
                    await self._fail(resp, url, f"PUT manifest {target}")
                said = resp.headers.get("Docker-Content-Digest")
            if said and said != digest:
                raise RegistryError(
                    f"registry stored the manifest as {said}, not {digest}", path=safe_url(url)
                )
            return digest

        return await self._retrying(f"PUT manifest {target}", url, attempt)


def select_platform(index: Mapping[str, Any], platform: str, where: str) -> Descriptor:
    """The index entry for ``platform`` (``os/arch[/variant]``); ConfigError listing what there is."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError("index has no manifests list", path=where, field="manifests")
    descs = [Descriptor.parse(m, f"manifests[{i}]", where) for i, m in enumerate(entries)]
    candidates = [d for d in descs if d.platform_name and _platform_matches(d.platform_name, platform)]
    if not candidates:
        have = ", ".join(d.platform_name or "?" for d in descs)
        raise ConfigError(f"no manifest for platform {platform} (have: {have})", path=where)
    # an exact variant match beats an entry without a variant
    candidates.sort(key=lambda d: d.platform_name != platform)
    for d in candidates:
        if d.media_type in MANIFEST_TYPES or not d.media_type:
            return d
    return candidates[0]


def _hostport(url: URL | str | None) -> str:
    try:
        u = URL(str(url or ""))
    except ValueError:
        return ""
    if not u.host:
        return ""
    return f"{u.host}:{u.explicit_port}" if u.explicit_port else u.host


def _with_digest(location: URL, digest: str) -> URL:
    text = str(location)
    sep = "&" if "?" in text else "?"
    return URL(text + sep + "digest=" + digest.replace(":", "%3A"), encoded=True)


def _read_file(path: str | None, offset: int, length: int) -> bytes:
    assert path is not None
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise RegistryError(f"file shrank while uploading (read {len(data)} of {length} bytes)", path=path)
    return data


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


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, url: URL, what: str) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise RegistryError(
            f"{what} of {resp.content_length} bytes is larger than the {limit}-byte limit", path=safe_url(url)
        )
    data = await read_body(resp, limit + 1)
    if len(data) > limit:
        raise RegistryError(f"{what} is larger than the {limit}-byte limit", path=safe_url(url))
    if resp.content_length is not None and len(data) != resp.content_length:
        raise _Retry(f"{what} body of {len(data)} bytes, Content-Length {resp.content_length}")
    return data


async def _error_detail(resp: aiohttp.ClientResponse) -> str:
    """``: CODE: message`` from a registry error body, if there is one (at most 200 characters)."""
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


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, asyncio.IncompleteReadError):
        return f"connection closed after {len(e.partial)} of {e.expected} body bytes"
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "MANIFEST_ACCEPT",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "RawManifest",
    "RegistryClient",
    "parse_content_range",
    "select_platform",
]
