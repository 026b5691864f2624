"""Finding artifacts by the OCI 1.1 referrers API, with the tag schema as the fallback (issue 12).

Real parts: Debian's ``docker-registry`` (distribution 2.8, which has no referrers API: it answers
404, so the fallback is what a real registry exercises) and a :class:`FaultProxy` in front of it
that records the requests. The proxy also stands in for what 2.8 cannot do: answer 400/405 to the
referrers call, and, for a registry that has the API, list the artifact there while the fallback
tag is gone.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from registry_server import FaultProxy, RegistryServer

from fixtures import FIXTURES
from obd.cli import main
from obd.errors import FormatError
from obd.image.remote import RemoteOptions, registry_config
from obd.observability.stats import Stats
from obd.verify.format import MEDIA_TYPE

pytestmark = pytest.mark.timeout(180)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The ACI fixture as ``aci/hello:obd`` with its digest tables pushed by ``obd index --push``
    (the table artifact, linked by the fallback tag); ``reg.tables`` are the pins it made."""
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    try:
        host = reg.host
        image = f"{host}/aci/hello:obd"
        aci = FIXTURES / "aci-hello-world"
        assert main(["push", f"oci:{aci}:amd64-converted", image, "--insecure-registry", host]) == 0
        cache = tmp_path_factory.mktemp("pusher")
        assert main(["index", image, "--push", "--insecure-registry", host, "--cache-dir", str(cache)]) == 0
        mine = registry_config(image, RemoteOptions(insecure=(host,), cache_dir=str(cache)))
        reg.tables = mine.extra["obd"]["verify"]
        reg.manifest = mine.extra["obd"]["manifest"]
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def proxy(registry):
    p = FaultProxy(registry.url).start()
    yield p
    p.stop()


def _config(proxy: FaultProxy, tmp_path, **kw):
    opts = RemoteOptions(insecure=(proxy.host,), cache_dir=str(tmp_path / "cache"), stats=Stats(), **kw)
    return registry_config(f"{proxy.host}/aci/hello:obd", opts)


def _gets(proxy: FaultProxy, part: str) -> list[str]:
    return [path for method, path, _rng, _auth in proxy.seen if method == "GET" and part in path]


def _is_referrers(request) -> bool:
    return "/referrers/" in request.path


def test_the_referrers_api_is_asked_first_and_distribution_2_8_falls_back_to_the_tag(
    registry, proxy, tmp_path
):
    cfg = _config(proxy, tmp_path, allow_referrers=True)
    assert cfg.extra["obd"]["verify"] == registry.tables
    asked = _gets(proxy, "/referrers/")
    assert asked == [f"/v2/aci/hello/referrers/{registry.manifest}"]  # answered 404 by the real 2.8
    tag = "sha256-" + registry.manifest.split(":")[1]
    assert _gets(proxy, f"/manifests/{tag}")  # the fallback
    # without the opt-in neither link is followed
    proxy.clear()
    plain = _config(proxy, tmp_path / "b")
    assert "verify" not in plain.extra["obd"]
    assert not _gets(proxy, "/referrers/") and not _gets(proxy, f"/manifests/{tag}")


@pytest.mark.parametrize("status", [400, 405])
def test_a_referrers_api_refusal_falls_back_to_the_tag(registry, proxy, tmp_path, status):
    proxy.add("status", times=None, status=status, match=_is_referrers)
    cfg = _config(proxy, tmp_path, allow_referrers=True)
    assert cfg.extra["obd"]["verify"] == registry.tables
    assert "status" in proxy.injected


def test_a_registry_with_the_referrers_api_is_used_without_the_tag(registry, proxy, tmp_path):
    """A registry with the API lists the artifact; the fallback tag is gone (404): the tables are
    found all the same, and what the list names is still checked (a wrong subject is refused)."""
    tag = "sha256-" + registry.manifest.split(":")[1]
    index = json.loads(_fetch(registry, f"/v2/aci/hello/manifests/{tag}"))  # what 2.8's tag holds
    listed = [d for d in index["manifests"] if d.get("artifactType") == MEDIA_TYPE]
    assert listed
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}).encode()
    headers = {"Content-Type": OCI_INDEX, "OCI-Filters-Applied": "artifactType"}
    proxy.add("status", times=None, status=200, headers=headers, body=body, match=_is_referrers)
    proxy.add("status", times=None, status=404, match=lambda r: r.path.endswith(f"/manifests/{tag}"))
    cfg = _config(proxy, tmp_path, allow_referrers=True)
    assert cfg.extra["obd"]["verify"] == registry.tables
    asked = _gets(proxy, "/referrers/")
    assert len(asked) == 1 and not _gets(proxy, f"/manifests/{tag}")
    # a list naming something whose subject is not the image (here: the image itself) is refused
    proxy.clear()
    wrong = [{**listed[-1], "digest": registry.manifest}]
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": wrong}).encode()
    proxy.add("status", times=None, status=200, headers=headers, body=body, match=_is_referrers)
    with pytest.raises(FormatError, match="refers to another image"):
        _config(proxy, tmp_path / "wrong", allow_referrers=True)


def _fetch(registry: RegistryServer, path: str) -> bytes:
    req = urllib.request.Request(registry.url + path, headers={"Accept": OCI_INDEX})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return bytes(resp.read())
