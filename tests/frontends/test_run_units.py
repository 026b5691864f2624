"""``obd run`` without a VM: the Docker command rules, Sandboxfiles, the ext4 metadata walk, raw image
import, image building, the nbdkit parameters and the CLI's argument handling."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from ext4tree import e2fsck_clean, read_file, read_tree

from fixtures import require_tool
from frontends.run import sandboxfile
from frontends.run.images import apt_mirror, busybox_rootfs, fs_size_for, mkfs_ext4
from frontends.run.launcher import (
    RunOptions,
    command_line,
    environment,
    remote_params,
    sandbox_dir,
)
from obd.errors import ConfigError, ObdError, UnsupportedError
from obd.formats.ext4 import Superblock
from obd.image.assemble import layers_image
from obd.image.local import open_layers
from obd.image.remote import RemoteOptions
from obd.layer.tools import OutputOptions, import_raw
from obd.prefetch.ext4 import ext4_metadata, prefetch_ranges
from obd.registry.auth import Credentials

# --- the command, the Docker way ----------------------------------------------------------------


def test_args_replace_cmd_and_follow_the_entrypoint():
    image = {"Entrypoint": ["/entry", "-x"], "Cmd": ["default", "args"]}
    assert command_line(image, []) == ["/entry", "-x", "default", "args"]
    assert command_line(image, ["mine"]) == ["/entry", "-x", "mine"]
    assert command_line({"Cmd": ["python3"]}, []) == ["python3"]
    assert command_line({"Cmd": ["python3"]}, ["sh", "-c", "x"]) == ["sh", "-c", "x"]


def test_entrypoint_override_drops_the_image_cmd():
    image = {"Entrypoint": ["/entry"], "Cmd": ["default"]}
    assert command_line(image, [], entrypoint=["/other"]) == ["/other"]
    assert command_line(image, ["a"], entrypoint=["/other"]) == ["/other", "a"]
    assert command_line(image, ["sh"], entrypoint=[]) == ["sh"]
    with pytest.raises(ConfigError, match="no command"):
        command_line(image, [], entrypoint=[])
    with pytest.raises(ConfigError, match="no command"):
        command_line({}, [])


def test_environment_overrides_by_name_and_keeps_order():
    image = {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "A=1"]}
    host = {"FROM_HOST": "h", "A": "host-a"}
    env = environment(image, ["A=2", "NEW=x=y", "FROM_HOST", "UNSET_ON_HOST"], host=host)
    assert env == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "A=2", "NEW=x=y", "FROM_HOST=h"]
    with pytest.raises(ConfigError):
        environment({}, ["=oops"], host={})


def test_remote_options_become_plugin_parameters_and_credentials_stay_off_the_command_line():
    remote = RemoteOptions(
        insecure=("127.0.0.1:5000",),
        tls_verify=False,
        cache_dir="rel/cache",
        cache_limit=1 << 30,
        readahead=65536,
        credentials=Credentials("alice", "s3cret"),
    )
    params = remote_params(remote)
    assert "insecure-registry=127.0.0.1:5000" in params
    assert "tls-verify=false" in params
    assert f"cache-dir={os.path.abspath('rel/cache')}" in params
    assert "cache-limit=1073741824" in params and "readahead=65536" in params
    assert not any("s3cret" in p for p in params)
    assert remote_params(RemoteOptions(insecure=True)) == ["insecure-registry=true"]


def test_named_sandboxes_live_under_the_state_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_STATE_DIR", str(tmp_path))
    assert sandbox_dir("dev") == tmp_path / "sandboxes" / "dev"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ConfigError):
            sandbox_dir(bad)
    assert RunOptions().memory_mib == 512


# --- Sandboxfiles ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sandboxfile_settings_and_scripts(tmp_path):
    write(
        tmp_path / "Sandboxfile",
        """
meta: {description: ignored}
sandboxes:
  hello:
    image: 127.0.0.1:5000/python:3.11
    memory: 1G
    cpus: 2
    envs: [GREETING=hi, "QUOTED=a b"]
    workdir: /app
    user: 1000
    scripts:
      start: python3 -c 'print("hello world!")'
      version: [python3, --version]
    timeout: 30
    trace: traces/boot.trace
    insecure_registry: 127.0.0.1:5000
  plain:
    image: busybox
    envs: {A: 1, B: two}
    command: echo hi
    rw: state/plain
    memory: 256
""",
    )
    sf = sandboxfile.load(tmp_path)  # a directory finds its Sandboxfile
    hello = sf.get("hello")
    assert (hello.image, hello.memory_mib, hello.cpus, hello.workdir, hello.user) == (
        "127.0.0.1:5000/python:3.11",
        1024,
        2,
        "/app",
        "1000",
    )
    assert hello.env == ["GREETING=hi", "QUOTED=a b"]
    assert hello.default_args() == ["/bin/sh", "-c", "python3 -c 'print(\"hello world!\")'"]
    assert hello.script_argv("version") == ["python3", "--version"]
    assert hello.trace == str((tmp_path / "traces" / "boot.trace").resolve())
    assert hello.timeout == 30.0 and hello.insecure_registry == ["127.0.0.1:5000"]
    plain = sf.get("plain")
    assert plain.env == ["A=1", "B=two"]
    assert plain.default_args() == ["echo", "hi"]
    assert plain.rw == str((tmp_path / "state" / "plain").resolve())
    with pytest.raises(ConfigError, match="no script 'nope'"):
        hello.script_argv("nope")
    with pytest.raises(ConfigError, match="no sandbox 'other'"):
        sf.get("other")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("sandboxes: {a: {memory: lots}}", "sandboxes.a.memory"),
        ("sandboxes: {a: {cpus: 0}}", "sandboxes.a.cpus"),
        ("sandboxes: {a: {cpus: true}}", "sandboxes.a.cpus"),
        ("sandboxes: {a: {workdir: relative}}", "sandboxes.a.workdir"),
        ("sandboxes: {a: {envs: [=x]}}", "sandboxes.a.envs"),
        ("sandboxes: {a: {colour: blue}}", "sandboxes.a.colour"),
        ("sandboxes: {a: {rw: true, snapshot: s}}", "sandboxes.a.snapshot"),
        ("sandboxes: {a: {accel: hvf}}", "sandboxes.a.accel"),
        ("sandboxes: {a: {timeout: -1}}", "sandboxes.a.timeout"),
        ("sandboxes: {a: {timeout: soon}}", "sandboxes.a.timeout"),
        ("sandboxes: {a: {rw: ''}}", "sandboxes.a.rw"),
        ("sandboxes: {a: {snapshot: ' '}}", "sandboxes.a.snapshot"),
        ("sandboxes: {a: {start: []}}", "sandboxes.a.start"),
        ("sandboxes: {a: {env: [A=1], envs: [B=2]}}", "sandboxes.a.env"),
        ("sandboxes: {a: {env: [=x]}}", "sandboxes.a.env"),
        ("sandboxes: {'bad name': {}}", "sandboxes"),
        ("sandboxes: []", "sandboxes"),
        ("- just a list", "(top level)"),
    ],
)
def test_sandboxfile_mistakes_name_the_field(tmp_path, body, field):
    f = write(tmp_path / "Sandboxfile", body)
    with pytest.raises(ConfigError) as info:
        sandboxfile.load(f)
    assert info.value.field == field
    assert str(f) in str(info.value)


def test_sandboxfile_refuses_what_obd_cannot_do_and_bad_yaml(tmp_path):
    f = write(tmp_path / "Sandboxfile", "sandboxes: {a: {image: x, ports: ['8000:8000']}}")
    with pytest.raises(UnsupportedError, match="port forwarding"):
        sandboxfile.load(f)
    f = write(tmp_path / "Sandboxfile", "sandboxes: {a: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML at line 1"):
        sandboxfile.load(f)
    with pytest.raises(ConfigError, match="not found"):
        sandboxfile.load(tmp_path / "missing")


def test_memory_sizes():
    assert [sandboxfile.parse_memory(v) for v in (512, "512", "512M", "1G", "1.5GiB", "2g")] == [
        512,
        512,
        512,
        1024,
        1536,
        2048,
    ]
    for bad in ("x", "8", True, "1T"):
        with pytest.raises(ValueError):
            sandboxfile.parse_memory(bad)


# --- building images ------------------------------------------------------------------------------


def test_apt_mirror_reads_both_source_formats(tmp_path):
    etc = tmp_path / "etc" / "apt" / "sources.list.d"
    etc.mkdir(parents=True)
    (etc / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb deb-src\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    assert apt_mirror("bookworm", root=str(tmp_path)) == "http://mirror.example/debian"
    (tmp_path / "etc" / "apt" / "sources.list").write_text(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://one-line.example/debian bookworm main\n"
    )
    assert apt_mirror("bookworm", root=str(tmp_path)) == "http://one-line.example/debian"
    assert apt_mirror("trixie", root=str(tmp_path)) == "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    require_tool("busybox")
    base = tmp_path_factory.mktemp("root")
    files = {f"etc/dir{i}/file{j}": f"{i}-{j}\n" * (j + 1) for i in range(30) for j in range(5)}
    files["data/random.bin"] = os.urandom(300_000)
    return busybox_rootfs(base / "root", files=files)


@pytest.fixture(scope="module")
def small_ext4(small_root, tmp_path_factory):
    require_tool("mke2fs")
    return mkfs_ext4(small_root, tmp_path_factory.mktemp("ext4") / "root.ext4", 64 << 20)


def test_busybox_root_has_applets_users_and_extra_files(small_root):
    assert os.path.islink(small_root / "bin" / "sh")
    assert os.path.realpath(small_root / "bin" / "sh") == str((small_root / "bin" / "busybox").resolve())
    assert "alice:x:1000:1000" in (small_root / "etc" / "passwd").read_text()
    assert (small_root / "etc" / "dir3" / "file1").read_text() == "3-1\n3-1\n"
    assert fs_size_for(small_root) >= 32 << 20


def test_import_raw_keeps_the_bytes_and_skips_zero_blocks(small_ext4, tmp_path):
    require_tool("debugfs")
    out = tmp_path / "layer.commit"
    res = import_raw(str(small_ext4), str(out), options=OutputOptions(compress="lz4", tar=True))
    layer = open_layers([str(out)])
    try:
        assert layer.size == small_ext4.stat().st_size
        raw = small_ext4.read_bytes()
        dev = layer.pread(0, layer.size)
        assert hashlib.sha256(dev).hexdigest() == hashlib.sha256(raw).hexdigest()
        mapped = int(layer.lower_index.length.sum()) * 512
        allocated = small_ext4.stat().st_blocks * 512
        assert mapped < allocated  # the zeros mke2fs wrote (journal, tables) are not mapped
        assert res.info.data_bytes == mapped
    finally:
        layer.close()
    assert read_file(small_ext4, "/etc/dir3/file1") == b"3-1\n3-1\n"
    clean, report = e2fsck_clean(small_ext4)
    assert clean, report


def test_import_raw_of_a_bigger_virtual_size_and_a_ragged_end(tmp_path):
    raw = tmp_path / "raw"
    raw.write_bytes(b"\1" * 5000)  # not a whole sector: the tail is zero-padded
    out = tmp_path / "l.commit"
    import_raw(str(raw), str(out), options=OutputOptions(), virtual_size=1 << 20)
    layer = open_layers([str(out)])
    try:
        assert layer.size == 1 << 20
        assert layer.pread(0, 5120) == b"\1" * 5000 + bytes(120)
        assert layer.pread(8192, 4096) == bytes(4096)
    finally:
        layer.close()
    with pytest.raises(ObdError, match="virtual size"):
        import_raw(str(raw), str(tmp_path / "x"), virtual_size=4096)


def test_layers_image_carries_the_run_config():
    _manifest, config = layers_image([("sha256:" + "a" * 64, 10)], config={"Cmd": ["sh"], "Env": ["A=1"]})
    doc = json.loads(config)
    assert doc["config"] == {"Cmd": ["sh"], "Env": ["A=1"]}
    assert json.loads(layers_image([("sha256:" + "a" * 64, 10)])[1])["config"] == {}


# --- the ext4 metadata walk -----------------------------------------------------------------------


def _debugfs_blocks(image: Path, path: str) -> list[int]:
    debugfs = require_tool("debugfs")
    out = subprocess.run(
        [debugfs, "-R", f"blocks {path}", str(image)], capture_output=True, text=True, check=True
    )
    return [int(b) for b in out.stdout.split()]


def test_ext4_metadata_covers_inode_tables_and_every_directory(small_ext4):
    fd = os.open(small_ext4, os.O_RDONLY)
    try:
        size = small_ext4.stat().st_size
        ranges = ext4_metadata(lambda o, n: os.pread(fd, n, o), size)
        inodes_only = ext4_metadata(lambda o, n: os.pread(fd, n, o), size, directories=False)
    finally:
        os.close(fd)
    assert ranges and inodes_only and sum(n for _, n in inodes_only) < sum(n for _, n in ranges)

    def covered(offset: int) -> bool:
        return any(a <= offset < a + n for a, n in ranges)

    assert covered(1024)  # the superblock
    # what Linux reads at mount: the journal superblock and every backup superblock
    sb = Superblock.parse(small_ext4.read_bytes()[1024:2048])
    assert sb.journal_inum and covered(_debugfs_blocks(small_ext4, f"<{sb.journal_inum}>")[0] * 4096)
    assert all(covered(sb.group_offset(g)) for g in sb.backup_groups())
    # sparse_super: groups 1 and the powers of 3, 5, 7 (what a booting guest read from a 64 GiB disk)
    big = dataclasses.replace(sb, blocks_count=300 * sb.blocks_per_group)
    assert big.backup_groups() == [1, 3, 5, 7, 9, 25, 27, 49, 81, 125, 243]
    assert big.group_offset(3) == 3 * sb.blocks_per_group * 4096
    tree = read_tree(small_ext4)
    dirs = ["/", *(e["path"] for e in tree if e["type"] == "dir")]
    assert len(dirs) > 30
    for d in dirs:
        for block in _debugfs_blocks(small_ext4, d):
            assert covered(block * 4096), f"directory {d} block {block} not planned"
    # file data is not metadata
    for block in _debugfs_blocks(small_ext4, "/data/random.bin"):
        assert not covered(block * 4096)
    assert all(a + n <= size for a, n in ranges)
    assert ranges == sorted(ranges)


def test_ext4_metadata_of_something_else_is_empty_and_corruption_is_harmless(small_ext4):
    assert ext4_metadata(lambda o, n: bytes(n), 1 << 20) == []
    data = bytearray(small_ext4.read_bytes())
    rng = __import__("random").Random(7)
    for _ in range(200):  # flip bytes in the superblock and group descriptors: never an exception
        copy = bytearray(data[: 1 << 20])
        for _ in range(8):
            copy[rng.randrange(1024, 8192)] = rng.randrange(256)
        got = ext4_metadata(
            lambda o, n, c=copy: bytes(c[o : o + n]) if o + n <= len(c) else bytes(n), len(data)
        )
        assert all(a >= 0 and a + n <= len(data) for a, n in got)


def test_prefetch_ranges_reads_everything_once(tmp_path):
    seen: list[tuple[int, int]] = []

    def readinto(buf, offset):
        seen.append((offset, len(buf)))
        return len(buf)

    res = prefetch_ranges(readinto, [(0, 3 << 20), (10 << 20, 4096)], workers=4, piece=1 << 20)
    assert res.bytes == (3 << 20) + 4096 and res.ranges == 4
    assert sorted(seen) == [(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20), (10 << 20, 4096)]
