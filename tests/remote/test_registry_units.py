"""Registry pieces that need no server: references, challenges, credentials, Content-Range, stats, runner."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from obd.errors import AuthError, ConfigError, RegistryError
from obd.observability.stats import Stats
from obd.registry.auth import (
    CredentialResolver,
    Credentials,
    Token,
    parse_challenge,
    parse_challenges,
    safe_url,
)
from obd.registry.client import parse_content_range, select_platform
from obd.registry.loop import AsyncRunner
from obd.registry.reference import Reference, parse_reference

pytestmark = pytest.mark.timeout(60)

D = "sha256:" + "ab" * 32

REFERENCES = [
    # text, registry, repository, tag, digest, api host
    ("python:3.12", "docker.io", "library/python", "3.12", None, "registry-1.docker.io"),
    ("python", "docker.io", "library/python", "latest", None, "registry-1.docker.io"),
    ("docker.io/library/python:3.12", "docker.io", "library/python", "3.12", None, "registry-1.docker.io"),
    ("index.docker.io/library/python", "docker.io", "library/python", "latest", None, "registry-1.docker.io"),
    ("docker.io/python", "docker.io", "library/python", "latest", None, "registry-1.docker.io"),
    ("user/app:v1.0-rc_2", "docker.io", "user/app", "v1.0-rc_2", None, "registry-1.docker.io"),
    ("ghcr.io/org/team/app:1", "ghcr.io", "org/team/app", "1", None, "ghcr.io"),
    ("localhost/app", "localhost", "app", "latest", None, "localhost"),
    ("localhost:5000/app:x", "localhost:5000", "app", "x", None, "localhost:5000"),
    ("127.0.0.1:5000/a/b@" + D, "127.0.0.1:5000", "a/b", None, D, "127.0.0.1:5000"),
    ("host:5000/a:tag@" + D, "host:5000", "a", "tag", D, "host:5000"),
    ("python@" + D, "docker.io", "library/python", None, D, "registry-1.docker.io"),
    ("my.reg/a__b/c-d/e.f:1", "my.reg", "a__b/c-d/e.f", "1", None, "my.reg"),
    ("docker://quay.io/x/y", "quay.io", "x/y", "latest", None, "quay.io"),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None, "[::1]:5000"),
]


@pytest.mark.parametrize(("text", "registry", "repo", "tag", "digest", "api"), REFERENCES)
def test_parse_reference(text, registry, repo, tag, digest, api):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert ref.api_host == api
    assert parse_reference(str(ref)) == ref  # str() round trip
    assert ref.target == (digest or tag)


BAD_REFERENCES = [
    ("", "empty"),
    ("Python:3", "lowercase"),
    ("host:5000/App", "lowercase"),
    ("python:", "tag"),
    ("python:.bad", "tag"),
    ("python:" + "x" * 129, "tag"),
    ("python@sha256:abc", "digest"),
    ("python@md5:" + "a" * 32, "algorithm"),
    ("python@sha256:" + "A" * 64, "lowercase"),
    ("a//b", "component"),
    ("a/-b", "component"),
    ("a/b_", "component"),
    ("a b", "whitespace"),
    ("https://host/a", "scheme"),
    ("host:port/a", "host"),
    ("host:5000/", "repository"),
    ("x/" + "a" * 260, "longer"),
]


@pytest.mark.parametrize(("text", "says"), BAD_REFERENCES)
def test_parse_reference_rejects(text, says):
    with pytest.raises(ConfigError, match=says):
        parse_reference(text)


def test_reference_urls_and_familiar():
    ref = parse_reference("python:3.12")
    assert ref.base_url() == "https://registry-1.docker.io/v2/"
    assert parse_reference("localhost:5000/a").base_url(insecure=True) == "http://localhost:5000/v2/"
    assert ref.familiar() == "python:3.12"
    assert parse_reference("user/app").familiar() == "user/app:latest"
    assert parse_reference("ghcr.io/o/a:1").familiar() == "ghcr.io/o/a:1"
    assert Reference("r:1", "a", "t").with_target(digest=D) == Reference("r:1", "a", None, D)


# -- challenges --------------------------------------------------------------------------------

CHALLENGES = [
    (
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"',
        "bearer",
        {
            "realm": "https://auth.example/token",
            "service": "registry.example",
            "scope": "repository:a/b:pull",
        },
    ),
    # spaces after commas (overlaybd's parser fails on these)
    (
        'Bearer realm="https://a/t", service="s", scope="repository:x:pull"',
        "bearer",
        {"realm": "https://a/t", "service": "s", "scope": "repository:x:pull"},
    ),
    # a comma inside a quoted value
    (
        'Bearer realm="https://a/t",service="s",scope="repository:a:pull,push"',
        "bearer",
        {"realm": "https://a/t", "service": "s", "scope": "repository:a:pull,push"},
    ),
    # unquoted values, odd case, escapes, an error parameter
    (
        'BEARER Realm=https://a/t,Service=s , error="insufficient_scope", x="q\\"uote"',
        "bearer",
        {"realm": "https://a/t", "service": "s", "error": "insufficient_scope", "x": 'q"uote'},
    ),
    ('Basic realm="obd-test"', "basic", {"realm": "obd-test"}),
    ("Basic", "basic", {}),
]


@pytest.mark.parametrize(("header", "scheme", "params"), CHALLENGES)
def test_parse_challenge(header, scheme, params):
    ch = parse_challenge(header)
    assert ch is not None
    assert ch.scheme == scheme
    assert ch.params == params


def test_parse_several_challenges_prefers_bearer():
    header = (
        'Basic realm="r", Bearer realm="https://a/t",service="s",scope="repository:a:pull repository:b:push"'
    )
    found = parse_challenges(header)
    assert [c.scheme for c in found] == ["basic", "bearer"]
    best = parse_challenge(header)
    assert best is not None and best.scheme == "bearer"
    assert best.scopes == ("repository:a:pull", "repository:b:push")


@pytest.mark.parametrize("junk", ["", ",,,", '="', "=", 'Bearer realm="unterminated', "\x00\x01 , ="])
def test_parse_challenge_junk_does_not_crash(junk):
    parse_challenges(junk)  # no exception, no hang


# -- credentials -------------------------------------------------------------------------------


def _write_config(dirpath: Path, config: dict) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / "config.json"
    path.write_text(json.dumps(config))
    return path


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_repr_hides_secret():
    c = Credentials("alice", "s3cr3t-pw", source="flags")
    assert "s3cr3t-pw" not in repr(c) and "s3cr3t-pw" not in str(c) and "alice" in repr(c)
    t = Token("tok-value-123", 1.0, 60.0)
    assert "tok-value-123" not in repr(t)
    assert safe_url("https://u:p@h/x?sig=abc&X-Amz-Signature=zzz#f") == "https://h/x"


def test_docker_config_auths(tmp_path):
    cfg = _write_config(
        tmp_path / "d",
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpass")},
                "reg.example:5000": {"username": "u2", "password": "p2"},
                "https://other.example/v2/": {"auth": _b64("u3:p:3")},
                "broken.example": {"auth": _b64("nocolon")},
                "tokened.example": {"identitytoken": "refresh-tok"},
            }
        },
    )
    r = CredentialResolver(env={}, docker_config=cfg)
    hub = r.lookup("docker.io")
    assert (hub.username, hub.password) == ("hubuser", "hubpass")
    assert r.lookup("registry-1.docker.io") == hub
    c2 = r.lookup("reg.example:5000")
    assert (c2.username, c2.password) == ("u2", "p2")
    c3 = r.lookup("other.example")  # scheme and path of the key are ignored, like docker
    assert (c3.username, c3.password) == ("u3", "p:3")
    assert r.lookup("reg.example") is None  # the port is part of the host
    assert r.lookup("nowhere.example") is None
    assert r.lookup("tokened.example").identity_token == "refresh-tok"
    with pytest.raises(ConfigError, match="base64"):
        r.lookup("broken.example")


def test_credential_precedence(tmp_path):
    cfg = _write_config(tmp_path / "d", {"auths": {"h:1": {"username": "file", "password": "fp"}}})
    env = {"OBD_REGISTRY_USER": "envu", "OBD_REGISTRY_PASSWORD": "envp"}
    assert CredentialResolver(env={}, docker_config=cfg).lookup("h:1").username == "file"
    assert CredentialResolver(env=env, docker_config=cfg).lookup("h:1").username == "envu"
    flags = Credentials("flagu", "flagp", source="flags")
    assert CredentialResolver(flags, env=env, docker_config=cfg).lookup("h:1").username == "flagu"
    per_host = {"h:1": flags}
    assert CredentialResolver(per_host, env=env, docker_config=cfg).lookup("h:1").username == "flagu"
    assert CredentialResolver(per_host, env=env, docker_config=cfg).lookup("h:2").username == "envu"
    # DOCKER_CONFIG from the environment decides where config.json is looked for
    assert CredentialResolver(env={"DOCKER_CONFIG": str(tmp_path / "d")}).lookup("h:1").username == "file"


def _helper(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


HELPER = """#!/bin/sh
read server
echo "$server" >> "$(dirname "$0")/asked"
case "$server" in
  helped.example) echo '{"ServerURL":"helped.example","Username":"hu","Secret":"hs"}' ;;
  https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"<token>","Secret":"idtok"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


def test_credential_helpers(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _helper(bin_dir, "test", HELPER)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = _write_config(
        tmp_path / "d",
        {
            "credHelpers": {"helped.example": "test"},
            "credsStore": "test",
            "auths": {"fallback.example": {"auth": _b64("fu:fp")}},
        },
    )
    r = CredentialResolver(env={}, docker_config=cfg)
    c = r.lookup("helped.example")
    assert (c.username, c.password) == ("hu", "hs") and "docker-credential-test" in c.source
    assert r.lookup("docker.io").identity_token == "idtok"
    # the store does not know it: config.json auths still apply
    assert r.lookup("fallback.example").username == "fu"
    asked = (bin_dir / "asked").read_text().split()
    assert asked == ["helped.example", "https://index.docker.io/v1/", "fallback.example"]


def test_credential_helper_failures(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _helper(bin_dir, "broken", "#!/bin/sh\necho 'keychain locked' >&2\nexit 3\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = _write_config(tmp_path / "d", {"credsStore": "broken"})
    with pytest.raises(AuthError, match="keychain locked"):
        CredentialResolver(env={}, docker_config=cfg).lookup("x.example")
    cfg = _write_config(tmp_path / "e", {"credsStore": "absent-helper"})
    with pytest.raises(ConfigError, match="docker-credential-absent-helper not found"):
        CredentialResolver(env={}, docker_config=cfg).lookup("x.example")


def test_bad_docker_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        CredentialResolver(env={}, docker_config=path).lookup("x")
    assert CredentialResolver(env={}, docker_config=tmp_path / "missing.json").lookup("x") is None


def test_credential_lookup_logs_no_secret(tmp_path, caplog):
    cfg = _write_config(tmp_path / "d", {"auths": {"h": {"username": "u", "password": "pw-SECRET-1"}}})
    with caplog.at_level(logging.DEBUG, logger="obd"):
        CredentialResolver(env={}, docker_config=cfg).lookup("h")
    assert caplog.records
    assert "pw-SECRET-1" not in caplog.text


# -- Content-Range, platform selection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("bytes 0-0/10", (0, 0, 10)),
        ("bytes 100-199/1000", (100, 199, 1000)),
        ("bytes 5-9/*", (5, 9, None)),
        ("BYTES 1-2/3", (1, 2, 3)),
        ("bytes 9-5/10", None),
        ("bytes 5-10/10", None),
        ("bytes */10", None),
        ("items 0-1/2", None),
        ("bytes 0-1", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_content_range(value, parsed):
    assert parse_content_range(value) == parsed


def test_select_platform():
    index = {
        "manifests": [
            {
                "digest": "sha256:" + "1" * 64,
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm", "variant": "v5"},
            },
            {
                "digest": "sha256:" + "2" * 64,
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
            },
            {"digest": "sha256:" + "3" * 64, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }
    assert select_platform(index, "linux/amd64", "x").digest.endswith("3" * 64)
    assert select_platform(index, "linux/arm/v7", "x").digest.endswith("2" * 64)
    with pytest.raises(ConfigError, match="no manifest for platform linux/s390x"):
        select_platform(index, "linux/s390x", "x")


# -- stats -------------------------------------------------------------------------------------


def test_stats_counters_and_percentiles():
    s = Stats()
    threads = [threading.Thread(target=lambda: [s.incr("requests") for _ in range(1000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s["requests"] == 8000
    for ms in range(1, 101):
        s.observe_latency(ms / 1000)
    snap = s.snapshot()
    lat = snap["latency"]
    assert lat["count"] == 100
    assert lat["p50"] == pytest.approx(0.050)
    assert lat["p90"] == pytest.approx(0.090)
    assert lat["p99"] == pytest.approx(0.099)
    assert lat["max"] == pytest.approx(0.100)
    s.incr("cache_hits", 3)
    text = s.format()
    assert "requests" in text and "8000" in text and "p99=99.0ms" in text and "cache_hits" in text
    s.reset()
    assert s["requests"] == 0 and s.snapshot()["latency"] == {"count": 0}


# -- runner ------------------------------------------------------------------------------------


def test_runner_runs_from_many_threads_and_restarts():
    import asyncio

    runner = AsyncRunner()

    async def work(i):
        await asyncio.sleep(0.01)
        return i * 2

    results = {}

    def call(i):
        results[i] = runner.run(work(i), 10)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == {i: i * 2 for i in range(32)}
    with pytest.raises(RegistryError, match="did not finish"):
        runner.run(asyncio.sleep(5), 0.05)
    gen = runner.generation
    runner.close()
    assert runner.run(work(4), 10) == 8  # restarted lazily
    assert runner.generation == gen + 1

    async def nested():
        return runner.run(work(1))

    with pytest.raises(RuntimeError, match="own loop thread"):
        runner.run(nested(), 10)
    runner.close()


def test_runner_after_fork():
    import asyncio

    runner = AsyncRunner()

    async def pid():
        await asyncio.sleep(0)
        return os.getpid()

    assert runner.run(pid(), 10) == os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 0 if runner.run(pid(), 10) == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert runner.run(pid(), 10) == os.getpid()  # the parent's loop is untouched
    runner.close()
