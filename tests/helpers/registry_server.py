"""Test plumbing for the registry tests: a real ``docker-registry``, a token server, a fault-injecting proxy.

- :class:`RegistryServer` starts Debian's ``docker-registry`` (distribution 2.8) on a free
  127.0.0.1 port with a generated config and a temporary storage directory, in ``noauth``,
  ``htpasswd`` (bcrypt file made with ``htpasswd -Bbn``) or ``token`` mode.
- :class:`TokenServer` is a small aiohttp token service issuing RS256 JWTs (``x5c`` header, a
  self-signed certificate that the registry trusts as its ``rootcertbundle``) with scoped access:
  each user gets the actions its ACL allows on each requested repository, nothing else.
- :class:`FaultProxy` forwards to a registry and injects faults on chosen requests: 5xx/429
  answers, dropped connections mid-body, stalls, truncated bodies, wrong ``Content-Range``, a 200
  with the whole blob for a Range request, 401s, and redirects to a :class:`BlobStore` — a second
  server that, like object storage, refuses any request carrying ``Authorization``.

Every server runs its own event loop in a daemon thread (:class:`ServerThread`), so tests stay
synchronous.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import fnmatch
import ipaddress
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import ClientSession, ClientTimeout, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from fixtures import require_tool
from frontends.run.registry import LocalRegistry, free_port

SERVICE = "obd-test-registry"
ISSUER = "obd-test-issuer"


class ServerThread:
    """An aiohttp application served on 127.0.0.1 from a private event loop thread."""

    def __init__(
        self, app: web.Application, port: int | None = None, ssl_context: ssl.SSLContext | None = None
    ):
        self.app = app
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()

        async def up() -> None:
            self._runner = web.AppRunner(
                self.app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
            )
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()

        asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)
        return self

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self.call(self._runner.cleanup(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# -- token server ------------------------------------------------------------------------------


def _self_signed() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "obd test token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def tls_server_context(workdir: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 with a fresh self-signed certificate, and the certificate's path."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = workdir / "tls-cert.pem"
    key_path = workdir / "tls-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, cert_path


#: ACL: user (None = anonymous) → list of (repository glob, allowed actions).
Acl = dict[str | None, list[tuple[str, set[str]]]]


@dataclass
class Issued:
    user: str | None
    scopes: list[str]
    granted: list[dict[str, Any]]
    token: str = field(repr=False)


class TokenServer:
    """Issues distribution-style RS256 JWTs; see the module docstring."""

    def __init__(self, workdir: Path, users: dict[str, str], acl: Acl, *, ttl: int = 300):
        self.users = users
        self.acl = acl
        self.ttl = ttl
        self.key, self.cert = _self_signed()
        self.cert_path = workdir / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._key_pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._x5c = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issued: list[Issued] = []
        self.refused = 0
        #: answer the next this-many token requests with 503 (to test retries)
        self.fail_next = 0
        app = web.Application()
        app.router.add_get("/token", self._token)
        self.server = ServerThread(app)

    @property
    def realm(self) -> str:
        return f"{self.server.url}/token"

    def start(self) -> TokenServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def allowed(self, user: str | None, repo: str) -> set[str]:
        out: set[str] = set()
        for pattern, actions in self.acl.get(user, []):
            if fnmatch.fnmatchcase(repo, pattern):
                out |= actions
        return out

    def make_token(self, user: str | None, access: list[dict[str, Any]], ttl: int | None = None) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + (ttl or self.ttl),
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        return jwt.encode(claims, self._key_pem, algorithm="RS256", headers={"x5c": [self._x5c]})

    async def _token(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"details": "injected outage"}, status=503)
        user: str | None = None
        header = request.headers.get("Authorization", "")
        if header:
            try:
                scheme, _, b64 = header.partition(" ")
                name, _, password = base64.b64decode(b64).decode().partition(":")
            except ValueError:
                scheme, name, password = "", "", ""
            if scheme.lower() != "basic" or self.users.get(name) != password:
                self.refused += 1
                return web.json_response({"details": "bad credentials"}, status=401)
            user = name
        if request.query.get("service") != SERVICE:
            return web.json_response({"details": "unknown service"}, status=400)
        scopes = request.query.getall("scope", [])
        access = []
        for scope in scopes:
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository" or not name:
                    continue
                granted = sorted(set(actions.split(",")) & self.allowed(user, name))
                access.append({"type": "repository", "name": name, "actions": granted})
        token = self.make_token(user, access)
        self.issued.append(Issued(user, scopes, access, token))
        return web.json_response({"token": token, "expires_in": self.ttl, "issued_at": _now_iso()})


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


# -- the registry ------------------------------------------------------------------------------


class RegistryServer(LocalRegistry):
    """Debian's ``docker-registry`` on 127.0.0.1, in ``noauth``, ``htpasswd`` or ``token`` mode."""

    def __init__(
        self,
        workdir: Path,
        mode: str = "noauth",
        *,
        users: dict[str, str] | None = None,
        token_server: TokenServer | None = None,
        proxy_remote: str | None = None,
    ):
        """``proxy_remote`` makes it a pull-through cache of that registry URL (``proxy: remoteurl``)."""
        if mode not in ("noauth", "htpasswd", "token"):
            raise ValueError(mode)
        if mode == "token" and token_server is None:
            raise ValueError("token mode needs a TokenServer")
        super().__init__(workdir, binary=require_tool("docker-registry"))
        self.workdir = Path(workdir)
        self.mode = mode
        self.users = users or {}
        self.token_server = token_server
        self.proxy_remote = proxy_remote

    def _auth_config(self) -> list[str]:
        proxy = ["proxy:", f"  remoteurl: {self.proxy_remote}"] if self.proxy_remote else []
        return self._auth_section() + proxy

    def _auth_section(self) -> list[str]:
        if self.mode == "htpasswd":
            htpasswd = require_tool("htpasswd")
            entries = []
            for user, password in self.users.items():
                out = subprocess.run(
                    [htpasswd, "-Bbn", user, password], capture_output=True, check=True, timeout=60
                )
                entries.append(out.stdout.decode().strip())
            path = self.workdir / "htpasswd"
            path.write_text("\n".join(entries) + "\n")
            return ["auth:", "  htpasswd:", "    realm: obd-test", f"    path: {path}"]
        if self.mode == "token":
            assert self.token_server is not None
            return [
                "auth:",
                "  token:",
                f"    realm: {self.token_server.realm}",
                f"    service: {SERVICE}",
                f"    issuer: {ISSUER}",
                f"    rootcertbundle: {self.token_server.cert_path}",
            ]
        return []


# -- object storage stand-in -------------------------------------------------------------------


class BlobStore:
    """Serves registered blobs at signed, expiring URLs; refuses any request carrying Authorization."""

    def __init__(self, ttl: float = 3600.0):
        self.blobs: dict[str, bytes] = {}
        self.ttl = ttl
        self.requests = 0
        self.with_auth = 0
        self.expired = 0
        app = web.Application()
        app.router.add_route("*", "/blobs/{digest}", self._serve)
        self.server = ServerThread(app)

    def start(self) -> BlobStore:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def signed_url(self, digest: str) -> str:
        expires = time.time() + self.ttl
        return f"{self.server.url}/blobs/{digest}?expires={expires:.3f}&sig={secrets.token_hex(8)}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if "Authorization" in request.headers:
            self.with_auth += 1
            return web.Response(status=400, text="Only one auth mechanism allowed")
        if float(request.query.get("expires", "0")) < time.time():
            self.expired += 1
            return web.Response(status=403, text="Request has expired")
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.Response(status=404)
        rng = request.http_range
        if request.headers.get("Range"):
            start = rng.start or 0
            stop = len(data) if rng.stop is None else min(rng.stop, len(data))
            headers = {"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"}
            body = data[start:stop] if request.method != "HEAD" else b""
            return web.Response(status=206, body=body, headers=headers)
        return web.Response(status=200, body=data if request.method != "HEAD" else b"")


# -- fault-injecting proxy ---------------------------------------------------------------------


@dataclass
class Fault:
    """One kind of misbehaviour, applied to the next ``times`` matching requests (None = forever)."""

    kind: str
    times: int | None = 1
    status: int = 503
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    match: Callable[[web.Request], bool] | None = None
    body: bytes | None = None  # for ``status``: this body instead of a text saying it is a fault


def is_blob_get(request: web.Request) -> bool:
    return request.method == "GET" and "/blobs/sha256:" in request.path


def is_range_get(request: web.Request) -> bool:
    return is_blob_get(request) and "Range" in request.headers


_FORWARD_HEADERS = (
    "Content-Type",
    "Content-Range",
    "Docker-Content-Digest",
    "Docker-Distribution-Api-Version",
    "WWW-Authenticate",
    "Location",
    "Accept-Ranges",
    "Retry-After",
)


class FaultProxy:
    """Forwards every request to ``upstream`` unless a queued :class:`Fault` matches it."""

    def __init__(
        self, upstream: str, blobstore: BlobStore | None = None, ssl_context: ssl.SSLContext | None = None
    ):
        self.upstream = upstream.rstrip("/")
        self.blobstore = blobstore
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str, str | None, bool]] = []  # method, path, Range, had Authorization
        self.injected: list[str] = []
        self.active = 0
        self.max_active = 0
        self._session: ClientSession | None = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_cleanup.append(self._close)
        self.server = ServerThread(app, ssl_context=ssl_context)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> FaultProxy:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def add(
        self, kind: str, times: int | None = 1, match: Callable[[web.Request], bool] = is_range_get, **kw: Any
    ):
        self.faults.append(Fault(kind, times, match=match, **kw))

    def clear(self) -> None:
        self.faults.clear()
        self.seen.clear()
        self.injected.clear()
        self.max_active = 0

    async def _close(self, _: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def _take(self, request: web.Request) -> Fault | None:
        for fault in self.faults:
            if fault.match is None or fault.match(request):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                self.injected.append(fault.kind)
                return fault
        return None

    async def _upstream(
        self, request: web.Request, *, drop_range: bool = False, range_override: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self._session is None:
            self._session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=30))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        if drop_range:
            headers.pop("Range", None)
        if range_override is not None:
            headers["Range"] = range_override
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as resp:
            data = await resp.read()
            out = {k: resp.headers[k] for k in _FORWARD_HEADERS if k in resp.headers}
            return resp.status, out, data

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._dispatch(request)
        finally:
            self.active -= 1

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            (request.method, request.path, request.headers.get("Range"), "Authorization" in request.headers)
        )
        fault = self._take(request)
        if fault is None:
            status, headers, body = await self._upstream(request)
            return web.Response(status=status, headers=headers, body=body)
        kind = fault.kind
        if kind == "status":
            if fault.body is not None:  # a made-up answer, e.g. an API the upstream lacks
                return web.Response(status=fault.status, headers=fault.headers, body=fault.body)
            return web.Response(status=fault.status, headers=fault.headers, text="injected fault")
        if kind == "stall":
            await asyncio.sleep(fault.seconds)
            status, headers, body = await self._upstream(request)
            return web.Response(status=status, headers=headers, body=body)
        if kind == "redirect":
            assert self.blobstore is not None
            digest = request.path.rsplit("/", 1)[-1]
            return web.Response(status=307, headers={"Location": self.blobstore.signed_url(digest)})
        if kind == "full200":
            status, headers, body = await self._upstream(request, drop_range=True)
            headers.pop("Content-Range", None)
            return web.Response(status=status, headers=headers, body=body)
        if kind == "shifted_range":
            first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
            shift = 512
            status, headers, body = await self._upstream(
                request, range_override=f"bytes={int(first) + shift}-{int(last) + shift}"
            )
            return web.Response(status=status, headers=headers, body=body)
        status, headers, body = await self._upstream(request)
        if kind == "bad_range_header":
            headers["Content-Range"] = "bytes */99"
            return web.Response(status=status, headers=headers, body=body)
        if kind == "lying_range":
            # the right bytes under a header claiming others: must be refused all the same
            headers["Content-Range"] = headers["Content-Range"].replace("bytes ", "bytes 1", 1)
            return web.Response(status=status, headers=headers, body=body)
        if kind == "corrupt":
            flipped = bytes([body[-1] ^ 0xFF]) if body else b"x"
            return web.Response(status=status, headers=headers, body=body[:-1] + flipped)
        if kind == "truncate":
            # consistent framing (Content-Length matches), but fewer bytes than the range says
            return web.Response(status=status, headers=headers, body=body[: len(body) // 2])
        if kind in ("drop", "stall_body"):
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            if kind == "stall_body":
                await asyncio.sleep(fault.seconds)
                await resp.write(body[len(body) // 2 :])
                await resp.write_eof()
                return resp
            assert request.transport is not None
            request.transport.abort()
            return resp
        raise AssertionError(f"unknown fault {kind!r}")


__all__ = [
    "BlobStore",
    "Fault",
    "FaultProxy",
    "RegistryServer",
    "ServerThread",
    "TokenServer",
    "free_port",
    "is_blob_get",
    "is_range_get",
]
