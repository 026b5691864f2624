"""A stand-in for Dragonfly's dfdaemon on loopback (Dragonfly is not installable on the test machines).

:class:`StandInDfdaemon` is a threaded HTTP server that does what obd needs of dfdaemon, and
records each request it carries (method, URL, ``Range``, ``X-Dragonfly-Priority``, mode):

- **proxy mode**: absolute-URI forward-proxy requests (``GET http://registry/v2/…``), forwarded
  to the target as they are;
- **prefix mode** (overlaybd's ``p2pConfig.address``): ``GET /<prefix>/http://registry/v2/…``,
  the target being everything after the prefix;
- ``GET /server/ping``: the health endpoint (``ping_url``; dfdaemon's health port answers it).

:meth:`StandInDfdaemon.stop` kills it the way a crash would: the listening socket and every open
connection are closed, so both new and pooled connections fail; :meth:`start` again binds the same
port.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

PING_PATH = "/server/ping"
_HOP_BY_HOP = ("proxy-connection", "connection", "keep-alive", "transfer-encoding", "te", "upgrade")


@dataclass(frozen=True)
class Carried:
    """One request the stand-in forwarded."""

    mode: str  # "proxy" or "prefix"
    method: str
    url: str
    range: str | None
    priority: str | None
    use_p2p: str | None


class StandInDfdaemon:
    """See the module docstring; ``prefix`` is the path of the prefix mode (``/dragonfly``)."""

    def __init__(self, prefix: str = "/dragonfly", port: int = 0):
        self.prefix = prefix.rstrip("/")
        self.carried: list[Carried] = []
        self.pings = 0
        self._port = port
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The proxy URL (``--p2p-proxy``)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def address(self) -> str:
        """The prefix-mode address (``--p2p-address``)."""
        return self.url + self.prefix

    @property
    def ping_url(self) -> str:
        return self.url + PING_PATH

    def blob_reads(self, digest: str | None = None) -> list[Carried]:
        """The blob requests carried (of blob ``digest`` only, when given)."""
        return [c for c in self.carried if f"/blobs/{digest or ''}" in c.url]

    def start(self) -> StandInDfdaemon:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with outer._lock:
                    outer._conns.add(self.connection)

            def finish(self) -> None:
                with outer._lock:
                    outer._conns.discard(self.connection)
                super().finish()

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in (*_HOP_BY_HOP, "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                if self.path == PING_PATH:
                    outer.pings += 1
                    self._reply(200, [("Content-Type", "text/plain")], b"OK")
                    return
                if self.path.startswith(("http://", "https://")):
                    mode, target = "proxy", self.path
                elif self.path.startswith(outer.prefix + "/http"):
                    mode, target = "prefix", self.path[len(outer.prefix) + 1 :]
                else:
                    self._reply(404, [], b"not a proxied URL")
                    return
                outer.carried.append(
                    Carried(
                        mode,
                        self.command,
                        target,
                        self.headers.get("Range"),
                        self.headers.get("X-Dragonfly-Priority"),
                        self.headers.get("X-Dragonfly-Use-P2P"),
                    )
                )
                u = urlsplit(target)
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("x-dragonfly-")
                }
                headers["Host"] = u.netloc
                conn.request(self.command, u.path + (f"?{u.query}" if u.query else ""), headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                self._reply(resp.status, resp.getheaders(), body)

            do_GET = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Die: no more connections, and the open ones cut."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._server = None
