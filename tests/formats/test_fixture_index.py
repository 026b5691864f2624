"""fixtures/expected.json is complete and true, and the plumbing in tests/helpers/fixtures.py works on it."""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import fixtures
from fixtures import FIXTURES, expected, fixture_path, materialize, resolved_config, sha256_file

# Files under fixtures/ that describe the others rather than being fixtures themselves.
INDEX_FILES = {"README.md", "expected.json"}
# Decompressing more than this per .bz2 takes seconds; such content checks run with --run-slow.
QUICK_CONTENT_BYTES = 64 << 20
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def stored_files() -> set[str]:
    found = set()
    for dirpath, dirs, names in os.walk(FIXTURES):
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # bytecode of make_inputs.py, which tests import
        for name in names:
            rel = Path(dirpath, name).relative_to(FIXTURES).as_posix()
            if rel not in INDEX_FILES:
                found.add(rel)
    return found


def bz2_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    with bz2.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            total += len(chunk)
    return h.hexdigest(), total


def content_digest(rel: str) -> str:
    """SHA-256 of a file's content: of the stored bytes, or of the decompressed ones for .bz2."""
    entry = expected()["files"].get(rel) or expected()["derived"][rel]
    return entry.get("content_sha256", entry["sha256"])


def test_every_listed_file_exists_with_its_hash() -> None:
    problems = []
    for rel, entry in expected()["files"].items():
        path = FIXTURES / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, index says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 {sha256_file(path)}, index says {entry['sha256']}")
    assert problems == []


def test_every_file_under_fixtures_is_listed() -> None:
    listed = set(expected()["files"])
    stored = stored_files()
    assert sorted(stored - listed) == [], "stored but not in fixtures/expected.json"
    assert sorted(listed - stored) == [], "in fixtures/expected.json but not stored"


def test_index_entries_are_well_formed() -> None:
    for rel, entry in expected()["files"].items():
        assert HEX64.match(entry["sha256"]), rel
        assert entry["kind"] and entry["what"], rel
        assert ("content_sha256" in entry) == rel.endswith(".bz2") == ("content_bytes" in entry), rel
    for rel, entry in expected()["derived"].items():
        assert rel not in expected()["files"]
        assert entry["from"] in expected()["files"], rel


def bz2_entries(large: bool) -> list[str]:
    return sorted(
        rel
        for rel, e in expected()["files"].items()
        if rel.endswith(".bz2") and (e["content_bytes"] > QUICK_CONTENT_BYTES) == large
    )


@pytest.mark.parametrize("rel", bz2_entries(large=False))
def test_bz2_content_hash(rel: str) -> None:
    entry = expected()["files"][rel]
    assert bz2_digest(fixture_path(rel)) == (entry["content_sha256"], entry["content_bytes"])


@pytest.mark.slow
@pytest.mark.parametrize("rel", bz2_entries(large=True))
def test_bz2_content_hash_large(rel: str) -> None:
    entry = expected()["files"][rel]
    assert bz2_digest(fixture_path(rel)) == (entry["content_sha256"], entry["content_bytes"])
    assert sha256_file(materialize(rel)) == entry["content_sha256"]


def test_materialize_resolves_every_name_form() -> None:
    plain = "overlaybd/lsmt/commit/L1.commit"
    assert materialize(plain) == FIXTURES / plain
    entry = expected()["files"]["overlaybd/lsmt/commit/L0.commit.bz2"]
    by_logical = materialize("overlaybd/lsmt/commit/L0.commit")
    assert by_logical == materialize("overlaybd/lsmt/commit/L0.commit.bz2")
    assert by_logical.name == "L0.commit"
    assert sha256_file(by_logical) == entry["content_sha256"]
    base = materialize("overlaybd/ext4/base/ext4_64")
    assert sha256_file(base) == expected()["derived"]["overlaybd/ext4/base/ext4_64"]["sha256"]
    with pytest.raises(KeyError):
        materialize("overlaybd/no/such/file")


def test_materialize_keeps_sparse_holes() -> None:
    rel = "overlaybd/lsmt/cli-create/rw1g-sparse.data.bz2"
    entry = expected()["files"][rel]
    path = materialize(rel)
    st = path.stat()
    assert st.st_size == entry["content_bytes"] == 1073745920
    assert st.st_blocks * 512 < 1 << 20, "the 1 GiB sparse RW data file must stay sparse"
    holes = json.loads(fixture_path("overlaybd/facts/sparse_maps.json").read_text())[
        "lsmt/cli-create/rw1g-sparse.data"
    ]
    with path.open("rb") as f:
        for ext in holes["data_extents"]:
            f.seek(ext["offset"])
            assert hashlib.sha256(f.read(ext["length"])).hexdigest() == ext["sha256"]
        f.seek(entry["content_bytes"] - 4096)
        assert f.read() == bytes(4096)


def test_stacks_are_consistent() -> None:
    names = [s["name"] for s in expected()["stacks"]]
    assert len(names) == len(set(names))
    known = expected()["files"].keys() | expected()["derived"].keys()
    for s in expected()["stacks"]:
        assert s["layers"] and all(layer in known for layer in s["layers"]), s["name"]
        assert HEX64.match(s["sha256"]) and s["vsize"] > 0 and s["source"], s["name"]
        for key in ("tree", "fsck", "extents", "merged_index"):
            if key in s:
                assert s[key] in expected()["files"], (s["name"], key)
        if s["config"]:
            lowers = json.loads(fixture_path(s["config"]).read_text())["lowers"]
            assert [content_digest(rel) for rel in s["layers"]] == [
                content_digest(_stored_name("overlaybd/" + low["file"])) for low in lowers
            ], s["name"]
    by_name = {s["name"]: s for s in expected()["stacks"]}
    for facts_sha, stack_name in (("ext4_L1.sha", "ext4/L1/tar-lz4"), ("ext4_L1L2.sha", "ext4/L1L2/tar-lz4")):
        text = fixture_path(f"overlaybd/facts/{facts_sha}").read_text().split()
        assert text == ["vsize", str(by_name[stack_name]["vsize"]), "sha256", by_name[stack_name]["sha256"]]


def _stored_name(rel: str) -> str:
    return rel if rel in expected()["files"] else rel + ".bz2"


def test_resolved_config_points_at_materialized_layers() -> None:
    stack = fixtures.stack("L0L1L2/cfg-plain")
    config = json.loads(resolved_config(stack["config"]).read_text())
    files = [Path(low["file"]) for low in config["lowers"]]
    assert all(p.is_absolute() and p.is_file() for p in files)
    assert files == fixtures.stack_layers(stack)


def test_zfile_pairs_name_real_outputs() -> None:
    known = expected()["files"].keys() | expected()["derived"].keys()
    seen = set()
    for pair in expected()["zfile_pairs"]:
        assert pair["zfile"] in known and pair["zfile"] not in seen
        seen.add(pair["zfile"])
        assert pair["algo"] in ("lz4", "zstd") and pair["block_size"] in (4096, 65536)
        if pair["output"] is not None:
            assert content_digest(pair["output"]) == pair["output_sha256"], pair["zfile"]
        else:
            assert pair.get("note"), pair["zfile"]
    zfiles = {rel for rel, e in expected()["files"].items() if e["kind"] in ("zfile", "tar-zfile")}
    assert zfiles <= seen, "every ZFile blob has an input→output pair"
    zeros = [p for p in expected()["zfile_pairs"] if "zeros_1m" in p["zfile"]]
    assert zeros and all(p["output_sha256"] == hashlib.sha256(bytes(1 << 20)).hexdigest() for p in zeros)


def test_readme_lists_every_file() -> None:
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    missing = [rel for rel in expected()["files"] if f"`{rel}`" not in readme]
    assert missing == []
    for s in expected()["stacks"]:
        assert f"`{s['name']}`" in readme, s["name"]


def test_require_tool_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixtures, "find_tool", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"e2fsprogs.*setup\.sh installs it"):
        fixtures.require_tool("debugfs")
    monkeypatch.setattr(fixtures, "setup_packages", lambda: ["python3-venv"])
    with pytest.raises(pytest.fail.Exception, match=r"'nbdkit' is not in setup\.sh's PACKAGES array"):
        fixtures.require_tool("nbdkit")
    with pytest.raises(pytest.fail.Exception, match="TOOL_PACKAGES"):
        fixtures.require_tool("no-such-program-obd")


def test_tools_in_use_are_installed_by_setup() -> None:
    packages = fixtures.setup_packages()
    assert {"python3-venv", "e2fsprogs", "bzip2"} <= set(packages)
    for name in ("debugfs", "e2fsck", "mke2fs", "bzip2"):
        assert fixtures.TOOL_PACKAGES[name] in packages, name
    assert fixtures.require_tool("debugfs").endswith("/debugfs")


def test_setup_script_and_ci_entry() -> None:
    repo = fixtures.REPO
    subprocess.run(["bash", "-n", str(repo / "setup.sh")], check=True)
    assert os.access(repo / "setup.sh", os.X_OK) and os.access(repo / ".ci" / "run", os.X_OK)
    assert "exec ./setup.sh test" in (repo / ".ci" / "run").read_text()
