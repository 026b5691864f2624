"""Acceleration layers (docs/formats.md §7.3): a prefetch trace shipped inside an overlaybd image.

``obd trace attach`` pushes an image again with the trace as a tar layer on top; resolving the
image leaves the device unchanged and remembers the layer; the frontends replay it by themselves
on open (here: the device's ``start_prefetch``, which ``obd nbd``, ``mount`` and ``run`` share);
``obd trace replay REF`` without a file uses it; a hostile layer gives a clear error.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from registry_server import RegistryServer

import frontends.nbd.backend as be
from fixtures import data_offsets, materialize
from obd.cli import main
from obd.errors import FormatError, ObdError
from obd.image.accel import META_KEY, trace_from_layer, trace_layer_tar
from obd.image.acceltrace import load_image_trace
from obd.image.device import open_device, start_prefetch
from obd.image.local import open_config, open_layers
from obd.image.remote import RemoteOptions, registry_config
from obd.observability.stats import Stats
from obd.oci.model import ACCELERATION_LAYER
from obd.prefetch.trace import TraceRecorder, encode, load
from obd.registry.client import RegistryClient

pytestmark = pytest.mark.timeout(300)

L012 = [
    "overlaybd/lsmt/commit/L0.lz4.commit",
    "overlaybd/lsmt/commit/L1.zstd.commit",
    "overlaybd/lsmt/commit/L2.lz4-tar.commit",
]
L012_SHA = "7e3ad718b2a31ec2b7b1cfa1bc04a262a16079afda2459ec276efcc8dded970b"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The registry, with the L0-L2 stack pushed as obd/l012:v1, and a trace of 40 random 4 KiB
    reads recorded on the local files (the same coordinates as the registry's blobs)."""
    tmp = tmp_path_factory.mktemp("accel")
    reg = RegistryServer(tmp / "registry", "noauth").start()
    files = [str(materialize(r)) for r in L012]
    assert main(["push", *files, f"{reg.host}/obd/l012:v1", "--insecure-registry", reg.host]) == 0
    stack = open_layers(files)
    workload = data_offsets(stack, 40, seed=7)
    recorder = TraceRecorder(stack)
    for off in workload:
        stack.pread(off, 4096)
    trace = tmp / "boot.trace"
    assert recorder.save(trace) > 0
    stack.close()
    yield reg, trace, workload
    reg.stop()


def remote(reg, tmp_path) -> RemoteOptions:
    return RemoteOptions(insecure=(reg.host,), cache_dir=str(tmp_path / "cache"), stats=Stats())


def test_attach_then_open_replays_the_images_own_trace(image, tmp_path, capsys):
    reg, trace, workload = image
    host = reg.host
    src, dst = f"{host}/obd/l012:v1", f"{host}/obd/l012:accel"
    assert main(["trace", "attach", src, str(trace), dst, "--insecure-registry", host]) == 0
    assert "acceleration layer" in capsys.readouterr().err

    o = remote(reg, tmp_path)
    cfg = registry_config(dst, o)
    plain = registry_config(src, o)
    assert [lo.digest for lo in cfg.lowers] == [lo.digest for lo in plain.lowers]  # the device is the same
    assert cfg.extra["obd"][META_KEY]["size"] > 0 and META_KEY not in plain.extra["obd"]
    assert load_image_trace(cfg, o) == load(trace)

    # the manifest looks like ctr record-trace's: a tar layer on top with the annotations
    client = RegistryClient(insecure=(host,))
    try:
        img = o.runner.run(client.get_image(dst), 60)
    finally:
        o.runner.run(client.aclose(), 10)
    top = img.manifest["layers"][-1]
    assert top["annotations"][ACCELERATION_LAYER] == "yes"
    assert img.config["rootfs"]["diff_ids"][-1] == top["digest"]

    # the nbd backend (shared by obd nbd, mount and run) replays it on open: the workload then
    # reads from the cache without one more request
    be.reset()
    try:
        for key, value in (
            ("image", dst),
            ("insecure-registry", host),
            ("cache-dir", str(tmp_path / "cache-b")),
        ):
            be.config(key, value)
        be.config_complete()
        opts = be._STATE.options
        dev = open_device(opts)
        try:
            thread = start_prefetch(dev, opts)
            assert thread is not None
            thread.join(60)
            before = dev.remote.stats.snapshot()["requests"]
            got = [dev.stack.pread(off, 4096) for off in workload]
            assert dev.remote.stats.snapshot()["requests"] == before
            assert hashlib.sha256(dev.stack.pread(0, dev.stack.size)).hexdigest() == L012_SHA
        finally:
            dev.close()
    finally:
        be.reset()
    local = open_layers([str(materialize(r)) for r in L012])
    try:
        assert got == [local.pread(off, 4096) for off in workload]
    finally:
        local.close()

    # replay without a file uses the image's own trace; an image without one says so
    args = ["--insecure-registry", host, "--cache-dir", str(tmp_path / "cache-c")]
    assert main(["trace", "replay", dst, *args]) == 0
    assert main(["trace", "replay", src, *args]) == 1
    assert "no acceleration layer" in capsys.readouterr().err


def test_attach_replaces_an_old_trace_and_stays_in_the_repository(image, tmp_path, capsys):
    reg, trace, _ = image
    host = reg.host
    insecure = ["--insecure-registry", host]
    assert main(["trace", "attach", f"{host}/obd/l012:v1", str(trace), f"{host}/obd/l012:a1", *insecure]) == 0
    short = tmp_path / "short.trace"
    short.write_bytes(encode(load(trace)[:3]))
    assert main(["trace", "attach", f"{host}/obd/l012:a1", str(short), f"{host}/obd/l012:a2", *insecure]) == 0
    o = remote(reg, tmp_path)
    cfg = registry_config(f"{host}/obd/l012:a2", o)
    assert len(cfg.lowers) == 3 and load_image_trace(cfg, o) == load(trace)[:3]
    stack = open_config(cfg, readonly=True, remote=o)
    try:
        assert hashlib.sha256(stack.pread(0, stack.size)).hexdigest() == L012_SHA
    finally:
        stack.close()
    assert main(["trace", "attach", f"{host}/obd/l012:v1", str(trace), f"{host}/other/x:1", *insecure]) == 1
    assert "another tag of" in capsys.readouterr().err


def test_upper_directories_keep_the_images_trace_through_snapshot_and_fork(image, tmp_path):
    """A writable run over an accelerated image prefetches too, and so do its snapshots and forks."""
    reg, trace, _ = image
    host = reg.host
    insecure = ["--insecure-registry", host]
    dst = f"{host}/obd/l012:up"
    assert main(["trace", "attach", f"{host}/obd/l012:v1", str(trace), dst, *insecure]) == 0
    up, fork = tmp_path / "up", tmp_path / "fork"

    def served(params):
        be.reset()
        try:
            for key, value in params:
                be.config(key, value)
            be.config_complete()
            dev = open_device(be._STATE.options)
            try:
                thread = start_prefetch(dev, be._STATE.options)
                assert thread is not None
                thread.join(60)
                return hashlib.sha256(dev.stack.pread(0, dev.stack.size)).hexdigest()
            finally:
                dev.close()
        finally:
            be.reset()

    common = [("insecure-registry", host), ("cache-dir", str(tmp_path / "cache"))]
    assert served([("image", dst), ("upper", str(up)), *common]) == L012_SHA
    assert main(["snapshot", str(up), "-q"]) == 0
    assert main(["fork", str(up), str(fork)]) == 0
    for directory in (up, fork):
        meta = json.loads((directory / "config.v1.json").read_text())["obd"]
        assert meta[META_KEY]["digest"].startswith("sha256:")
        assert served([("upper", str(directory)), *common]) == L012_SHA


def _tar(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def test_acceleration_layer_blobs_are_validated():
    trace = encode([(0, 0, 4096), (2, 8192, 512)])
    blob = trace_layer_tar(trace)
    assert blob == trace_layer_tar(trace)  # deterministic: one trace, one digest
    assert trace_from_layer(blob) == [(0, 0, 4096), (2, 8192, 512)]
    assert trace_from_layer(_tar("./trace", trace)) == [(0, 0, 4096), (2, 8192, 512)]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode, member.mtime) == ("trace", 0o444, 0)
    cases = {
        "not a tar": b"x" * 700,
        "holds no trace": _tar("other", trace),
        "not a regular file": _tar("trace", b"", tarfile.DIRTYPE),
        "bad magic": _tar("trace", b"\0" * 24),
        "checksum": _tar("trace", trace[:16] + b"\x01\x02\x03\x04" + trace[20:]),
    }
    for what, bad in cases.items():
        with pytest.raises(ObdError, match=what.split()[-1]):
            trace_from_layer(bad, path="layer")
    with pytest.raises(FormatError):
        trace_layer_tar(b"not a trace")
