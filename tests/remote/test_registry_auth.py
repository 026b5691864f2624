"""Auth against a real ``docker-registry``: htpasswd (Basic) and a token server (scoped RS256 JWTs)."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import time
import urllib.error
import urllib.request

import pytest
from registry_server import FaultProxy, RegistryServer, TokenServer, is_range_get

from fixtures import FIXTURES
from obd.errors import AuthError, RegistryError
from obd.observability.stats import Stats
from obd.registry import AsyncRunner, CredentialResolver, Credentials, RegistryClient, RemoteBlob
from obd.registry.push import push_layout

pytestmark = pytest.mark.timeout(120)

ACI = FIXTURES / "aci-hello-world"
LAYER = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
LAYER_DATA = (ACI / "blobs" / "sha256" / LAYER[7:]).read_bytes()
ALICE = ("alice", "alice-Pw-7731")
BOB = ("bob", "bob-Pw-5512")


@pytest.fixture(scope="module")
def runner():
    r = AsyncRunner("test-registry-auth")
    yield r
    r.close()


class Clients:
    """Makes clients with isolated credential lookup and closes them at the end."""

    def __init__(self, runner: AsyncRunner):
        self.runner = runner
        self.made: list[RegistryClient] = []

    def __call__(self, creds=None, *, env=None, resolver=None, **kw) -> RegistryClient:
        if resolver is None:
            resolver = CredentialResolver(creds, env=env or {}, use_docker_config=False)
        kw.setdefault("stats", Stats())
        kw.setdefault("backoff", 0.01)
        kw.setdefault("max_backoff", 0.05)
        c = RegistryClient(credentials=resolver, insecure=True, **kw)
        self.made.append(c)
        return c

    def close(self) -> None:
        for c in self.made:
            self.runner.run(c.aclose(), 10)


@pytest.fixture
def clients(runner):
    made = Clients(runner)
    yield made
    made.close()


# -- htpasswd ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory, runner):
    reg = RegistryServer(tmp_path_factory.mktemp("basic"), "htpasswd", users=dict([ALICE])).start()
    c = RegistryClient(credentials=Credentials(*ALICE), insecure=True, stats=Stats())
    runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
    runner.run(c.aclose(), 10)
    yield reg
    reg.stop()


def test_basic_auth_needs_credentials(basic_registry, runner, clients):
    repo = f"{basic_registry.host}/aci/hello"
    with pytest.raises(AuthError, match="no credentials found"):
        runner.run(clients().read_range(repo, LAYER, 0, 10), 30)
    with pytest.raises(AuthError, match="not accepted"):
        runner.run(clients(Credentials("alice", "wrong")).read_range(repo, LAYER, 0, 10), 30)
    c = clients(Credentials(*ALICE))
    assert runner.run(c.read_range(repo, LAYER, 1000, 5000), 30) == LAYER_DATA[1000:6000]
    assert runner.run(c.get_manifest(f"{repo}:amd64-converted"), 30)[1]["layers"][0]["digest"] == LAYER
    # the challenge is remembered: later requests go out with credentials at once
    before = c.stats["requests"]
    runner.run(c.read_range(repo, LAYER, 0, 10), 30)
    assert c.stats["requests"] == before + 1


def test_basic_auth_from_env(basic_registry, runner, clients):
    env = {"OBD_REGISTRY_USER": ALICE[0], "OBD_REGISTRY_PASSWORD": ALICE[1]}
    c = clients(env=env)
    assert runner.run(c.blob_size(f"{basic_registry.host}/aci/hello", LAYER), 30) == len(LAYER_DATA)


def _docker_config(tmp_path, monkeypatch, config: dict) -> None:
    d = tmp_path / "docker"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    monkeypatch.delenv("OBD_REGISTRY_USER", raising=False)
    monkeypatch.delenv("OBD_REGISTRY_PASSWORD", raising=False)


@pytest.mark.parametrize(
    "entry",
    [
        {"auth": base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()},
        {"username": ALICE[0], "password": ALICE[1]},
    ],
    ids=["auth-field", "username-password"],
)
def test_basic_auth_from_docker_config(basic_registry, runner, clients, tmp_path, monkeypatch, entry):
    _docker_config(tmp_path, monkeypatch, {"auths": {f"http://{basic_registry.host}/v1/": entry}})
    c = clients(resolver=CredentialResolver())  # $DOCKER_CONFIG, as a user would have it
    assert runner.run(c.read_range(f"{basic_registry.host}/aci/hello", LAYER, 0, 512), 30) == LAYER_DATA[:512]


def test_basic_auth_from_credential_helper(basic_registry, runner, clients, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-test"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        f'[ "$server" = "{basic_registry.host}" ] || {{ echo "credentials not found"; exit 1; }}\n'
        f'echo \'{{"ServerURL":"{basic_registry.host}","Username":"{ALICE[0]}","Secret":"{ALICE[1]}"}}\'\n'
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    _docker_config(tmp_path, monkeypatch, {"credHelpers": {basic_registry.host: "test"}})
    c = clients(resolver=CredentialResolver())
    assert runner.run(c.read_range(f"{basic_registry.host}/aci/hello", LAYER, 7, 9), 30) == LAYER_DATA[7:16]


def test_basic_auth_secrets_not_logged(basic_registry, runner, clients, caplog):
    repo = f"{basic_registry.host}/aci/hello"
    secret_b64 = base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()
    with caplog.at_level(logging.DEBUG, logger="obd"):
        c = clients(Credentials(*ALICE))
        runner.run(c.read_range(repo, LAYER, 0, 100), 30)
        with pytest.raises(AuthError) as err:
            runner.run(clients(Credentials("alice", "wrong-Pw-0")).read_range(repo, LAYER, 0, 10), 30)
    text = caplog.text + str(err.value) + repr(c.credentials.lookup(basic_registry.host))
    assert ALICE[1] not in text and secret_b64 not in text and "wrong-Pw-0" not in text


# -- token server ------------------------------------------------------------------------------

ACL = {
    "alice": [("*", {"pull", "push"})],
    "bob": [("bob/*", {"pull", "push"})],
    None: [("public/*", {"pull"})],
}


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory, runner):
    work = tmp_path_factory.mktemp("token")
    tokens = TokenServer(work, dict([ALICE, BOB]), ACL).start()
    reg = RegistryServer(work, "token", token_server=tokens).start()
    c = RegistryClient(credentials=Credentials(*ALICE), insecure=True, stats=Stats())
    for repo in ("aci/hello", "bob/hello", "public/hello"):
        runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/{repo}"), 60)
    runner.run(c.aclose(), 10)
    yield reg, tokens
    reg.stop()
    tokens.stop()


def _raw_get(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-9"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_token_anonymous_and_scoped(token_setup, runner, clients):
    reg, tokens = token_setup
    anon = clients()
    assert runner.run(anon.read_range(f"{reg.host}/public/hello", LAYER, 0, 64), 30) == LAYER_DATA[:64]
    with pytest.raises(AuthError):
        runner.run(anon.read_range(f"{reg.host}/aci/hello", LAYER, 0, 64), 30)
    bob = clients(Credentials(*BOB))
    assert runner.run(bob.read_range(f"{reg.host}/bob/hello", LAYER, 10, 20), 30) == LAYER_DATA[10:30]
    with pytest.raises(AuthError):
        runner.run(bob.read_range(f"{reg.host}/aci/hello", LAYER, 0, 64), 30)
    # a token is good for the repository it was issued for, and no other
    bob_token = next(
        i.token
        for i in tokens.issued
        if i.user == "bob" and i.granted and i.granted[0]["name"] == "bob/hello"
    )
    assert _raw_get(f"{reg.url}/v2/bob/hello/blobs/{LAYER}", bob_token) == 206
    assert _raw_get(f"{reg.url}/v2/aci/hello/blobs/{LAYER}", bob_token) == 401
    assert _raw_get(f"{reg.url}/v2/public/hello/blobs/{LAYER}", bob_token) == 401


def test_token_reused_then_refreshed_after_expiry(token_setup, runner, clients):
    reg, tokens = token_setup
    old_ttl, tokens.ttl = tokens.ttl, 2
    try:
        c = clients(Credentials(*ALICE))
        repo = f"{reg.host}/aci/hello"
        start = len(tokens.issued)
        for i in range(10):
            assert (
                runner.run(c.read_range(repo, LAYER, i * 100, 100), 30) == LAYER_DATA[i * 100 : i * 100 + 100]
            )
        assert len(tokens.issued) == start + 1  # one token for ten reads
        assert tokens.issued[-1].scopes == ["repository:aci/hello:pull"]
        time.sleep(2.0)  # past expires_in: the client must not use the old token any more
        assert runner.run(c.read_range(repo, LAYER, 0, 100), 30) == LAYER_DATA[:100]
        assert len(tokens.issued) == start + 2
        assert c.stats["tokens"] == 2
    finally:
        tokens.ttl = old_ttl


def test_token_401_mid_stream_refreshes_and_retries(token_setup, runner, clients):
    reg, tokens = token_setup
    proxy = FaultProxy(reg.url).start()
    try:
        c = clients(Credentials(*ALICE))
        repo = f"{proxy.host}/aci/hello"
        blob = RemoteBlob(c, runner, repo, LAYER)
        assert blob.fetch(0, 4096) == LAYER_DATA[:4096]
        issued = len(tokens.issued)
        challenge = (
            f'Bearer realm="{tokens.realm}",service="obd-test-registry",'
            'scope="repository:aci/hello:pull",error="invalid_token"'
        )
        proxy.add("status", times=1, status=401, headers={"WWW-Authenticate": challenge}, match=is_range_get)
        assert blob.fetch(300_000, 65536) == LAYER_DATA[300_000:365_536]
        assert proxy.injected == ["status"]
        assert len(tokens.issued) == issued + 1  # the rejected token was dropped and replaced
        authed = [s for s in proxy.seen if s[2] and s[3]]
        assert len(authed) >= 3  # first read, the 401'd attempt, the retry: all with a token
    finally:
        proxy.stop()


def test_token_push_needs_push_scope(token_setup, runner, clients):
    reg, _ = token_setup
    bob = clients(Credentials(*BOB))
    result = runner.run(push_layout(bob, f"oci:{ACI}:amd64", f"{reg.host}/bob/plain"), 60)
    assert result.uploaded and result.digest.startswith("sha256:7e9b6e7b")
    with pytest.raises(AuthError):
        runner.run(push_layout(bob, f"oci:{ACI}:amd64", f"{reg.host}/aci/plain"), 60)


def test_token_secrets_not_logged(token_setup, runner, clients, caplog):
    reg, tokens = token_setup
    start = len(tokens.issued)
    with caplog.at_level(logging.DEBUG, logger="obd"):
        c = clients(Credentials(*ALICE))
        runner.run(c.get_manifest(f"{reg.host}/aci/hello:amd64-converted"), 30)
        runner.run(c.read_range(f"{reg.host}/aci/hello", LAYER, 0, 100), 30)
        with pytest.raises(AuthError) as err:
            runner.run(
                clients(Credentials("alice", "bad-Pw-9")).read_range(f"{reg.host}/aci/hello", LAYER, 0, 1), 30
            )
    new_tokens = [i.token for i in tokens.issued[start:]]
    assert new_tokens
    assert any("token for repository:aci/hello:pull" in r.getMessage() for r in caplog.records)
    text = caplog.text + str(err.value)
    for secret in [ALICE[1], "bad-Pw-9", *new_tokens, *(t[:40] for t in new_tokens)]:
        assert secret not in text


def test_token_service_outage_is_retried(token_setup, runner, clients):
    reg, tokens = token_setup
    c = clients(Credentials(*ALICE))
    tokens.fail_next = 2
    assert runner.run(c.read_range(f"{reg.host}/aci/hello", LAYER, 50, 50), 30) == LAYER_DATA[50:100]
    assert tokens.fail_next == 0 and c.stats["retries"] == 2
    tokens.fail_next = 100
    c2 = clients(Credentials(*ALICE))
    with pytest.raises(RegistryError, match="token service answered HTTP 503"):
        runner.run(c2.read_range(f"{reg.host}/aci/hello", LAYER, 50, 50), 30)
    tokens.fail_next = 0


def test_concurrent_requests_share_one_token_fetch(token_setup, runner, clients):
    reg, tokens = token_setup
    c = clients(Credentials(*ALICE))
    start = len(tokens.issued)
    spans = [(i * 20_000, 10_000) for i in range(16)]
    got = runner.run(c.read_ranges(f"{reg.host}/aci/hello", LAYER, spans), 30)
    assert got == [LAYER_DATA[o : o + n] for o, n in spans]
    assert len(tokens.issued) == start + 1 and c.stats["tokens"] == 1
