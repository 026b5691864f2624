"""The registry option group: one definition, on every command that takes an image (issue 11).

``--insecure-registry HOST`` needs its HOST and refuses an image reference there (so it can never
eat the IMAGE positional); ``--tls-verify=BOOL`` is skopeo's spelling, ``--no-tls-verify`` its
alias. How the options reach nbdkit and the FUSE server against a real registry is tested in
tests/frontends/test_registry_frontends.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from obd.cli import build_parser, main
from obd.cli.common import REGISTRY_GROUP, remote_argv, remote_options, remote_params
from obd.cli.mount import background_command
from obd.host.nbdkit import plugin_path
from obd.image.device import DeviceOptions

#: Every command that takes an image, as its words on the command line.
IMAGE_COMMANDS = [
    ["run"],
    ["nbd"],
    ["mount"],
    ["export"],
    ["inspect"],
    ["pull"],
    ["push"],
    ["convert"],
    ["trace", "replay"],
    ["trace", "attach"],
]
GROUP_OPTIONS = [
    "--platform OS/ARCH",
    "--insecure-registry HOST",
    "--tls-verify BOOL",
    "--no-tls-verify",
    "--creds USER[:PASSWORD]",
    "--ca-file PEM",
    "--cache-dir DIR",
    "--cache-limit SIZE",
    "--no-cache",
]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("words", IMAGE_COMMANDS, ids=" ".join)
def test_every_image_command_lists_the_registry_group(words, capsys):
    with pytest.raises(SystemExit) as e:
        main([*words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert REGISTRY_GROUP + ":" in out
    group = out.split(REGISTRY_GROUP + ":", 1)[1]
    for option in GROUP_OPTIONS:
        assert option in group, (words, option)
    assert "--insecure-registry [HOST]" not in out


def test_insecure_registry_never_eats_the_image(capsys):
    """The issue's own line: the image written where HOST belongs is refused, not taken as HOST."""
    with pytest.raises(SystemExit) as e:
        main(["run", "--insecure-registry", "127.0.0.1:5000/hello:obd", "--", "/hello"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --insecure-registry: takes a registry HOST[:PORT], not '127.0.0.1:5000/hello:obd'" in err
    assert "no image" not in err
    with pytest.raises(SystemExit) as e:
        main(["nbd", "127.0.0.1:5000/app:1", "--insecure-registry"])  # HOST is required
    assert e.value.code == 2
    assert "argument --insecure-registry: expected one argument" in capsys.readouterr().err


def test_insecure_registry_is_repeatable_and_reaches_the_options():
    args = parse(
        "export",
        "--insecure-registry",
        "a:5000",
        "b.example",
        "-o",
        "x",
        "--insecure-registry=c:1",
        "--cache-dir",
        "C",
    )
    assert args.layers == ["b.example"]
    opts = remote_options(args)
    assert opts.insecure == ("a:5000", "c:1") and opts.tls_verify is True
    # docker's rule: HTTPS first, plain HTTP only once the host is found not to speak TLS
    # (tests/remote/test_registry_mirrors.py::test_insecure_registry_is_https_first_per_host)
    assert not opts.is_http("A:5000") and not opts.is_http("b.example")
    assert remote_options(parse("export", "--insecure-registry", "*", "b", "-o", "x")).is_http("b")


@pytest.mark.parametrize("spelling", [["--tls-verify=false"], ["--tls-verify", "false"], ["--no-tls-verify"]])
def test_tls_verify_false_is_https_without_verification_then_http(spelling):
    """skopeo's --tls-verify=false: no certificate checks anywhere, and plain HTTP only for a registry
    found not to speak TLS (the client decides per host; tests/remote/test_registry_mirrors.py)."""
    args = parse("pull", "registry.example/app:1", *spelling)
    opts = remote_options(args)
    assert opts.insecure == () and opts.tls_verify is False
    assert remote_params(args) == ["tls-verify=false"]
    assert remote_argv(args) == ["--tls-verify=false"]


def test_hosts_dir_proxy_and_p2p_reach_the_plugin_and_the_fuse_server(tmp_path):
    argv = ["--hosts-dir", "certs.d", "--hosts-dir", str(tmp_path / "more"), "--proxy", "http://p:3128"]
    argv += ["--p2p-proxy", "http://127.0.0.1:65001", "--p2p-ping-url", "http://127.0.0.1:40901/server/ping"]
    args = parse("pull", "registry.example/app:1", *argv)
    opts = remote_options(args)
    assert opts.hosts_dirs == ("certs.d", str(tmp_path / "more")) and opts.proxy == "http://p:3128"
    assert opts.p2p is not None and opts.p2p.mode == "proxy" and opts.p2p.ping_url.endswith("/server/ping")
    params = remote_params(args)
    assert params == [
        f"hosts-dir={Path('certs.d').resolve()}",
        f"hosts-dir={tmp_path / 'more'}",
        "proxy=http://p:3128",
        "p2p-proxy=http://127.0.0.1:65001",
        "p2p-ping-url=http://127.0.0.1:40901/server/ping",
    ]
    device = DeviceOptions()
    for p in params:
        device.set(*p.split("=", 1))
    again = device.remote()
    assert again.hosts_dirs == (str(Path("certs.d").resolve()), str(tmp_path / "more"))
    assert again.proxy == opts.proxy and again.p2p == opts.p2p
    argv_again = remote_argv(args)
    assert argv_again[argv_again.index("--p2p-proxy") + 1] == "http://127.0.0.1:65001"
    assert parse("pull", "r.example/a:1", *argv_again).hosts_dir == list(again.hosts_dirs or ())
    address = parse("pull", "r.example/a:1", "--p2p-address", "localhost:19145/dragonfly")
    assert remote_options(address).p2p.url == "http://localhost:19145/dragonfly"
    assert remote_params(address) == ["p2p-address=localhost:19145/dragonfly"]


def test_tls_verify_true_is_the_default_and_a_bad_value_is_named(capsys):
    for argv in ([], ["--tls-verify=true"], ["--tls-verify=1"]):
        opts = remote_options(parse("pull", "registry.example/app:1", *argv))
        assert opts.insecure == () and opts.tls_verify is True
    with pytest.raises(SystemExit) as e:
        main(["pull", "--tls-verify", "registry.example/app:1"])  # no value: the image is not eaten
    assert e.value.code == 2
    assert (
        "argument --tls-verify: expected true or false, got 'registry.example/app:1'"
        in capsys.readouterr().err
    )


def test_nbd_passes_the_group_as_plugin_parameters_and_credentials_not_at_all(tmp_path, capsys):
    argv = ["nbd", "127.0.0.1:5000/app:1-obd", "--socket", str(tmp_path / "s"), "--print-command"]
    argv += ["--insecure-registry", "127.0.0.1:5000", "--creds", "alice:s3cret", "--platform", "linux/amd64"]
    argv += ["--cache-dir", str(tmp_path / "c"), "--cache-limit", "1G", "--ca-file", str(tmp_path / "ca.pem")]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert f"python {plugin_path()} image=127.0.0.1:5000/app:1-obd" in line
    for param in (
        "insecure-registry=127.0.0.1:5000",
        "platform=linux/amd64",
        f"cache-dir={tmp_path}/c",
        "cache-limit=1G",
        f"ca-file={tmp_path}/ca.pem",
    ):
        assert param in line
    assert "alice" not in line and "s3cret" not in line


def test_mount_background_command_carries_the_group_without_credentials(tmp_path):
    args = parse(
        "mount", "r.example/app:1", str(tmp_path / "m"), "--tls-verify=false", "--creds", "bob:pw", "--stats"
    )
    cmd = background_command(args, ["r.example/app:1"], str(tmp_path / "m"), 7)
    assert cmd[cmd.index("mount") + 1 : cmd.index("mount") + 3] == ["r.example/app:1", str(tmp_path / "m")]
    assert "--tls-verify=false" in cmd and "--stats" in cmd
    assert not any("bob" in word or word == "pw" for word in cmd)


def test_plugin_path_prints_the_installed_script(capsys):
    assert main(["nbd", "--plugin-path"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(plugin_path()) and out.endswith("frontends/nbd/plugin.py")
