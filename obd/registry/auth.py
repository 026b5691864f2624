"""Registry authentication: challenges, Bearer tokens, Basic auth and where credentials come from.

A registry that wants credentials answers 401 with ``WWW-Authenticate``. ``Basic realm="…"`` means
"send ``Authorization: Basic base64(user:pass)``"; ``Bearer realm="…",service="…",scope="…"``
means "get a token from ``realm`` for that service and scope, then send ``Authorization: Bearer
<token>``". :func:`parse_challenges` reads the header robustly (spaces after commas, quoted values
holding commas such as ``scope="repository:a:pull,push"``, escapes, several challenges in one header
— overlaybd's splitter gets the first two wrong, docs/formats.md §5.2). :class:`TokenCache` fetches a token
once per (realm, service, scopes), shares the fetch between concurrent requests, and refreshes it
before ``expires_in`` (default 60 s) runs out.

Credentials are looked up per registry by :class:`CredentialResolver`, first match wins:

1. explicit ones (command-line flags): one :class:`Credentials` for every registry, or a mapping
   from registry host to credentials;
2. the environment: ``OBD_REGISTRY_USER`` and ``OBD_REGISTRY_PASSWORD`` (both set), for every
   registry;
3. docker's ``config.json`` in ``$DOCKER_CONFIG`` or ``~/.docker``: ``credHelpers[host]``, then
   ``credsStore`` (both through ``docker-credential-<name> get``), then ``auths`` (``auth`` =
   base64 ``user:pass``, or ``username``/``password``; ``identitytoken`` for OAuth refresh
   tokens). Keys match docker-style: ``https://index.docker.io/v1/`` is Docker Hub, and a key's
   scheme and path are ignored (``https://host:5000/v1/`` matches ``host:5000``).

Secrets never reach a log line or an exception message: :class:`Credentials` and :class:`Token`
hide them in ``repr`` and every URL logged has its query string removed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yarl import URL

from obd.errors import AuthError, ConfigError, RegistryError
from obd.registry.reference import DOCKER_HUB_ALIASES

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("obd.registry.auth")

ENV_USER = "OBD_REGISTRY_USER"
ENV_PASSWORD = "OBD_REGISTRY_PASSWORD"
#: The key docker uses for Docker Hub in config.json and when asking credential helpers.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
#: Token lifetime assumed when the token service does not say (the distribution token spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0
#: Token responses are small; refuse to read more than this.
MAX_TOKEN_RESPONSE = 1 << 20
HELPER_TIMEOUT = 30.0


def safe_url(url: str | URL) -> str:
    """``url`` without user info, query or fragment: fit for logs and error messages."""
    try:
        u = URL(str(url))
        if not u.is_absolute():
            return str(u.with_query(None).with_fragment(None))
        return str(u.with_user(None).with_password(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<unparseable url>"


class TokenServiceError(RegistryError):
    """The token service could not be reached or failed (5xx): worth retrying, unlike a refusal."""


# -- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or an OAuth ``identity_token``); the secrets never show in ``repr``."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    #: Where these came from: ``flags``, ``env``, ``config.json auths[host]``, ``helper docker-credential-x``.
    source: str = ""

    def __repr__(self) -> str:
        secret = "<hidden>" if (self.password or self.identity_token) else "''"
        return f"Credentials(username={self.username!r}, secret={secret}, source={self.source!r})"

    __str__ = __repr__

    def basic_header(self) -> str:
        """The ``Authorization`` value for Basic auth."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _normalize_host(key: str) -> str:
    """docker's ``ConvertToHostname`` plus Docker Hub aliasing: scheme and path dropped, lowercase."""
    host = key.strip()
    for prefix in ("https://", "http://"):
        if host.lower().startswith(prefix):
            host = host[len(prefix) :]
            break
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in DOCKER_HUB_ALIASES else host


def _helper_server(registry: str) -> str:
    return DOCKER_HUB_KEY if _normalize_host(registry) == "docker.io" else registry


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    env = os.environ if env is None else env
    base = env.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".docker" / "config.json"


def run_credential_helper(name: str, server: str, timeout: float = HELPER_TIMEOUT) -> Credentials | None:
    """Ask ``docker-credential-<name> get`` for ``server``'s credentials; None when it has none."""
    program = f"docker-credential-{name}"
    path = shutil.which(program)
    if path is None:
        raise ConfigError(f"credential helper {program} not found on PATH", path=str(docker_config_path()))
    try:
        proc = subprocess.run(
            [path, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {program} did not answer within {timeout:g} s") from None
    except OSError as e:
        raise AuthError(f"cannot run credential helper {program}: {e.strerror}") from None
    if proc.returncode != 0:
        said = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        if "credentials not found" in said.lower():
            return None
        # the helper's own message names the problem; it carries no secret on failure
        raise AuthError(f"credential helper {program} failed (exit {proc.returncode}): {said[:200]}")
    try:
        obj = json.loads(proc.stdout)
        user, secret = obj.get("Username", ""), obj.get("Secret", "")
    except (ValueError, AttributeError):
        raise AuthError(f"credential helper {program} printed no JSON object") from None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    source = f"helper {program}"
    if user == "<token>":
        return Credentials(identity_token=secret, source=source)
    return Credentials(user, secret, source=source)


class CredentialResolver:
    """Finds the credentials for a registry (see the module docstring for the order); caches per host."""

    def __init__(
        self,
        explicit: Credentials | Mapping[str, Credentials] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        docker_config: str | os.PathLike[str] | None = None,
        use_docker_config: bool = True,
        helper_timeout: float = HELPER_TIMEOUT,
    ):
        self.explicit = explicit
        self.env = dict(os.environ if env is None else env)
        self.config_path = Path(docker_config) if docker_config else docker_config_path(self.env)
        self.use_docker_config = use_docker_config
        self.helper_timeout = helper_timeout
        self._cache: dict[str, Credentials | None] = {}

    def lookup(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` (as written in the reference, e.g. ``docker.io``), or None."""
        key = _normalize_host(registry)
        if key not in self._cache:
            self._cache[key] = self._find(registry)
            found = self._cache[key]
            log.debug("credentials for %s: %s", registry, found.source if found else "anonymous")
        return self._cache[key]

    def forget(self, registry: str) -> None:
        """Drop the cached answer for ``registry`` (to re-read config.json or re-ask a helper)."""
        self._cache.pop(_normalize_host(registry), None)

    def _find(self, registry: str) -> Credentials | None:
        if isinstance(self.explicit, Credentials):
            return self.explicit
        if isinstance(self.explicit, Mapping):
            want = _normalize_host(registry)
            for host, creds in self.explicit.items():
                if _normalize_host(host) == want:
                    return creds
        user, password = self.env.get(ENV_USER), self.env.get(ENV_PASSWORD)
        if user and password:
            return Credentials(user, password, source="env")
        if self.use_docker_config:
            return self._from_docker_config(registry)
        return None

    def _from_docker_config(self, registry: str) -> Credentials | None:
        path = self.config_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=path) from None
        try:
            config = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"not valid JSON: {e}", path=path) from None
        if not isinstance(config, dict):
            raise ConfigError("must be a JSON object", path=path)
        want = _normalize_host(registry)
        helpers = config.get("credHelpers") or {}
        if isinstance(helpers, dict):
            for host, name in helpers.items():
                if _normalize_host(host) == want and isinstance(name, str) and name:
                    found = run_credential_helper(name, _helper_server(registry), self.helper_timeout)
                    if found is not None:
                        return found
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            found = run_credential_helper(store, _helper_server(registry), self.helper_timeout)
            if found is not None:
                return found
        auths = config.get("auths") or {}
        if not isinstance(auths, dict):
            raise ConfigError("auths must be an object", path=path, field="auths")
        # an exact key first, then docker-style normalised keys in file order
        keys = [k for k in auths if k == registry] + [
            k for k in auths if k != registry and _normalize_host(k) == want
        ]
        for key in keys:
            found = _parse_auth_entry(auths[key], path, key)
            if found is not None:
                return found
        return None


def _parse_auth_entry(entry: Any, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    source = f"{path.name} auths[{key}]"
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(entry.get("username") or "", identity_token=token, source=source)
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=False).decode()
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(
                "auth is not base64 of user:password", path=path, field=f"auths[{key}].auth"
            ) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise ConfigError("auth is not base64 of user:password", path=path, field=f"auths[{key}].auth")
        return Credentials(user, password, source=source)
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(secret, str) and username:
        return Credentials(username, secret, source=source)
    return None


# -- challenges --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lowercase) and parameters (keys lowercase)."""

    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> tuple[str, ...]:
        """Scopes the challenge asks for (space-separated in one ``scope`` value, per RFC 6749)."""
        value = self.params.get("scope", "")
        return tuple(s for s in value.split(" ") if s)


_SEPARATORS = set(' \t,="')


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _read_token(text: str, pos: int) -> tuple[str, int]:
    start = pos
    while pos < len(text) and text[pos] not in _SEPARATORS:
        pos += 1
    return text[start:pos], pos


def _read_value(text: str, pos: int) -> tuple[str, int]:
    if pos < len(text) and text[pos] == '"':
        pos += 1
        out = []
        while pos < len(text):
            c = text[pos]
            if c == "\\" and pos + 1 < len(text):
                out.append(text[pos + 1])
                pos += 2
                continue
            if c == '"':
                return "".join(out), pos + 1
            out.append(c)
            pos += 1
        return "".join(out), pos  # unterminated: take what there is
    start = pos
    while pos < len(text) and text[pos] not in " \t,":
        pos += 1
    return text[start:pos], pos


def parse_challenges(header: str) -> list[Challenge]:
    """All challenges in one ``WWW-Authenticate`` value (RFC 7235 syntax, leniently)."""
    out: list[Challenge] = []
    pos, n = 0, len(header)
    while True:
        while pos < n and header[pos] in " \t,":
            pos += 1
        if pos >= n:
            return out
        scheme, pos = _read_token(header, pos)
        if not scheme:
            pos += 1  # a stray '=' or quote: skip it
            continue
        params: dict[str, str] = {}
        while True:
            mark = pos
            while mark < n and header[mark] in " \t,":
                mark += 1
            key, after_key = _read_token(header, mark)
            eq = _skip_ws(header, after_key)
            if not key or eq >= n or header[eq] != "=":
                break  # the next challenge's scheme, or the end
            value, pos = _read_value(header, _skip_ws(header, eq + 1))
            params[key.lower()] = value
        out.append(Challenge(scheme.lower(), params))


def parse_challenge(header: str) -> Challenge | None:
    """The most useful challenge in a header: Bearer if offered, else Basic, else the first."""
    found = parse_challenges(header)
    for scheme in ("bearer", "basic"):
        for ch in found:
            if ch.scheme == scheme:
                return ch
    return found[0] if found else None


# -- tokens ------------------------------------------------------------------------------------


@dataclass
class Token:
    """A Bearer token and when (monotonic clock) to stop using it; the value never shows in ``repr``."""

    value: str = field(repr=False)
    expires_at: float
    lifetime: float

    def fresh(self, now: float | None = None) -> bool:
        """Still usable: not within the refresh margin of its expiry (a fifth of its life, at most 10 s)."""
        now = time.monotonic() if now is None else now
        margin = min(10.0, self.lifetime / 5.0)
        return now < self.expires_at - margin


TokenKey = tuple[str, str, tuple[str, ...]]


class TokenCache:
    """Bearer tokens keyed by (realm, service, scopes); one fetch at a time per key."""

    def __init__(self) -> None:
        self._tokens: dict[TokenKey, Token] = {}
        self._pending: dict[TokenKey, asyncio.Future[Token]] = {}

    @staticmethod
    def key(challenge: Challenge, scopes: tuple[str, ...]) -> TokenKey:
        return (challenge.realm or "", challenge.service or "", tuple(sorted(set(scopes))))

    def invalidate(self, key: TokenKey, value: str | None = None) -> None:
        """Forget the token for ``key`` (only if it is still ``value``, when given)."""
        tok = self._tokens.get(key)
        if tok is not None and (value is None or tok.value == value):
            del self._tokens[key]

    def clear(self) -> None:
        self._tokens.clear()

    async def get(
        self,
        session: aiohttp.ClientSession,
        challenge: Challenge,
        scopes: tuple[str, ...],
        credentials: Credentials | None,
        *,
        timeout: aiohttp.ClientTimeout,
        allow_http: bool,
        on_request: Any = None,
        proxy_for: Callable[[URL], str | None] | None = None,
    ) -> tuple[TokenKey, Token]:
        """A fresh token for ``scopes``, fetched (once, for all concurrent callers) when needed."""
        key = self.key(challenge, scopes)
        tok = self._tokens.get(key)
        if tok is not None and tok.fresh():
            return key, tok
        pending = self._pending.get(key)
        if pending is not None:
            try:
                return key, await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this caller was cancelled
                # the caller that was fetching was cancelled: fetch here instead
        future: asyncio.Future[Token] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            tok = await fetch_token(
                session,
                challenge,
                key[2],
                credentials,
                timeout=timeout,
                allow_http=allow_http,
                on_request=on_request,
                proxy_for=proxy_for,
            )
        except Exception as e:
            future.set_exception(e)
            future.exception()  # retrieved here: concurrent waiters re-raise it themselves
            raise
        except BaseException:
            future.cancel()
            raise
        else:
            self._tokens[key] = tok
            future.set_result(tok)
            return key, tok
        finally:
            del self._pending[key]


async def fetch_token(
    session: aiohttp.ClientSession,
    challenge: Challenge,
    scopes: tuple[str, ...],
    credentials: Credentials | None,
    *,
    timeout: aiohttp.ClientTimeout,
    allow_http: bool = False,
    on_request: Any = None,
    proxy_for: Callable[[URL], str | None] | None = None,
) -> Token:
    """Get a Bearer token from the challenge's realm (distribution's token protocol).

    ``proxy_for`` says which HTTP proxy (if any) the request to the realm goes through.
    """
    import aiohttp  # deferred: 0.2 s to import (obd.registry docstring)

    realm = challenge.realm
    if not realm:
        raise AuthError("Bearer challenge without a realm", field="WWW-Authenticate")
    try:
        url = URL(realm)
    except ValueError:
        raise AuthError("Bearer realm is not a URL", field="realm", value=safe_url(realm)) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise AuthError("Bearer realm is not an http(s) URL", field="realm", value=safe_url(realm))
    if url.scheme == "http" and not allow_http and credentials is not None:
        raise AuthError(
            "refusing to send credentials to a plain-http token service (mark the registry insecure)",
            field="realm",
            value=safe_url(realm),
        )
    query: list[tuple[str, str]] = []
    if challenge.service:
        query.append(("service", challenge.service))
    headers = {"Accept": "application/json"}
    proxy = proxy_for(url) if proxy_for is not None else None
    if credentials is not None and credentials.identity_token:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": credentials.identity_token,
            "client_id": "obd",
            "scope": " ".join(scopes),
        }
        if challenge.service:
            form["service"] = challenge.service
        request = session.post(
            url, data=form, headers=headers, timeout=timeout, allow_redirects=False, proxy=proxy
        )
    else:
        query.extend(("scope", s) for s in scopes)
        if credentials is not None and credentials.username:
            query.append(("account", credentials.username))
            headers["Authorization"] = credentials.basic_header()
        request = session.get(
            url.extend_query(query), headers=headers, timeout=timeout, allow_redirects=False, proxy=proxy
        )
    started = time.monotonic()
    if on_request is not None:
        on_request()
    try:
        async with request as resp:
            body = b""
            while len(body) <= MAX_TOKEN_RESPONSE:
                chunk = await resp.content.read(MAX_TOKEN_RESPONSE + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as e:
        raise TokenServiceError(
            f"token request failed: {type(e).__name__}: {e}", path=safe_url(realm), field="token"
        ) from None
    if status in (401, 403):
        who = f"user {credentials.username!r}" if credentials and credentials.username else "anonymous access"
        raise AuthError(f"token service refused {who} (HTTP {status})", path=safe_url(realm), field="token")
    if status >= 500 or status == 429:
        raise TokenServiceError(f"token service answered HTTP {status}", path=safe_url(realm), field="token")
    if status != 200:
        raise RegistryError(f"token service answered HTTP {status}", path=safe_url(realm), field="token")
    if len(body) > MAX_TOKEN_RESPONSE:
        raise AuthError("token response is larger than 1 MiB", path=safe_url(realm), field="token")
    try:
        obj = json.loads(body)
    except ValueError:
        raise AuthError("token response is not JSON", path=safe_url(realm), field="token") from None
    value = obj.get("token") or obj.get("access_token") if isinstance(obj, dict) else None
    if not isinstance(value, str) or not value:
        raise AuthError("token response holds no token or access_token", path=safe_url(realm), field="token")
    lifetime = obj.get("expires_in")
    if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    lifetime = float(lifetime)
    log.debug(
        "token for %s from %s, expires in %.0f s", " ".join(scopes) or "(no scope)", safe_url(realm), lifetime
    )
    return Token(value, started + lifetime, lifetime)


__all__ = [
    "ENV_PASSWORD",
    "ENV_USER",
    "Challenge",
    "CredentialResolver",
    "Credentials",
    "Token",
    "TokenCache",
    "TokenServiceError",
    "docker_config_path",
    "fetch_token",
    "parse_challenge",
    "parse_challenges",
    "run_credential_helper",
    "safe_url",
]
