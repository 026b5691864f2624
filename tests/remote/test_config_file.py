"""obd's configuration file (``obd --config``, ``$OBD_CONFIG``, ``~/.config/obd/config.toml``) and
the Sandboxfile's registry keys: parsing, where the file is found, what wins over what, and a real
run against Debian's ``docker-registry`` through a recording mirror configured only by the file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from registry_server import FaultProxy, RegistryServer

from fixtures import FIXTURES
from frontends.run import sandboxfile
from obd.cli import build_parser, main
from obd.cli.common import remote_argv, remote_params
from obd.cli.config import apply_config, configure, find_config, parse_config, set_unless_given
from obd.errors import ConfigError
from obd.registry import AsyncRunner, CredentialResolver, RegistryClient
from obd.registry.push import push_layout

pytestmark = pytest.mark.timeout(120)

ACI = FIXTURES / "aci-hello-world"

FULL = """
[registry]
hosts_dir = ["certs.d", "/etc/containerd/certs.d"]
proxy = "http://proxy.example:3128"
insecure = "registry.local:5000"
tls_verify = false
ca_file = "ca.pem"

[p2p]
proxy = "http://127.0.0.1:65001"
ping_url = "http://127.0.0.1:40901/server/ping"

[cache]
dir = "~/cache"
limit = "20G"
"""


def parsed(argv: list[str], config: Path | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(([] if config is None else ["--config", str(config)]) + argv)
    configure(args)
    return args


def test_every_key_parses_and_relative_paths_follow_the_file(tmp_path):
    s = parse_config(FULL.encode(), str(tmp_path / "config.toml"))
    v = s.values
    assert v["hosts_dir"] == [str(tmp_path / "certs.d"), "/etc/containerd/certs.d"]
    assert v["proxy"] == "http://proxy.example:3128" and v["insecure_registry"] == ["registry.local:5000"]
    assert v["tls_verify"] is False and v["ca_file"] == str(tmp_path / "ca.pem")
    assert v["p2p_proxy"] == "http://127.0.0.1:65001" and v["p2p_ping_url"].endswith("/server/ping")
    assert v["cache_dir"] == str(Path.home() / "cache") and v["cache_limit"] == "20G"
    assert parse_config(b"", "empty.toml").values == {}


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("[regsitry]\nproxy = 'x'\n", "regsitry", "unknown section"),
        ("[registry]\nhost_dir = 'x'\n", "registry.host_dir", "unknown key"),
        ("registry = 5\n", "registry", "table"),
        ("[registry]\ntls_verify = 'no'\n", "registry.tls_verify", "true or false"),
        ("[registry]\ninsecure = []\n", "registry.insecure", "empty"),
        ("[registry]\nproxy = 5\n", "registry.proxy", "string"),
        ("[cache]\nlimit = 'lots'\n", "cache.limit", "not a size"),
        ("[p2p]\nproxy = 'http://a'\naddress = 'http://b'\n", "p2p", "not both"),
    ],
)
def test_mistakes_name_the_file_and_key(text, field, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_config(text.encode(), "/etc/obd/config.toml")
    assert e.value.path == "/etc/obd/config.toml" and e.value.field == field


def test_which_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OBD_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert find_config() in (None, Path("/etc/obd/config.toml"))
    user = tmp_path / "xdg" / "obd" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert find_config() == user
    env = tmp_path / "env.toml"
    env.write_text("")
    monkeypatch.setenv("OBD_CONFIG", str(env))
    assert find_config() == env
    assert find_config(str(user)) == user  # --config wins over $OBD_CONFIG
    with pytest.raises(ConfigError, match="no such configuration file") as e:
        find_config(str(tmp_path / "missing.toml"))
    assert e.value.field == "--config"
    monkeypatch.setenv("OBD_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="no such") as e:
        find_config()
    assert e.value.field == "OBD_CONFIG"


def test_command_line_wins_and_p2p_goes_as_a_whole(tmp_path, monkeypatch):
    monkeypatch.delenv("OBD_CONFIG", raising=False)
    config = tmp_path / "config.toml"
    config.write_text(FULL)
    args = parsed(["inspect", "r.example/app:1"], config)
    assert args.proxy == "http://proxy.example:3128" and args.tls_verify is False
    assert args.hosts_dir == [str(tmp_path / "certs.d"), "/etc/containerd/certs.d"]
    assert args.p2p_proxy == "http://127.0.0.1:65001" and args.cache_limit == "20G"
    # children (a child obd, the nbd plugin) get the file's values as options and parameters
    assert f"hosts-dir={tmp_path / 'certs.d'}" in remote_params(args)
    assert "--p2p-proxy" in remote_argv(args) and "--tls-verify=false" in remote_argv(args)

    flags = ["--proxy", "http://other:8080", "--hosts-dir", "mine", "--p2p-address", "http://df/x"]
    args = parsed(["inspect", "r.example/app:1", *flags, "--tls-verify=true"], config)
    assert args.proxy == "http://other:8080" and args.hosts_dir == ["mine"] and args.tls_verify is True
    assert args.p2p_address == "http://df/x" and args.p2p_proxy is None and args.p2p_ping_url is None
    assert args.cache_dir == str(
        Path.home() / "cache"
    )  # what the flags leave unset still comes from the file

    # a Sandboxfile sits between: over the file, under the flags
    args = parsed(["run", "--proxy", "http://flag:1", "box"], config)
    for dest, value in [
        ("proxy", "http://box:2"),
        ("hosts_dir", ["/box/certs.d"]),
        ("p2p_address", "http://df"),
    ]:
        set_unless_given(args, dest, value)
    assert args.proxy == "http://flag:1" and args.hosts_dir == ["/box/certs.d"]
    assert args.p2p_address == "http://df" and args.p2p_proxy is None and args.p2p_ping_url is None


def test_commands_without_its_options_ignore_the_file(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[cache]\ndir = '/x'\n")
    args = build_parser().parse_args(["--config", str(config), "zfile", "info", "f"])
    configure(args)
    assert not hasattr(args, "config_filled")
    config.write_text("[cache]\ndir = '/x'\nlimit = '1G'\n[registry]\nproxy = 'http://p'\n")
    args = build_parser().parse_args(["--config", str(config), "cache", "ls"])
    configure(args)  # obd cache takes the host cache's directory and limit from the file
    assert args.cache_dir == "/x" and args.limit == "1G" and not hasattr(args, "proxy")
    empty = argparse.Namespace(hosts_dir=None)
    apply_config(empty, parse_config(b"", "e.toml"))
    assert empty.config_filled == set()


def test_sandboxfile_registry_keys(tmp_path):
    (tmp_path / "Sandboxfile").write_text(
        "sandboxes:\n"
        "  a:\n"
        "    image: r.example/app:1\n"
        "    hosts_dir: certs.d\n"
        "    proxy: http://proxy.example:3128\n"
        "    p2p_proxy: http://127.0.0.1:65001\n"
        "    p2p_ping_url: http://127.0.0.1:40901/server/ping\n"
        "  b:\n"
        "    hosts_dir: [x, /y]\n"
        "    p2p_address: http://127.0.0.1:19145/dragonfly\n"
    )
    sf = sandboxfile.load(tmp_path)
    a, b = sf.get("a"), sf.get("b")
    assert a.hosts_dir == [str((tmp_path / "certs.d").resolve())] and a.proxy == "http://proxy.example:3128"
    assert a.p2p_proxy == "http://127.0.0.1:65001" and a.p2p_ping_url.endswith("/server/ping")
    assert b.hosts_dir == [str((tmp_path / "x").resolve()), "/y"] and b.p2p_address.endswith("/dragonfly")
    for body, field in [
        ("hosts_dir: 5", "hosts_dir"),
        ("proxy: [a]", "proxy"),
        ("p2p_proxy: http://a\n    p2p_address: http://b", "p2p_address"),
    ]:
        (tmp_path / "Sandboxfile").write_text(f"sandboxes:\n  c:\n    {body}\n")
        with pytest.raises(ConfigError) as e:
            sandboxfile.load(tmp_path)
        assert e.value.field == f"sandboxes.c.{field}"


def test_the_file_alone_points_obd_at_a_mirror(tmp_path, monkeypatch, capsys):
    """A real registry, reached only through a recording mirror that the configuration file names
    (``[registry] insecure`` and ``hosts_dir``); a ``--hosts-dir`` flag then takes the mirror away."""
    monkeypatch.delenv("OBD_CONFIG", raising=False)
    reg = RegistryServer(tmp_path / "origin", "noauth").start()
    mirror = FaultProxy(reg.url).start()
    try:
        runner = AsyncRunner("test-config-file")
        c = RegistryClient(credentials=CredentialResolver(env={}, use_docker_config=False), insecure=True)
        runner.run(push_layout(c, f"oci:{ACI}:amd64-converted", f"{reg.host}/aci/hello"), 60)
        runner.run(c.aclose(), 10)
        runner.close()
        hosts = tmp_path / "certs.d" / reg.host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        config = tmp_path / "obd.toml"
        config.write_text(
            f'[registry]\ninsecure = ["{reg.host}"]\nhosts_dir = "certs.d"\n[cache]\ndir = "cache"\n'
        )
        monkeypatch.setenv("OBD_REGISTRY_USER", "")
        ref = f"{reg.host}/aci/hello:amd64-converted"
        assert main(["--config", str(config), "inspect", ref]) == 0
        assert any("/manifests/" in path for _, path, _, _ in mirror.seen)
        assert (tmp_path / "cache").is_dir()
        mirror.clear()
        assert main(["--config", str(config), "inspect", ref, "--hosts-dir", str(tmp_path / "none")]) == 0
        assert mirror.seen == []
        monkeypatch.setenv("OBD_CONFIG", str(config))  # the environment names the same file
        assert main(["inspect", ref]) == 0
        assert mirror.seen
        capsys.readouterr()
    finally:
        mirror.stop()
        reg.stop()
