"""``obd convert --mkfs`` on small devices: the journal shrinks to fit, and a device too small for
any says how large it must be."""

from __future__ import annotations

import subprocess

import pytest
from ext4tree import e2fsck_clean, read_tree

from fixtures import FIXTURES, require_tool
from obd.cli import main
from obd.convert.debugfs import Ext4Error, find_tool
from obd.convert.ext4 import MIN_MKFS_SIZE, mkfs_ext4
from obd.image.local import open_config
from obd.image.resolve import image_config
from obd.layer.export import export_stack

HELLO = FIXTURES / "aci-hello-world"
UUID = "2b0e6a52-8d4c-4e0e-9f39-4f0fbbd7b9f1"


@pytest.fixture(autouse=True)
def _tools():
    require_tool("debugfs")
    require_tool("e2fsck")


def journal_mib(image) -> int:
    """The journal's size in MiB, as dumpe2fs reports it."""
    out = subprocess.run(
        [find_tool("dumpe2fs"), "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("Total journal size:"))
    value = line.split(":", 1)[1].strip()
    assert value.endswith("M"), line
    return int(value[:-1])


def test_convert_mkfs_on_a_1_gib_device(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert", f"oci:{HELLO}:amd64", f"oci:{out}:small", "--mkfs", "--vsize", "1", "-q"]
    assert main([*args, "--no-convert-cache", "--workdir", str(tmp_path)]) == 0, capsys.readouterr().err
    stack = open_config(image_config([f"oci:{out}:small"]), readonly=True)
    image = tmp_path / "dev.img"
    try:
        export_stack(stack, str(image))
    finally:
        stack.close()
    assert image.stat().st_size == 1 << 30
    assert [r["path"] for r in read_tree(image)] == ["/hello"]
    assert e2fsck_clean(image)[0]
    assert journal_mib(image) == 128  # an eighth of the device; 512 MiB would not fit


def test_mkfs_keeps_the_512_mib_journal_on_large_devices(tmp_path):
    image = tmp_path / "fs.img"
    mkfs_ext4(image, 8 << 30, uuid=UUID)
    assert journal_mib(image) == 512


def test_mkfs_names_the_minimum_size(tmp_path):
    with pytest.raises(Ext4Error, match=f"at least {MIN_MKFS_SIZE >> 20} MiB"):
        mkfs_ext4(tmp_path / "fs.img", MIN_MKFS_SIZE - 4096, uuid=UUID)
    mkfs_ext4(tmp_path / "fs.img", MIN_MKFS_SIZE, uuid=UUID)
    assert e2fsck_clean(tmp_path / "fs.img")[0]


def test_cli_vsize_below_1_gib_is_refused_with_the_range(tmp_path, capsys):
    args = ["convert", f"oci:{HELLO}:amd64", f"oci:{tmp_path / 'out'}", "--mkfs", "--vsize", "0"]
    assert main(args) != 0
    assert "1 to 16384 GiB" in capsys.readouterr().err


def test_convert_workdir_that_does_not_exist_is_a_clear_error(tmp_path, capsys):
    from obd.cli import main

    rc = main(["convert", "oci:x:y", f"oci:{tmp_path}/out:z", "--workdir", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc != 0 and "--workdir must be an existing directory" in err and "Traceback" not in err
