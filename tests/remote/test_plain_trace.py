"""Prefetch traces of plain OCI images (docs/formats.md §6.5): the target blobs are recorded too.

A plain image read lazily is a stack of turboOCI-style meta layers (small, built once and cached
locally) whose file data lives in the original layer blobs in the registry, each a warp layer's
*target*. A trace that recorded only each layer's own blob would name the local meta layers and
replay nothing the network has to deliver; obd records the target reads as file 1 of their layer.
The image is the three-layer one of test_plain_images.py in a real docker-registry; what crossed
the wire is read from the registry client's own counters (:class:`~obd.observability.stats.Stats`).
"""

from __future__ import annotations

import shutil

import pytest
from registry_server import RegistryServer
from test_plain_images import _layers, _push_plain, _zstd_layers

from fixtures import require_tool
from obd.cli import main
from obd.image.device import DeviceOptions, open_device, start_prefetch
from obd.image.local import open_config
from obd.image.remote import RemoteOptions, registry_config
from obd.observability.stats import Stats
from obd.prefetch.trace import TARGET_FILE, decode, encode, layer_key, load, replay, split_key
from obd.turbo.remote import meta_root

pytestmark = pytest.mark.timeout(300)

IMAGE = "plain/multi:v1"
ZSTD_IMAGE = "plain/zstd:v1"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tool("debugfs")
    reg = RegistryServer(tmp_path_factory.mktemp("registry"), "noauth").start()
    reg.layers, _tree = _layers()
    _push_plain(reg.host, tmp_path_factory.mktemp("layout") / "multi", reg.layers)
    _push_plain(reg.host, tmp_path_factory.mktemp("layout") / "zstd", _zstd_layers(reg.layers), ZSTD_IMAGE)
    yield reg
    reg.stop()


def _options(registry, cache, **kw) -> RemoteOptions:
    # readahead off: what is fetched is what the trace names, not what a readahead adds
    return RemoteOptions(insecure=(registry.host,), cache_dir=str(cache), readahead=0, stats=Stats(), **kw)


def _cold_cache(warm, cold) -> None:
    """A block cache with nothing in it, beside the meta layers ``warm`` already built."""
    shutil.copytree(meta_root(warm), meta_root(cold))


def _big_file_blocks(stack) -> tuple[int, list[int]]:
    """The top layer's position and device offsets of blocks of its largest file (in a gzip blob)."""
    top = stack.lowers[-1]
    offset, length, _m, _z, _t = max((m for m in top.index if m[4] == 1), key=lambda m: m[1])
    start, end = offset * 512, (offset + length) * 512
    return len(stack.lowers) - 1, list(range(-(-start // 4096) * 4096, end - 4096, 300_000))


def _one_target_read(registry, ref: str, cache) -> tuple[int, list[int], int, bytes]:
    """Read one block of the top layer's largest file into ``cache``: the layer's position, the
    file's block offsets, the target offset of ``blocks[1]`` and its bytes."""
    o = _options(registry, cache)
    stack = open_config(registry_config(ref, o), readonly=True, remote=o)
    try:
        top, blocks = _big_file_blocks(stack)
        m = max((m for m in stack.lowers[-1].index if m[4] == 1), key=lambda m: m[1])
        return top, blocks, m[2] * 512 + (blocks[1] - m[0] * 512), stack.pread(blocks[1], 4096)
    finally:
        stack.close()


def test_layer_key_keeps_old_records_and_marks_targets():
    """File 0 is the layer index overlaybd writes; a target record round-trips through the format."""
    assert layer_key(3) == 3 and split_key(3) == (3, 0)
    key = layer_key(3, TARGET_FILE)
    assert split_key(key) == (3, TARGET_FILE) and key != 3
    records = [(2, 4096, 512), (key, 1 << 40, 4096)]
    assert decode(encode(records)) == records


def test_plain_image_trace_records_and_replays_the_target_blobs(registry, tmp_path):
    """Recorded through obd's device (record-trace=), a plain image's trace names ranges of the
    original layer blobs; a cold device given the trace (trace=) fetches them from the registry in
    the background, and the reads that follow find them in the block cache."""
    ref = f"{registry.host}/{IMAGE}"
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    trace = tmp_path / "plain.trace"
    rec = DeviceOptions(image=[ref], record_trace=str(trace), readonly=True)
    dev = open_device(rec, remote=_options(registry, warm))
    try:
        top, blocks = _big_file_blocks(dev.stack)
        assert len(blocks) >= 3
        want = [dev.stack.pread(off, 4096) for off in blocks]
        dev.stack.pread(1024, 1024)  # the superblock: a meta-layer (file 0) read
    finally:
        dev.close()  # saves the trace
    records = load(trace)
    targets = [r for r in records if split_key(r[0]) == (top, TARGET_FILE)]
    assert len(targets) >= len(blocks)
    assert any(split_key(r[0])[1] == 0 for r in records)

    _cold_cache(warm, cold)
    o = _options(registry, cold)
    play = DeviceOptions(image=[ref], trace=str(trace), readonly=True)
    dev = open_device(play, remote=o)
    try:
        opened = o.stats["bytes_fetched"]
        thread = start_prefetch(dev, play)
        assert thread is not None
        thread.join(120)
        assert not thread.is_alive()
        fetched = o.stats["bytes_fetched"] - opened
        assert fetched > 0  # the replay went to the registry: the target blob's ranges
        requests = o.stats["requests"]
        assert [dev.stack.pread(off, 4096) for off in blocks] == want
        assert o.stats["requests"] == requests  # fetched before they were asked for
    finally:
        dev.close()


def test_target_records_replay_through_the_target_source(registry, tmp_path):
    """A target record is replayed from the warp layer's target, as the compressed bytes of the gzip
    blob from the seek point before it (not the whole blob): the read that follows, which inflates
    from that seek point, finds them all in the block cache."""
    ref = f"{registry.host}/{IMAGE}"
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    top, blocks, target_off, want = _one_target_read(registry, ref, warm)
    _cold_cache(warm, cold)
    o = _options(registry, cold)
    stack = open_config(registry_config(ref, o), readonly=True, remote=o)
    try:
        before = o.stats["bytes_fetched"]
        # the same range named as the layer's own blob: the local meta layer, nothing to fetch
        replay(stack, [(layer_key(top), target_off, 4096)])
        assert o.stats["bytes_fetched"] == before
        res = replay(stack, [(layer_key(top, TARGET_FILE), target_off, 4096)])
        # read as the compressed bytes from the seek point before it: one range of the gzip blob
        blob_size = len(registry.layers[2][0])
        assert res.ranges == 1 and 0 < res.bytes < blob_size * 0.9
        assert 0 < o.stats["bytes_fetched"] - before < blob_size * 0.9
        requests = o.stats["requests"]
        assert stack.pread(blocks[1], 4096) == want
        assert o.stats["requests"] == requests
    finally:
        stack.close()


def test_zstd_target_records_replay_as_whole_frames(registry, tmp_path):
    """In a many-frame zstd layer a target record is replayed as the frames holding it: a part of
    the blob, and the read that follows decodes them from the block cache."""
    ref = f"{registry.host}/{ZSTD_IMAGE}"
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    o = _options(registry, warm)
    stack = open_config(registry_config(ref, o), readonly=True, remote=o)
    try:
        bottom = stack.lowers[1]  # layer 1 of the image: 256 KiB frames
        offset, length, moffset, _z, _t = max((m for m in bottom.index if m[4] == 1), key=lambda m: m[1])
        pos = (offset + length // 2) * 512 // 4096 * 4096
        target_off = moffset * 512 + (pos - offset * 512)
        want = stack.pread(pos, 4096)
    finally:
        stack.close()
    _cold_cache(warm, cold)
    o = _options(registry, cold)
    stack = open_config(registry_config(ref, o), readonly=True, remote=o)
    try:
        before = o.stats["bytes_fetched"]
        res = replay(stack, [(layer_key(1, TARGET_FILE), target_off, 4096)])
        blob_size = len(_zstd_layers(registry.layers)[0][0])
        assert res.ranges == 1 and 0 < res.bytes <= 2 * (256 << 10)
        assert 0 < o.stats["bytes_fetched"] - before < blob_size / 2
        requests = o.stats["requests"]
        assert stack.pread(pos, 4096) == want
        assert o.stats["requests"] == requests
    finally:
        stack.close()


def test_a_gzip_index_read_by_ranges_has_its_windows_replayed(registry, tmp_path):
    """With the index artifact's own parts (gzip.meta read by ranges, tests/remote/test_plain_images.py),
    a target record is replayed as the gzip bytes *and* the seek point's window: the read that
    follows needs neither from the registry."""
    host = registry.host
    args = ["--insecure-registry", host, "--cache-dir", str(tmp_path / "a"), "--quiet"]
    assert main(["index", f"{host}/{IMAGE}", "--link", "v1-parts", *args]) == 0
    ref = f"{host}/plain/multi:v1-parts"
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    top, blocks, target_off, want = _one_target_read(registry, ref, warm)
    _cold_cache(warm, cold)
    shutil.copytree(warm / "verify", cold / "verify")  # the gzip index's digest table
    o = _options(registry, cold)
    stack = open_config(registry_config(ref, o), readonly=True, remote=o)
    try:
        assert not list(meta_root(cold).glob("*/gzip.meta"))
        res = replay(stack, [(layer_key(top, TARGET_FILE), target_off, 4096)])
        assert res.ranges == 2  # the gzip blob's range and the window's
        requests = o.stats["requests"]
        assert stack.pread(blocks[1], 4096) == want
        assert o.stats["requests"] == requests
    finally:
        stack.close()
