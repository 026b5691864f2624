"""The nbd plugin's logic without nbdkit: parameters, NBD semantics of each operation, errno mapping.

``frontends.nbd.backend`` imports without nbdkit (a stand-in ``nbdkit`` module records errors and
debug lines), so every callback can be driven directly over real fixture stacks. The same code is
exercised through a real nbdkit in test_nbd_read.py / test_nbd_write.py.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os

import pytest

import frontends.nbd.backend as be
from fixtures import materialize, stack
from obd.errors import ConfigError, LayerStateError, ObdError
from obd.image.device import Device, DeviceError
from obd.image.local import open_config, open_layers
from obd.image.resolve import image_config
from obd.image.upper import UpperDir, open_upper

L0L1L2 = stack("L0L1L2/plain")
HOLE = be.nbdkit.EXTENT_HOLE | be.nbdkit.EXTENT_ZERO
ZERO = be.nbdkit.EXTENT_ZERO


def layers(entry=L0L1L2) -> list[str]:
    return [str(materialize(r)) for r in entry["layers"]]


@pytest.fixture(autouse=True)
def _fresh_plugin():
    be.reset()
    be.nbdkit.errors.clear()
    be.nbdkit.messages.clear()
    yield
    be.reset()


def start(*params: str):
    """config → config_complete → get_ready → open, as nbdkit does; returns the handle."""
    for p in params:
        key, _, value = p.partition("=")
        be.config(key, value)
    be.config_complete()
    be.get_ready()
    return be.open(False)


def read_all(h) -> bytes:
    size = be.get_size(h)
    buf = bytearray(size)
    mv = memoryview(buf)
    for off in range(0, size, 4 << 20):
        be.pread(h, mv[off : off + (4 << 20)], off, 0)
    return bytes(buf)


# --- parameters -----------------------------------------------------------------------------------
def test_options_parse_every_key(tmp_path, monkeypatch):
    o = be.PluginOptions()
    f = tmp_path / "x.commit"
    f.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    o.set("layer", "x.commit")
    o.set("image", "oci:lay:tag")
    o.set("upper", "up")
    o.set("sparse", "yes")
    o.set("readonly", "0")
    o.set("cache-dir", "c")
    o.set("extents", "off")
    o.set("multi-conn", "true")
    o.set("platform", "linux/amd64")
    o.set("venv", "/v")
    assert o.image == [str(f), f"oci:{tmp_path}/lay:tag"]
    assert o.upper == str(tmp_path / "up") and o.cache_dir == str(tmp_path / "c")
    assert o.sparse and not o.readonly and not o.extents and o.multi_conn
    with pytest.raises(ObdError, match="unknown parameter"):
        o.set("imgae", "x")
    with pytest.raises(ObdError, match="boolean"):
        o.set("sparse", "maybe")
    with pytest.raises(ObdError, match="whole stack"):
        o.check()  # a layer plus an oci: image


def test_config_complete_needs_an_image():
    """Startup errors stop nbdkit with the engine's one-line message."""
    with pytest.raises(RuntimeError, match="obd: parameters: no image"):
        be.config_complete()
    be.config("config", "/x.json")
    be.config("image", "/y")
    with pytest.raises(RuntimeError, match="not both"):
        be.config_complete()
    with pytest.raises(RuntimeError, match="obd: imgae=x: imgae: unknown parameter"):
        be.config("imgae", "x")


def test_a_missing_layer_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="no such file"):
        image_config("/nonexistent/layer.commit")


# --- reads ----------------------------------------------------------------------------------------
def test_read_only_device_reads_the_stack_and_refuses_writes():
    h = start(*(f"layer={p}" for p in layers()))
    assert hashlib.sha256(read_all(h)).hexdigest() == L0L1L2["sha256"]
    assert be.block_size(h) == (1, 4096, be.MAX_REQUEST)
    assert not be.can_write(h) and not be.can_zero(h) and not be.can_trim(h)
    assert be.can_fua(h) == be.nbdkit.FUA_NONE
    assert be.can_multi_conn(h) and be.can_flush(h) and be.can_extents(h)
    assert be.can_cache(h) == be.nbdkit.CACHE_NATIVE
    assert be.thread_model() == be.nbdkit.THREAD_MODEL_PARALLEL
    assert "3 layer(s)" in be.export_description(h) and "read-only" in be.export_description(h)
    with pytest.raises(RuntimeError, match="read-only"):
        be.pwrite(h, memoryview(b"x" * 512), 0, 0)
    assert be.nbdkit.errors[-1] == errno.EROFS
    with pytest.raises(RuntimeError, match="EROFS"):
        be.zero(h, 512, 0, 0)
    assert be.nbdkit.errors[-1] == errno.EROFS


def test_unaligned_reads_equal_the_stack():
    h = start(*(f"layer={p}" for p in layers()))
    st = open_layers(layers())
    try:
        for off, n in ((1, 1), (511, 2), (4095, 8193), (131071, 70000), (67108864 - 3, 3)):
            buf = bytearray(n)
            be.pread(h, memoryview(buf), off, 0)
            assert bytes(buf) == st.pread(off, n), (off, n)
    finally:
        st.close()


def test_out_of_range_is_einval():
    h = start(*(f"layer={p}" for p in layers()))
    with pytest.raises(RuntimeError, match="outside"):
        be.pread(h, memoryview(bytearray(512)), be.get_size(h) - 256, 0)
    assert be.nbdkit.errors[-1] == errno.EINVAL


def test_engine_errors_become_eio_with_the_message_logged(tmp_path):
    """A ZFile block whose CRC does not match: EIO, and the engine's one-line reason in the log."""
    entry = stack("L0/lz4")
    src = materialize(entry["layers"][0])
    bad = tmp_path / "bad.lz4.commit"
    raw = bytearray(src.read_bytes())
    raw[2000] ^= 0xFF  # inside the first compressed blocks
    bad.write_bytes(raw)
    h = start(f"image={bad}")
    with pytest.raises(RuntimeError, match=r"obd: pread: .*bad\.lz4\.commit.*\[EIO\]"):
        be.pread(h, memoryview(bytearray(65536)), 0, 0)
    assert be.nbdkit.errors[-1] == errno.EIO
    assert any("bad.lz4.commit" in m for m in be.nbdkit.messages)


# --- extents --------------------------------------------------------------------------------------
def test_extents_map_kinds_to_nbd_types_and_cover_the_range():
    h = start(*(f"layer={p}" for p in layers()))
    size = be.get_size(h)
    ext = be.extents(h, size, 0, 0)
    assert ext[0][0] == 0 and sum(n for _o, n, _t in ext) == size
    for (o1, n1, t1), (o2, _n2, t2) in itertools.pairwise(ext):
        assert o1 + n1 == o2 and t1 != t2  # contiguous, neighbours of one type merged
    st = open_layers(layers())
    want = {"data": 0, "zero": ZERO, "hole": HOLE}
    for e in st.extents():
        covering = [t for o, n, t in ext if o <= e.offset < o + n]
        assert covering == [want[e.kind]]
    st.close()
    assert {t for _o, _n, t in ext} == {0, ZERO, HOLE}
    one = be.extents(h, size, 0, be.nbdkit.FLAG_REQ_ONE)
    assert one == [ext[0]]
    mid = ext[1][0] + 512
    assert be.extents(h, 4096, mid, be.nbdkit.FLAG_REQ_ONE)[0][:1] == (mid,)


# --- writes: append upper -------------------------------------------------------------------------
def test_append_upper_unaligned_writes_zero_trim_and_reopen(tmp_path):
    up = tmp_path / "up"
    h = start(*(f"layer={p}" for p in layers()), f"upper={up}")
    assert be.can_write(h) and be.block_size(h) == (512, 4096, be.MAX_REQUEST)
    assert be.can_fua(h) == be.nbdkit.FUA_EMULATE and be.can_fast_zero(h)
    model = bytearray(read_all(h))
    for off, data in ((1, b"ab"), (4095, b"xyz" * 100), (1 << 20, os.urandom(65536))):
        be.pwrite(h, memoryview(data), off, 0)
        model[off : off + len(data)] = data
    be.zero(h, 100_000, 4_000_000 + 3, be.nbdkit.FLAG_FAST_ZERO)  # over lower data, unaligned
    model[4_000_003:4_100_003] = bytes(100_000)
    be.pwrite(h, memoryview(b"F" * 512), 8192, be.nbdkit.FLAG_FUA)
    model[8192:8704] = b"F" * 512
    be.flush(h, 0)
    assert read_all(h) == model
    ext = be.extents(h, 1 << 20, 4_000_000 - 4_000_000 % 512 + 512, be.nbdkit.FLAG_REQ_ONE)
    assert ext[0][2] == ZERO
    be.cleanup()
    be.reset()
    h = start(f"upper={up}")  # the directory alone reopens the device
    assert read_all(h) == model


def test_trim_leaves_partial_blocks_alone(tmp_path):
    h = start(*(f"layer={p}" for p in layers()), f"upper={tmp_path / 'up'}")
    before = read_all(h)
    be.trim(h, 1000, 100, 0)  # no whole sector inside [100, 1100) except [512, 1024)
    after = read_all(h)
    assert after[:512] == before[:512] and after[1024:] == before[1024:]
    assert after[512:1024] == bytes(512)


# --- writes: sparse upper -------------------------------------------------------------------------
def test_sparse_upper_keeps_lower_bytes_around_partial_block_writes(tmp_path):
    """A sparse upper's holes are its index: a write must never leave a block half-written."""
    up = tmp_path / "up"
    h = start(*(f"layer={p}" for p in layers()), f"upper={up}", "sparse=true")
    assert be.block_size(h)[0] >= 4096
    model = bytearray(read_all(h))
    data_off = next(o for o, n, t in be.extents(h, be.get_size(h), 0, 0) if t == 0 and n >= 8192)
    for off, data in ((data_off + 512, b"\xab" * 512), (data_off + 5000, b"\xcd" * 7)):
        be.pwrite(h, memoryview(data), off, 0)
        model[off : off + len(data)] = data
    be.flush(h, 0)
    assert read_all(h) == model
    be.cleanup()
    be.reset()
    h = start(f"upper={up}")
    assert read_all(h) == model


def test_sparse_upper_zero_over_lower_data_survives_reopen(tmp_path):
    up = tmp_path / "up"
    h = start(*(f"layer={p}" for p in layers()), f"upper={up}", "sparse=true")
    ext = be.extents(h, be.get_size(h), 0, 0)
    data_off, data_len, _ = next(e for e in ext if e[2] == 0 and e[1] >= 65536)
    hole_off, _hole_len, _ = next(e for e in ext if e[2] == HOLE and e[1] >= 1 << 20)
    # a fast zero over lower data would have to write zeros: refused, nothing changed
    with pytest.raises(DeviceError):
        be.zero(h, 65536, data_off, be.nbdkit.FLAG_FAST_ZERO)
    assert be.nbdkit.errors[-1] == errno.ENOTSUP
    be.zero(h, 65536, hole_off, be.nbdkit.FLAG_FAST_ZERO)  # nothing below: a discard is enough
    model = bytearray(read_all(h))
    be.zero(h, data_len - 1000, data_off + 700, be.nbdkit.FLAG_MAY_TRIM)
    model[data_off + 700 : data_off + data_len - 300] = bytes(data_len - 1000)
    assert read_all(h) == model
    be.cleanup()
    be.reset()
    h = start(f"upper={up}")
    assert read_all(h) == model


def test_cache_reads_through():
    h = start(*(f"layer={p}" for p in layers()))
    be.cache(h, 10 << 20, 0, 0)


# --- upper directories ----------------------------------------------------------------------------
def test_upper_dir_is_locked_while_served_and_tied_to_its_image(tmp_path):
    up = tmp_path / "up"
    start(*(f"layer={p}" for p in layers()), f"upper={up}")
    with pytest.raises(LayerStateError, match="in use"):
        UpperDir(up).lock()
    be.cleanup()
    with UpperDir(up).locked():
        pass
    other = layers(stack("L0L1/plain"))
    with pytest.raises(ConfigError, match="was made for image"):
        open_upper(str(up), other)
    ud, cfg = open_upper(str(up), layers())  # the same image: fine
    ud.unlock()
    stack_ = open_config(cfg, readonly=True)
    assert stack_.upper is not None and len(stack_.lowers) == 3
    stack_.close()


def test_config_with_upper_is_served_read_write_and_locked(tmp_path):
    up = tmp_path / "up"
    h = start(*(f"layer={p}" for p in layers()), f"upper={up}")
    be.pwrite(h, memoryview(b"Q" * 4096), 0, 0)
    be.cleanup()
    be.reset()
    h = start(f"config={up / 'config.v1.json'}")
    assert be.can_write(h)
    assert bytes(read_all(h)[:4096]) == b"Q" * 4096
    second = open_config(str(up / "config.v1.json"))
    with pytest.raises(LayerStateError, match="in use"):
        Device(second)
    second.close()


def test_snapshot_cli_lists_and_survives_leftovers_of_a_crashed_snapshot(tmp_path, capsys):
    from obd.cli import main

    up = tmp_path / "up"
    h = start(*(f"layer={p}" for p in layers()), f"upper={up}")
    be.pwrite(h, memoryview(b"S" * 8192), 4096, 0)
    model = read_all(h)
    be.cleanup()
    # a snapshot that died after creating the next RW layer but before switching the config
    (up / "rw" / "2.data").write_bytes(b"junk")
    (up / "layers" / "1.commit").write_bytes(b"junk")
    assert main(["snapshot", str(up), "-m", "one", "-q"]) == 0
    assert main(["snapshot", "--list", str(up)]) == 0
    out = capsys.readouterr().out
    assert "layers/1.commit" in out and "one" in out and "live: generation 2 (append)" in out
    be.reset()
    h = start(f"upper={up}")
    assert read_all(h) == model
    assert main(["snapshot", str(tmp_path)]) == 1
    assert "not an upper directory" in capsys.readouterr().err
    assert not (tmp_path / "lock").exists()


def test_a_read_only_open_never_creates_an_upper_directory(tmp_path):
    missing = tmp_path / "up"
    with pytest.raises(RuntimeError, match="a read-only open creates none"):
        start(*[f"layer={f}" for f in layers()], f"upper={missing}", "readonly=true")
    assert not missing.exists()
    be.reset()
    h = start(*[f"layer={f}" for f in layers()], f"upper={missing}")  # read-write: made on first use
    assert (missing / "config.v1.json").is_file() and be.can_write(h)
