"""Mirrors from containerd-style ``hosts.toml``, Docker Hub short names and HTTP proxies.

Real parts: Debian's ``docker-registry`` as the origin, a second one in pull-through mode
(``proxy: remoteurl``) as the mirror, and a loopback forward proxy that records what it forwards.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import http.server
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from registry_server import FaultProxy, RegistryServer, TokenServer, free_port, tls_server_context

from fixtures import FIXTURES
from obd.cli import main
from obd.errors import ConfigError, RegistryError
from obd.image.remote import RemoteOptions, repo_blob_url, resolve_image
from obd.observability.stats import Stats
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient
from obd.registry.auth import Credentials
from obd.registry.hosts import HostsResolver, cert_files, load_hosts, parse_go_duration, parse_hosts_toml
from obd.registry.push import push_layout

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
ACI = FIXTURES / "aci-hello-world"
CONVERTED = "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"


def new_client(hosts_dir: Path | None, **kw) -> RegistryClient:
    kw.setdefault("credentials", CredentialResolver(env={}, use_docker_config=False))
    kw.setdefault("insecure", True)
    kw.setdefault("stats", Stats())
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return RegistryClient(hosts=[hosts_dir] if hosts_dir else [], **kw)


def write_hosts(root: Path, registry: str, text: str) -> Path:
    folder = root / registry
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts.toml").write_text(text)
    return root


def mirror_toml(url: str, capabilities: str = '["pull", "resolve"]') -> str:
    return f'[host."{url}"]\n  capabilities = {capabilities}\n'


def wait_stored(registry: RegistryServer, digests: list[str], timeout: float = 30.0) -> None:
    """Wait until a pull-through registry has stored ``digests`` (it writes them in the background)."""
    root = registry.storage / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    paths = [root / d[7:9] / d[7:] / "data" for d in digests]
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"the mirror did not store {digests} within {timeout} s"
        time.sleep(0.05)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def runner():
    r = AsyncRunner("test-registry-mirrors")
    yield r
    r.close()


@pytest.fixture(scope="module")
def origin(tmp_path_factory, runner):
    """A registry holding the ACI fixture as ``aci/hello`` and as Docker Hub's ``library/hello``."""
    reg = RegistryServer(tmp_path_factory.mktemp("origin"), "noauth").start()
    c = new_client(None)
    runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
    runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/library/hello:tag"), 60)
    runner.run(c.aclose(), 10)
    yield reg
    reg.stop()


def layer_of(client: RegistryClient, runner: AsyncRunner, ref: str) -> tuple[str, int]:
    image = runner.run(client.get_image(ref), 60)
    layer = image.layers[0]
    return layer.digest, layer.size


# -- hosts.toml parsing ------------------------------------------------------------------------


def test_hosts_toml_fields_and_defaults(tmp_path):
    cfg = parse_hosts_toml(
        """
server = "https://registry.example.com:5000"
skip_verify = true
[host."mirror.example.com"]
  capabilities = ["pull"]
[host."http://10.0.0.1:5001/cache/v2"]
  ca = ["/a.pem", "/b.pem"]
  client = [["/c.pem", "/c.key"], "/d.pem"]
  [host."http://10.0.0.1:5001/cache/v2".header]
    x-one = "1"
    x-many = ["a", "b"]
[host."https://odd.example.com/api"]
  override_path = true
""",
        "registry.example.com:5000",
        "x/hosts.toml",
    )
    first, second, third = cfg.mirrors
    assert first.url == "https://mirror.example.com/v2" and first.capabilities == {"pull"}
    assert second.url == "http://10.0.0.1:5001/cache/v2" and second.is_http
    assert second.capabilities == {"pull", "resolve", "push"}
    assert second.ca == ("/a.pem", "/b.pem") and second.client == (("/c.pem", "/c.key"), ("/d.pem", None))
    assert dict(second.headers) == {"x-one": "1", "x-many": "a, b"}
    assert third.url == "https://odd.example.com/api"
    assert cfg.origin is not None and cfg.origin.url == "https://registry.example.com:5000/v2"
    assert cfg.origin.skip_verify
    assert [m.url for m in cfg.mirrors_for("resolve")] == [second.url, third.url]
    docker = parse_hosts_toml("skip_verify = false\n", "docker.io")
    assert docker.origin is not None and docker.origin.url == "https://registry-1.docker.io/v2"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('[host."https://m"]\ncapabilities = ["pull", "fetch"]\n', 'host."https://m".capabilities', "capab"),
        ('[host."https://m"]\nskip_verify = "yes"\n', 'host."https://m".skip_verify', "true or false"),
        ('[host."https://m"]\ncolour = 1\n', 'host."https://m".colour', "unknown key"),
        ('[host."ftp://m"]\n', 'host."ftp://m"', "http"),
        ("server = 5\n", "server", "URL"),
        ('[host."https://m"]\nheader = "x"\n', 'host."https://m".header', "table"),
    ],
)
def test_hosts_toml_errors_name_file_and_field(text, field, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_hosts_toml(text, "example.com", "/etc/h/example.com/hosts.toml")
    assert e.value.path == "/etc/h/example.com/hosts.toml" and e.value.field == field


def test_invalid_toml_names_file():
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        parse_hosts_toml("server = [", "example.com", "f/hosts.toml")
    assert e.value.path == "f/hosts.toml"


def test_lookup_order_and_default_namespace(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_hosts(b, "example.com:5000", mirror_toml("https://b-mirror"))
    write_hosts(a, "_default", mirror_toml("https://a-default"))
    write_hosts(b, "_default", mirror_toml("https://b-default"))
    assert load_hosts("example.com:5000", [a, b]).mirrors[0].url == "https://b-mirror/v2"
    assert load_hosts("other.com", [a, b]).mirrors[0].url == "https://a-default/v2"
    assert load_hosts("other.com", [tmp_path / "none"]).mirrors == ()
    write_hosts(a, "docker.io", mirror_toml("https://hub-mirror"))
    resolver = HostsResolver.from_dirs([a])
    assert resolver.hosts("docker.io").mirrors[0].url == "https://hub-mirror/v2"


def test_docs_hosts_toml_example_parses():
    text = (ROOT / "docs" / "registry.md").read_text()
    section = text.split("## Mirrors and proxies", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example, "docs/registry.md: no toml example in 'Mirrors and proxies'"
    cfg = parse_hosts_toml(example.group(1), "docker.io", "docs/registry.md")
    assert cfg.origin is not None and cfg.origin.url == "https://registry-1.docker.io/v2"
    local, remote = cfg.mirrors
    assert local.url == "http://127.0.0.1:5001/v2" and local.capabilities == {"pull", "resolve"}
    assert dict(local.headers) == {"x-fleet": "rack-7"}
    assert remote.url == "https://mirror.example.com/dockerhub/v2" and remote.capabilities == {"pull"}
    assert remote.ca == ("/etc/obd/mirror-ca.pem",)


# -- mirrors against real registries -----------------------------------------------------------


def test_pull_through_mirror_keeps_serving_after_origin_stops(tmp_path, runner):
    origin = RegistryServer(tmp_path / "origin", "noauth").start()
    mirror = None
    try:
        c = new_client(None)
        runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{origin.host}/aci/hello"), 60)
        runner.run(c.aclose(), 10)
        mirror = RegistryServer(tmp_path / "mirror", "noauth", proxy_remote=origin.url).start()
        # a recording proxy in front of the mirror shows which host served what
        front = FaultProxy(mirror.url).start()
        hosts = write_hosts(tmp_path / "hosts", origin.host, mirror_toml(front.server.url))
        client = new_client(hosts)
        ref = f"{origin.host}/aci/hello:amd64-converted"
        digest, size = layer_of(client, runner, ref)
        whole = runner.run(client.get_blob(ref, digest, max_bytes=size), 60)  # warms the mirror
        assert sha256(whole) == digest
        assert any(path.endswith(f"/blobs/{digest}") for _, path, _, _ in front.seen)
        assert any("/manifests/amd64-converted" in path for _, path, _, _ in front.seen)
        image = runner.run(client.get_image(ref), 30)
        wait_stored(mirror, [digest, image.manifest_digest, image.manifest["config"]["digest"]])
        origin.stop()
        # the pull-through cache answers from its own storage now, tags included
        again = new_client(hosts)
        assert layer_of(again, runner, ref) == (digest, size)
        part = runner.run(again.read_range(ref, digest, 100, 4000, size=size), 60)
        assert part == whole[100:4100]
        assert runner.run(again.blob_size(ref, digest), 30) == size
        image = runner.run(again.get_image(ref), 30)
        assert image.reference.startswith(f"{origin.host}/aci/hello@")  # named after the origin
        for c in (client, again):
            runner.run(c.aclose(), 10)
        front.stop()
    finally:
        origin.stop()
        if mirror is not None:
            mirror.stop()


def test_mirror_down_or_failing_falls_back_to_origin(origin, tmp_path, runner):
    dead = f"http://127.0.0.1:{free_port()}"
    failing = FaultProxy(origin.url).start()
    failing.add("status", times=None, status=503, match=lambda r: True)
    try:
        hosts = write_hosts(
            tmp_path / "hosts", origin.host, mirror_toml(dead) + mirror_toml(failing.server.url)
        )
        client = new_client(hosts, mirror_cooldown=3600)
        ref = f"{origin.host}/aci/hello:amd64-converted"
        digest, size = layer_of(client, runner, ref)
        data = runner.run(client.read_range(ref, digest, 0, size, size=size), 60)
        assert sha256(data) == digest
        tried = len(failing.seen)
        assert tried >= 1  # the failing mirror was asked, and answered 503
        runner.run(client.read_range(ref, digest, 10, 10, size=size), 60)
        assert len(failing.seen) == tried  # a failed mirror is skipped during its cooldown
        runner.run(client.aclose(), 10)
    finally:
        failing.stop()


def test_mirror_404_falls_back_without_cooldown(origin, tmp_path, runner):
    empty = RegistryServer(tmp_path / "empty", "noauth").start()
    front = FaultProxy(empty.url).start()
    try:
        hosts = write_hosts(tmp_path / "hosts", origin.host, mirror_toml(front.server.url))
        client = new_client(hosts)
        ref = f"{origin.host}/aci/hello:amd64-converted"
        assert runner.run(client.get_manifest(ref), 30)[0] == CONVERTED
        before = len(front.seen)
        runner.run(client.get_manifest(ref), 30)
        assert len(front.seen) > before  # a 404 is no reason to stop asking the mirror
        runner.run(client.aclose(), 10)
    finally:
        front.stop()
        empty.stop()


def test_resolve_capability_only_for_tags(origin, tmp_path, runner):
    front = FaultProxy(origin.url).start()
    try:
        hosts = write_hosts(tmp_path / "hosts", origin.host, mirror_toml(front.server.url, '["pull"]'))
        client = new_client(hosts)
        runner.run(client.get_manifest(f"{origin.host}/aci/hello:amd64-converted"), 30)
        assert front.seen == []  # a pull-only mirror does not resolve tags
        runner.run(client.get_manifest(f"{origin.host}/aci/hello@{CONVERTED}"), 30)
        assert any(path.endswith(f"/manifests/{CONVERTED}") for _, path, _, _ in front.seen)
        runner.run(client.aclose(), 10)
    finally:
        front.stop()


def test_mirror_headers_are_sent(origin, tmp_path, runner):
    front = FaultProxy(origin.url).start()
    seen_headers: list[str | None] = []
    front.add("status", times=None, match=lambda r: seen_headers.append(r.headers.get("x-fleet")) and False)
    try:
        text = (
            mirror_toml(front.server.url) + f'  [host."{front.server.url}".header]\n    x-fleet = "rack-7"\n'
        )
        client = new_client(write_hosts(tmp_path / "hosts", origin.host, text))
        runner.run(client.get_manifest(f"{origin.host}/aci/hello:amd64-converted"), 30)
        assert seen_headers and set(seen_headers) == {"rack-7"}
        runner.run(client.aclose(), 10)
    finally:
        front.stop()


# -- Docker Hub short names --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["hello:tag", "docker.io/library/hello:tag", "index.docker.io/library/hello:tag"]
)
def test_docker_hub_names_through_a_mirror(origin, tmp_path, runner, name):
    hosts = write_hosts(tmp_path / "hosts", "docker.io", mirror_toml(origin.url))
    opts = RemoteOptions(hosts_dirs=(str(hosts),), no_cache=True, stats=Stats())
    try:
        ref, image = resolve_image(name, opts)
        assert (ref.registry, ref.repository, ref.tag) == ("docker.io", "library/hello", "tag")
        assert ref.api_host == "registry-1.docker.io"
        assert image.manifest_digest == CONVERTED
        layer = image.layers[0]
        client = opts.client()
        data = opts.runner.run(client.read_range(ref, layer.digest, 0, 512, size=layer.size), 30)
        assert len(data) == 512
    finally:
        opts.close()


def test_cli_hosts_dir_pulls_a_short_name_through_the_mirror(origin, tmp_path, capsys):
    hosts = write_hosts(tmp_path / "hosts", "docker.io", mirror_toml(origin.url))
    layout = tmp_path / "layout"
    args = ["--hosts-dir", str(hosts), "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(["pull", "hello:tag", f"oci:{layout}:mine", *args]) == 0
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [CONVERTED]
    assert "--hosts-dir DIR" in _help("pull", capsys) and "--proxy URL" in _help("pull", capsys)


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


# -- HTTP proxy --------------------------------------------------------------------------------


class RecordingProxy:
    """A loopback forward proxy for plain-http targets (absolute-URI requests); records each request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                outer.seen.append((self.command, self.path, self.headers.get("Range")))
                target = http.client.urlsplit(self.path)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection",)}
                path = target.path + (f"?{target.query}" if target.query else "")
                conn.request(self.command, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> RecordingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_proxy_option_forwards_range_requests(origin, tmp_path, runner, monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    proxy = RecordingProxy().start()
    try:
        client = new_client(None, proxy=proxy.url)
        ref = f"{origin.host}/aci/hello:amd64-converted"
        digest, size = layer_of(client, runner, ref)
        data = runner.run(client.read_range(ref, digest, 1000, 2000, size=size), 30)
        assert len(data) == 2000
        ranged = [r for _, path, r in proxy.seen if path.endswith(f"/blobs/{digest}") and r]
        assert "bytes=1000-2999" in ranged
        assert all(path.startswith(f"http://{origin.host}/v2/") for _, path, _ in proxy.seen)
        runner.run(client.aclose(), 10)
    finally:
        proxy.stop()


def test_proxy_from_environment_and_no_proxy(origin, tmp_path, runner, monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "no_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    proxy = RecordingProxy().start()
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        client = new_client(None)
        ref = f"{origin.host}/aci/hello:amd64-converted"
        layer_of(client, runner, ref)
        assert proxy.seen
        runner.run(client.aclose(), 10)
        proxy.seen.clear()
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        direct = new_client(None)
        layer_of(direct, runner, ref)
        assert proxy.seen == []
        runner.run(direct.aclose(), 10)
    finally:
        proxy.stop()


def test_token_requests_go_through_the_proxy(tmp_path, runner, monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    tokens = TokenServer(
        tmp_path, {"alice": "pw"}, {"alice": [("*", {"pull", "push"})], None: [("*", {"pull"})]}
    )
    tokens.start()
    reg = RegistryServer(tmp_path, "token", token_server=tokens).start()
    proxy = RecordingProxy().start()
    try:
        pusher = new_client(None, credentials=CredentialResolver(Credentials("alice", "pw"), env={}))
        runner.run(push_layout(pusher, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
        runner.run(pusher.aclose(), 10)
        client = new_client(None, proxy=proxy.url)
        layer_of(client, runner, f"{reg.host}/aci/hello:amd64-converted")
        assert any(path.startswith(f"{tokens.realm}?") for _, path, _ in proxy.seen)
        runner.run(client.aclose(), 10)
    finally:
        proxy.stop()
        reg.stop()
        tokens.stop()


def test_bad_proxy_url_is_a_config_error():
    with pytest.raises(ConfigError, match="proxy"):
        new_client(None, proxy="socks5://127.0.0.1:1080")


# -- --tls-verify=false: HTTPS without verification, then plain HTTP -----------------------------


class TlsRegistry(RegistryServer):
    """Debian's ``docker-registry`` serving HTTPS itself (``http.tls``) with a self-signed certificate."""

    def __init__(self, workdir: Path):
        super().__init__(workdir, "noauth")
        _, self.cert = tls_server_context(workdir)
        self.key = workdir / "tls-key.pem"

    def _auth_config(self) -> list[str]:
        # continues the config's ``http:`` section, which ends right before these lines
        return ["  tls:", f"    certificate: {self.cert}", f"    key: {self.key}", *super()._auth_config()]


def test_tls_verify_false_is_unverified_https_else_plain_http(origin, tmp_path, runner):
    reg = TlsRegistry(tmp_path).start()
    try:
        pusher = new_client(None, insecure=False, ca_file=reg.cert)
        runner.run(push_layout(pusher, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
        runner.run(pusher.aclose(), 10)
        tls_ref = f"{reg.host}/aci/hello:amd64-converted"
        verified = new_client(None, insecure=False)
        with pytest.raises(RegistryError, match="TLS"):
            layer_of(verified, runner, tls_ref)
        runner.run(verified.aclose(), 10)

        client = new_client(None, insecure=False, tls_verify=False)
        digest, size = layer_of(client, runner, tls_ref)  # self-signed: accepted without checks
        assert len(runner.run(client.read_range(tls_ref, digest, 0, 100, size=size), 30)) == 100
        assert client.base_url(client._repo(tls_ref)).scheme == "https"
        assert client.stats["errors"] == 0

        http_ref = f"{origin.host}/aci/hello:amd64-converted"
        before = client.stats["requests"]
        digest, size = layer_of(client, runner, http_ref)  # plain HTTP only: one failed TLS attempt
        assert client.base_url(client._repo(http_ref)).scheme == "http"
        after_resolve = client.stats["requests"]
        assert len(runner.run(client.read_range(http_ref, digest, 0, 100, size=size), 30)) == 100
        assert client.stats["requests"] == after_resolve + 1  # no TLS attempt any more
        plain = new_client(None, insecure=True)
        layer_of(plain, runner, http_ref)
        assert after_resolve - before == plain.stats["requests"] + 1
        for c in (client, plain):
            runner.run(c.aclose(), 10)
    finally:
        reg.stop()


def test_insecure_registry_is_https_first_per_host(origin, tmp_path, runner):
    """docker's ``--insecure-registry HOST``: HTTPS without certificate checks for that host only (a
    self-signed registry works without --ca-file), plain HTTP for one that does not speak TLS."""
    reg = TlsRegistry(tmp_path).start()
    try:
        pusher = new_client(None, insecure=False, ca_file=reg.cert)
        runner.run(push_layout(pusher, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
        runner.run(pusher.aclose(), 10)
        tls_ref = f"{reg.host}/aci/hello:amd64-converted"
        http_ref = f"{origin.host}/aci/hello:amd64-converted"

        opts = RemoteOptions(insecure=(reg.host, origin.host), hosts_dirs=(), stats=Stats())
        client = opts.client()
        digest, size = layer_of(client, runner, tls_ref)  # self-signed, yet accepted for this host
        assert len(runner.run(client.read_range(tls_ref, digest, 0, 100, size=size), 30)) == 100
        assert not opts.is_http(reg.host)
        digest, size = layer_of(client, runner, http_ref)  # no TLS there: plain HTTP from then on
        assert opts.is_http(origin.host)
        assert repo_blob_url(client._repo(http_ref), opts).startswith("http://")
        assert repo_blob_url(client._repo(tls_ref), opts).startswith("https://")

        # certificate checks stay on for every other host
        only_http = RemoteOptions(insecure=(origin.host,), hosts_dirs=(), stats=Stats()).client()
        with pytest.raises(RegistryError, match="TLS"):
            layer_of(only_http, runner, tls_ref)
        for c in (client, only_http):
            runner.run(c.aclose(), 10)
    finally:
        reg.stop()


# -- docker's certs.d files and containerd's dial_timeout -----------------------------------------


def test_dial_timeout_is_a_go_duration(tmp_path):
    cfg = parse_hosts_toml(
        'dial_timeout = "1m30s"\n[host."https://m"]\n  dial_timeout = "250ms"\n[host."https://n"]\n',
        "example.com",
    )
    assert cfg.origin is not None and cfg.origin.dial_timeout == 90.0
    assert [m.dial_timeout for m in cfg.mirrors] == [0.25, None]
    assert parse_go_duration("1.5h") == 5400.0 and parse_go_duration(".5s") == 0.5
    for bad in ["", "5", "2 s", "s", "1x", "0s", "-1s"]:
        with pytest.raises(ConfigError, match="duration|positive"):
            parse_go_duration(bad)
    with pytest.raises(ConfigError, match="duration string") as e:
        parse_hosts_toml('[host."https://m"]\ndial_timeout = 5\n', "example.com", "h/hosts.toml")
    assert e.value.field == 'host."https://m".dial_timeout' and e.value.path == "h/hosts.toml"


def test_dial_timeout_sets_the_connect_timeout_of_its_host_only(tmp_path, runner):
    hosts = write_hosts(tmp_path, "example.com", '[host."https://m.example"]\n  dial_timeout = "2s"\n')
    client = new_client(hosts, connect_timeout=10.0)
    client._hosts_of("example.com")
    assert client._dial_timeout("m.example", client.timeout).sock_connect == 2.0
    assert client._dial_timeout("m.example", client.timeout).sock_read == client.timeout.sock_read
    assert client._dial_timeout("example.com", client.timeout).sock_connect == 10.0
    runner.run(client.aclose(), 10)


def test_cert_files_follow_docker(tmp_path):
    folder = tmp_path / "registry.example.com"
    folder.mkdir()
    assert cert_files(folder) == ((), ())
    for name in ["ca.crt", "b.crt", "client.cert", "client.key", "README"]:
        (folder / name).write_text("x")
    cas, pairs = cert_files(folder)
    assert cas == (str(folder / "b.crt"), str(folder / "ca.crt"))
    assert pairs == ((str(folder / "client.cert"), str(folder / "client.key")),)
    cfg = load_hosts("registry.example.com", [tmp_path])
    assert cfg.origin is not None and cfg.origin.url == "https://registry.example.com/v2"
    assert cfg.origin.ca == cas and cfg.origin.client == pairs and cfg.mirrors == ()
    (folder / "lone.key").write_text("x")
    with pytest.raises(ConfigError, match="without its certificate") as e:
        cert_files(folder)
    assert e.value.path == str(folder / "lone.key")
    (folder / "lone.key").unlink()
    (folder / "other.cert").write_text("x")
    with pytest.raises(ConfigError, match="without its key"):
        load_hosts("registry.example.com", [tmp_path])
    (folder / "hosts.toml").write_text("")  # hosts.toml present: the certificate files are not read
    assert load_hosts("registry.example.com", [tmp_path]).origin is None


def _ca_and_client(workdir: Path) -> tuple[Path, Path, Path]:
    """A fresh CA (``clients-ca.pem``) and a client certificate it signed (``client.cert``/``.key``)."""
    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: str, key, signer, ca: bool):  # type: ignore[no-untyped-def]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = build("obd test client CA", "obd test client CA", ca_key, ca_key, True)
    client = build("obd test client", "obd test client CA", client_key, ca_key, False)
    paths = (workdir / "clients-ca.pem", workdir / "client.cert", workdir / "client.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        client_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


class ClientCertRegistry(TlsRegistry):
    """A TLS registry that refuses clients without a certificate its ``clientcas`` signed."""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.clients_ca, self.client_cert, self.client_key = _ca_and_client(workdir)

    def _auth_config(self) -> list[str]:
        tls, rest = super()._auth_config()[:3], super()._auth_config()[3:]
        return [*tls, "    clientcas:", f"      - {self.clients_ca}", *rest]


def test_certs_d_ca_and_client_certificate_reach_a_tls_registry(tmp_path, runner):
    """docker's ``certs.d/HOST:PORT/{ca.crt,client.cert,client.key}`` against Debian's
    docker-registry serving TLS that requires client certificates (``http.tls.clientcas``)."""
    reg = ClientCertRegistry(tmp_path).start()
    try:
        certs = tmp_path / "certs.d"
        folder = certs / reg.host
        folder.mkdir(parents=True)
        shutil.copy(reg.cert, folder / "ca.crt")
        ref = f"{reg.host}/aci/hello:amd64-converted"
        without_client = new_client(certs, insecure=False)
        with pytest.raises(RegistryError, match="certificate"):  # CA trusted; no client cert
            runner.run(without_client.get_image(ref), 60)
        runner.run(without_client.aclose(), 10)
        shutil.copy(reg.client_cert, folder / "client.cert")
        shutil.copy(reg.client_key, folder / "client.key")
        pusher = new_client(certs, insecure=False)
        runner.run(push_layout(pusher, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
        runner.run(pusher.aclose(), 10)
        client = new_client(certs, insecure=False)
        digest, size = layer_of(client, runner, ref)
        assert len(runner.run(client.read_range(ref, digest, 0, 100, size=size), 30)) == 100
        assert client.stats["errors"] == 0
        runner.run(client.aclose(), 10)
        no_certs = new_client(None, insecure=False)  # and without the folder the CA is unknown
        with pytest.raises(RegistryError, match="TLS"):
            layer_of(no_certs, runner, ref)
        runner.run(no_certs.aclose(), 10)
    finally:
        reg.stop()
