"""The writable NBD export: writes, zeroes and trims through real clients, durability across server
restarts, QEMU reconnecting to a restarted server, snapshot/commit/fork of the upper directory,
and the errors a client sees (read-only, engine failures).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time

import pytest
from test_nbd_launch import OBD, NbdServer, layer_params, libnbd, read_device, sha256

from fixtures import find_tool, materialize, require_tool, stack
from obd.cli import main

BASE = stack("L0L1L2/lz4")
MiB = 1 << 20


def base_files() -> list[str]:
    return [str(materialize(r)) for r in BASE["layers"]]


def random_writes(h, model: bytearray, rng: random.Random, count: int, *, align: int = 512) -> None:
    size = len(model)
    for _ in range(count):
        n = -(-rng.choice((512, 4096, 65536, 3 * 4096)) // align) * align
        off = rng.randrange(0, size - n) // align * align
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off : off + n] = data


def qemu_io_bin() -> str:
    """qemu-io comes with qemu-img in Debian's qemu-utils (tests/helpers/fixtures.py only knows qemu-img)."""
    require_tool("qemu-img")
    found = find_tool("qemu-io")
    if not found:
        pytest.fail("qemu-io not found: it comes from Debian package 'qemu-utils'", pytrace=False)
    return found


def qemu_io(uri: str, *commands: str) -> str:
    cmd = [qemu_io_bin(), "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    res = subprocess.run([*cmd, uri], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "error" not in res.stdout.lower() and "fail" not in res.stdout.lower(), (
        res.stdout + res.stderr
    )
    return res.stdout


@pytest.mark.parametrize("flavour", ["append", "sparse"])
def test_qemu_io_writes_zeroes_and_discards(tmp_path, flavour):
    sparse = ["sparse=true"] if flavour == "sparse" else []
    with NbdServer(tmp_path, [*layer_params(BASE), f"upper={tmp_path / 'up'}", *sparse]) as srv:
        before = read_device(srv.connect())
        out = qemu_io(
            srv.uri,
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0xcd 70000 3000",  # unaligned: QEMU read-modify-writes to the advertised minimum
            "read -P 0xcd 70000 3000",
            "write -z 1M 1M",
            "read -P 0 1M 1M",
            "discard 4M 1M",
            "flush",
        )
        assert out.count("wrote") == 3 and out.count("read ") == 3
        h = srv.connect()
        after = read_device(h)
        assert after[:65536] == b"\xab" * 65536
        assert after[65536:70000] == before[65536:70000] and after[70000:73000] == b"\xcd" * 3000
        assert after[73000 : 1 * MiB] == before[73000 : 1 * MiB]
        assert after[MiB : 2 * MiB] == bytes(MiB)
        assert after[5 * MiB :] == before[5 * MiB :]
        h.shutdown()
        info = json.loads(
            subprocess.run(
                [require_tool("nbdinfo"), "--map", "--json", srv.uri],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        # the zeroed MiB reads as zeros; a sparse upper writes real zeros where a lower has data (at
        # [1M, 1M+64K) here), so only the rest of it is reported as zero there
        probe = MiB if flavour == "append" else MiB + 512 * 1024
        zeroed = next(e for e in info if e["offset"] <= probe < e["offset"] + e["length"])
        assert zeroed["type"] & 2
        srv.restart()
        assert read_device(srv.connect()) == after


@pytest.mark.parametrize("flavour", ["append", "sparse"])
def test_flushed_writes_survive_restart_and_kill(tmp_path, flavour):
    sparse = ["sparse=true"] if flavour == "sparse" else []
    rng = random.Random(f"restart-{flavour}")
    srv = NbdServer(tmp_path, [*layer_params(BASE), f"upper={tmp_path / 'up'}", *sparse]).start()
    try:
        h = srv.connect()
        model = bytearray(read_device(h))
        align = h.get_block_size(0)
        random_writes(h, model, rng, 200, align=align)
        h.flush()
        h.shutdown()
        srv.restart()  # clean stop
        h = srv.connect()
        assert read_device(h) == model
        random_writes(h, model, rng, 100, align=align)
        h.zero(2 * MiB, 10 * MiB)
        model[10 * MiB : 12 * MiB] = bytes(2 * MiB)
        h.flush()
        srv.kill()  # kill -9
        srv.start()
        assert read_device(srv.connect()) == model
    finally:
        srv.stop()


def test_multi_conn_connections_share_one_device(tmp_path):
    """A write on one connection is seen by another, and a flush on the other makes it durable."""
    with NbdServer(tmp_path, [*layer_params(BASE), f"upper={tmp_path / 'up'}"]) as srv:
        a, b = srv.connect(), srv.connect()
        assert a.can_multi_conn() and b.can_multi_conn()
        a.pwrite(b"M" * 8192, 3 * MiB)
        assert b.pread(8192, 3 * MiB) == b"M" * 8192
        b.flush()
        srv.kill()
        srv.start()
        assert srv.connect().pread(8192, 3 * MiB) == b"M" * 8192


def test_qemu_reconnects_to_a_restarted_server_without_losing_writes(tmp_path):
    """qemu-io with reconnect-delay: the server is killed, a write waits, the server comes back."""
    srv = NbdServer(tmp_path, [*layer_params(BASE), f"upper={tmp_path / 'up'}"]).start()
    opts = f"driver=nbd,server.type=unix,server.path={srv.sock},reconnect-delay=30"
    proc = subprocess.Popen(
        [qemu_io_bin(), "--image-opts", opts],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )

    def ask(command: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        return proc.stdout.readline() + proc.stdout.readline()

    try:
        assert "wrote 65536/65536" in ask("write -P 0x5a 0 64k")
        srv.kill()
        assert proc.stdin is not None
        proc.stdin.write("write -P 0x77 64k 64k\n")  # waits for the server to come back
        proc.stdin.flush()
        time.sleep(0.5)
        srv.start()
        assert proc.stdout is not None
        assert "wrote 65536/65536" in proc.stdout.readline() + proc.stdout.readline()
        assert "read 65536/65536" in ask("read -P 0x5a 0 64k")
        assert "read 65536/65536" in ask("read -P 0x77 64k 64k")
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)
        srv.stop()
    with srv:
        data = srv.connect().pread(2 * 65536, 0)
    assert data == b"\x5a" * 65536 + b"\x77" * 65536


def test_snapshot_commit_and_fork(tmp_path):
    up, fork = tmp_path / "vm1", tmp_path / "vm2"
    rng = random.Random("snapshot")
    srv = NbdServer(tmp_path, [*layer_params(BASE), f"upper={up}"], name="vm1").start()
    h = srv.connect()
    model1 = bytearray(read_device(h))
    random_writes(h, model1, rng, 100)
    h.flush()
    # a served directory cannot be snapshotted
    res = subprocess.run([str(OBD), "snapshot", str(up)], capture_output=True, text=True)
    assert res.returncode == 1 and "in use" in res.stderr
    srv.stop()

    assert main(["snapshot", str(up), "-m", "first", "-q"]) == 0
    cfg = json.loads((up / "config.v1.json").read_text())
    assert len(cfg["lowers"]) == 4 and cfg["lowers"][-1]["file"] == str(up / "layers" / "1.commit")
    assert cfg["upper"]["data"] == str(up / "rw" / "2.data") and not (up / "rw" / "1.data").exists()
    assert cfg["obd"]["snapshots"][0]["message"] == "first"

    srv = NbdServer(tmp_path, [f"upper={up}"], name="vm1").start()  # the directory alone
    h = srv.connect()
    assert read_device(h) == model1
    model2 = bytearray(model1)
    random_writes(h, model2, rng, 50)
    h.flush()
    srv.stop()
    assert main(["snapshot", "-z", str(up), "-q"]) == 0  # a ZFile (lz4) snapshot layer

    # the committed state is an ordinary overlaybd config
    exported = tmp_path / "vm1.img"
    assert main(["export", "--config", str(up / "config.v1.json"), "-o", str(exported), "-q"]) == 0
    assert exported.read_bytes() == model2

    assert main(["fork", str(up), str(fork)]) == 0
    with NbdServer(tmp_path, [f"upper={fork}"], name="vm2") as srv2:
        h2 = srv2.connect()
        assert read_device(h2) == model2
        h2.pwrite(b"F" * 4096, 0)
        h2.flush()
    with NbdServer(tmp_path, [f"upper={up}"], name="vm1", readonly=True) as srv:
        assert read_device(srv.connect()) == model2  # the source is untouched by the fork's writes

    # `obd commit` of an upper's RW layer stacks like any layer
    with NbdServer(tmp_path, [f"upper={fork}"], name="vm2") as srv2:
        expect = bytearray(read_device(srv2.connect()))
    fcfg = json.loads((fork / "config.v1.json").read_text())
    layer = tmp_path / "fork-top.commit"
    assert main(["commit", fcfg["upper"]["data"], fcfg["upper"]["index"], str(layer), "-q"]) == 0
    files = [lo["file"] for lo in fcfg["lowers"]] + [str(layer)]
    with NbdServer(tmp_path, [f"layer={f}" for f in files], name="stacked") as srv3:
        assert read_device(srv3.connect()) == expect


def test_a_fork_keeps_what_users_recorded_about_the_image(tmp_path):
    """Metadata others put in an upper (obd run's "run", an acceleration layer) survives a fork."""
    from obd.image.upper import UpperDir

    src, new = tmp_path / "src", tmp_path / "new"
    assert main(["fork", *base_files(), str(src)]) == 0
    cfg_path = src / "config.v1.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["obd"]["run"] = {"Env": ["A=1"], "WorkingDir": "/srv"}
    cfg_path.write_text(json.dumps(cfg))
    UpperDir(str(src)).fork(str(new))
    meta = json.loads((new / "config.v1.json").read_text())["obd"]
    assert meta["run"] == {"Env": ["A=1"], "WorkingDir": "/srv"}
    assert meta["forked_from"]["path"] == str(src) and meta["generation"] == 1


def test_fork_over_an_image_and_sparse_flavour(tmp_path):
    new = tmp_path / "new"
    assert main(["fork", *base_files(), str(new), "--sparse"]) == 0
    meta = json.loads((new / "config.v1.json").read_text())["obd"]
    assert meta["sparse"] and meta["base_layers"] == 3
    with NbdServer(tmp_path, [f"upper={new}"]) as srv:
        h = srv.connect()
        assert h.get_block_size(0) >= 4096
        assert sha256(read_device(h)) == BASE["sha256"]


def test_read_only_export_refuses_writes(tmp_path):
    nbd = libnbd()
    for params, ro in (
        (layer_params(BASE), False),  # no upper
        ([*layer_params(BASE), f"upper={tmp_path / 'up'}"], True),  # nbdkit -r
    ):
        with NbdServer(tmp_path, params, readonly=ro) as srv:
            h = srv.connect()
            assert h.is_read_only()
            h.set_strict_mode(0)  # send the write anyway: the server must refuse it
            for op, args in ((h.pwrite, (b"x" * 512, 0)), (h.zero, (512, 0)), (h.trim, (512, 0))):
                with pytest.raises(nbd.Error) as exc:
                    op(*args)
                assert exc.value.errnum in (errno.EPERM, errno.EROFS)
            assert sha256(read_device(h)) == BASE["sha256"]


def test_engine_errors_reach_the_client_as_eio_and_the_log(tmp_path):
    nbd = libnbd()
    entry = stack("L0/lz4")
    bad = tmp_path / "bad.lz4.commit"
    raw = bytearray(materialize(entry["layers"][0]).read_bytes())
    raw[2000] ^= 0xFF
    bad.write_bytes(raw)
    with NbdServer(tmp_path, [f"image={bad}"]) as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error) as exc:
            h.pread(65536, 0)
        assert exc.value.errnum == errno.EIO
        assert len(h.pread(4096, entry["vsize"] - 4096)) == 4096  # the rest still reads
    log = srv.log()
    assert "obd: pread: " in log and "bad.lz4.commit" in log and "[EIO]" in log


def test_obd_nbd_with_upper_restarts_over_the_same_directory(tmp_path):
    require_tool("nbdkit")
    sock, pid, up = tmp_path / "s.sock", tmp_path / "s.pid", tmp_path / "up"
    args = [str(OBD), "nbd", *base_files(), "--upper", str(up), "--socket", str(sock), "--pidfile", str(pid)]
    env = {"PATH": "/usr/bin:/bin"}
    assert subprocess.run(args, env=env, capture_output=True, timeout=120).returncode == 0
    try:
        h = libnbd().NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        h.pwrite(b"R" * 4096, 4096)
        h.flush()
        # the daemon (nbdkit forked after opening the image) still holds the directory's lock
        snap = subprocess.run([str(OBD), "snapshot", str(up)], env=env, capture_output=True, text=True)
        assert snap.returncode == 1 and "in use" in snap.stderr
        other = [*args[:-4], "--socket", str(tmp_path / "other.sock")]
        second = subprocess.run(other, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "in use" in second.stderr
        os.kill(int(pid.read_text()), 9)
        time.sleep(0.2)
        assert subprocess.run(args, env=env, capture_output=True, timeout=120).returncode == 0
        h = libnbd().NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        assert h.pread(4096, 4096) == b"R" * 4096
        h.shutdown()
    finally:
        os.kill(int(pid.read_text()), 15)
