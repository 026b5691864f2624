"""QEMU boots a guest from the FUSE disk file: ``-drive file=MOUNTPOINT/disk.img,format=raw``.

The guest is the one the VM tests boot (``tests/frontends/test_vm_boot.py``: a busybox ext4 root), imported
into an overlaybd layer: its data extents written into an RW layer, committed with ``commit_layer``.
"""

from __future__ import annotations

import os
from pathlib import Path

from test_fuse_mount import Mounted, _no_mount_left_behind  # noqa: F401
from test_vm_boot import root_image  # noqa: F401

from frontends.run.vm import boot
from obd.layer.tools import commit_layer
from obd.lsmt.rw import create_rw


def import_as_layer(image: Path, out: Path) -> Path:
    """A layer holding a raw image: its data extents (SEEK_DATA/SEEK_HOLE) written to an RW layer, sealed."""
    size = image.stat().st_size
    rw = create_rw(str(out) + ".data", str(out) + ".index", size)
    try:
        fd = os.open(image, os.O_RDONLY)
        try:
            pos = 0
            while pos < size:
                try:
                    pos = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                end = os.lseek(fd, pos, os.SEEK_HOLE)
                while pos < end:
                    chunk = os.pread(fd, min(4 << 20, end - pos), pos)
                    rw.pwrite(chunk, pos)
                    pos += len(chunk)
        finally:
            os.close(fd)
        commit_layer(rw, str(out))
    finally:
        rw.close()
    return out


def run(assets, disk, argv, **kwargs):
    kwargs.setdefault("timeout", 120)
    kwargs.setdefault("accel", "tcg")
    return boot(assets, str(disk), argv, **kwargs)


def test_qemu_boots_from_the_mounted_file_and_writes_persist(assets, root_image, tmp_path):  # noqa: F811 (root_image)
    layer = import_as_layer(root_image, tmp_path / "root.commit")
    upper = str(tmp_path / "up")
    with Mounted(tmp_path / "mnt", str(layer)) as m:
        result = run(assets, m.disk, ["cat", "/etc/group"])
        assert result.exit_code == 0 and b"staff:x:50:" in result.output
    with Mounted(tmp_path / "mnt", str(layer), "--upper", upper) as m:
        result = run(assets, m.disk, ["sh", "-c", "echo from the guest > /data/new"], readonly=False)
        assert result.exit_code == 0
    with Mounted(tmp_path / "mnt", "--upper", upper) as m:
        result = run(assets, m.disk, ["cat", "/data/new"])
        assert (result.exit_code, result.output) == (0, b"from the guest\n")
