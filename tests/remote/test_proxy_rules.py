"""NO_PROXY matching and the proxy table (obd.registry.proxy); the real-registry proxy runs are in
test_registry_mirrors.py."""

from __future__ import annotations

import pytest
from yarl import URL

from obd.errors import ConfigError
from obd.registry.proxy import Proxies, bypasses, hostport


@pytest.mark.parametrize(
    ("host", "no_proxy", "expected"),
    [
        ("registry.example.com", "*", True),
        ("registry.example.com", "example.com", True),  # a bare domain covers its subdomains
        ("registry.example.com", ".example.com", True),
        ("example.com", "example.com", True),
        ("badexample.com", "example.com", False),
        ("127.0.0.1:5000", "127.0.0.1", True),
        ("127.0.0.1:5000", "127.0.0.1:5000", True),
        ("127.0.0.1:5000", "127.0.0.1:5001", False),
        ("REGISTRY.Example.com", " other.org , example.COM ", True),
        ("registry.example.com", ",,", False),
    ],
)
def test_no_proxy_entries(host: str, no_proxy: str, expected: bool) -> None:
    assert bypasses(host, no_proxy) is expected


def test_the_option_replaces_the_environment_but_keeps_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", "http://env-proxy:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    env = Proxies.from_option(None)
    assert env.for_url(URL("https://registry-1.docker.io/v2/")) == "http://env-proxy:3128"
    assert env.for_url(URL("http://registry-1.docker.io/v2/")) is None  # no http proxy set
    assert env.for_url(URL("https://r.internal.example/v2/")) is None
    given = Proxies.from_option("http://proxy:8080")
    assert given.for_url(URL("http://registry-1.docker.io/v2/")) == "http://proxy:8080"
    assert given.for_url(URL("https://r.internal.example/v2/")) is None
    with pytest.raises(ConfigError, match="want http://host:port"):
        Proxies.from_option("socks5://proxy:1080")
    assert hostport("https://a.example:5000/v2/") == "a.example:5000"
    assert hostport("not a url at all") == ""
