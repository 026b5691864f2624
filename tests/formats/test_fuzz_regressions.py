"""Inputs bench/reliability.py's fuzzer found crashing a parser, each kept as a regression test.

Every one must end in an obd error naming the file and field, never another exception type.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from fixtures import FIXTURES, fixture_path
from obd.errors import ConfigError, FormatError
from obd.image.config import ImageConfig
from obd.oci.layout import OCILayout
from obd.oci.model import REF_NAME, Descriptor
from obd.registry.manifests import select_platform


def test_config_that_is_not_utf8_is_a_config_error(tmp_path):
    raw = bytearray(fixture_path("overlaybd/cfg/service.json").read_bytes())
    raw[len(raw) // 2] = 0xFF
    path = tmp_path / "config.v1.json"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        ImageConfig.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "platform", [True, 1.5, "linux/amd64", ["linux"], {"os": "linux", "architecture": 7}]
)
def test_malformed_platform_is_a_format_error(platform):
    index = json.loads((FIXTURES / "aci-hello-world" / "index.json").read_text())
    index["manifests"][1]["platform"] = platform
    with pytest.raises(FormatError, match="platform") as err:
        select_platform(index, "linux/amd64", "fuzzed-index")
    assert "manifests[1].platform" in str(err.value)


def test_platform_with_os_features_is_still_accepted():
    d = Descriptor.parse(
        {
            "digest": "sha256:" + "0" * 64,
            "size": 1,
            "platform": {"os": "windows", "architecture": "amd64", "os.features": ["win32k"]},
        },
        "manifests[0]",
        "x",
    )
    assert d.platform_name == "windows/amd64"


def test_fixture_layout_still_resolves():
    image = OCILayout(FIXTURES / "aci-hello-world").resolve("amd64-converted")
    assert image.overlaybd_layers()


@pytest.mark.parametrize(("blob", "key"), [("index.json", "manifests"), ("manifest", "layers")])
@pytest.mark.parametrize("value", [True, 0, 2**64 + 1, "layers", {"a": 1}])
def test_descriptor_lists_that_are_not_lists_are_format_errors(tmp_path, blob, key, value):
    root = tmp_path / "layout"
    shutil.copytree(FIXTURES / "aci-hello-world", root)
    index_path = root / "index.json"
    index = json.loads(index_path.read_text())
    if blob == "index.json":
        index[key] = value
    else:  # re-digest the mutated manifest so that the parser, not the digest check, meets it
        entry = next(m for m in index["manifests"] if m["annotations"].get(REF_NAME) == "amd64-converted")
        manifest = json.loads((root / "blobs" / "sha256" / entry["digest"][7:]).read_text())
        manifest[key] = value
        raw = json.dumps(manifest).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (root / "blobs" / "sha256" / digest).write_bytes(raw)
        entry.update(digest=f"sha256:{digest}", size=len(raw))
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="must be a list of descriptors") as err:
        OCILayout(root).resolve("amd64-converted")
    assert f": {key}=" in str(err.value)
