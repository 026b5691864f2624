"""Hostile input: random corruption and truncation of real fixtures only ever raises an obd error.

Never another exception type, never a hang (hypothesis deadline), never an allocation above 64 MiB,
and — where the format carries checksums (ZFile with per-block CRCs and a header digest) — never
silently wrong bytes: a read that succeeds returns the original device.
"""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import materialize
from obd.errors import ObdError
from obd.io.source import BytesSource
from obd.layer.blob import open_source
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack

BLOBS = {
    # name: (fixture, checksummed: a successful read must return the original device)
    "plain": ("overlaybd/lsmt/commit/L1.commit", False),
    "sealed": ("overlaybd/lsmt/seal/L1.sealed", False),
    "lz4": ("overlaybd/lsmt/commit/L1.lz4.commit", True),
    "zstd": ("overlaybd/lsmt/commit/L2.zstd.commit", True),
    "tar-lz4": ("overlaybd/lsmt/commit/L2.lz4-tar.commit", True),
    "from-sealed-lz4": ("overlaybd/lsmt/seal/L1.from-sealed.lz4.commit", True),
    "empty-lz4": ("overlaybd/lsmt/cli-create/empty1g.lz4.commit", True),
}
LIMIT = 64 << 20


def read_device(raw: bytes) -> str:
    """Digest of the device: its size and every data extent's bytes (zero/hole runs need no reading,
    and a corrupt header may claim an enormous virtual size)."""
    blob = open_source(BytesSource(raw, "fuzzed"))
    if "lsmt" not in blob.kinds:
        raise ObdError("not a layer")  # what open_layer says, without the file
    stack = Stack([SealedLayer(blob.source)])
    h = hashlib.sha256(str(stack.size).encode())
    for e in stack.extents():
        h.update(f"{e.offset}:{e.length}:{e.kind}".encode())
        if e.kind == "data":
            h.update(stack.pread(e.offset, e.length))
    return h.hexdigest()


ORIGINAL = {}


def original(name: str) -> tuple[bytes, str]:
    if name not in ORIGINAL:
        raw = materialize(BLOBS[name][0]).read_bytes()
        ORIGINAL[name] = (raw, read_device(raw))
    return ORIGINAL[name]


mutation = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 10**9)),
    st.tuples(
        st.just("field"),
        st.tuples(st.integers(0, 10**9), st.sampled_from([0, 1, 0xFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1])),
    ),
)


def mutate(raw: bytes, m) -> bytes:
    kind, arg = m
    if kind == "truncate":
        return raw[: arg % (len(raw) + 1)]
    b = bytearray(raw)
    if kind == "flip":
        for pos, x in arg:
            b[pos % len(b)] ^= x
        return bytes(b)
    pos, value = arg
    # overwrite an 8-byte field inside one of the records where the parsers look first
    anchors = [0, len(b) - 4096, len(b) - 512, 1536, 1536 + 512 - 512]
    base = anchors[pos % len(anchors)] + (pos // len(anchors)) % 120 * 8 % 512
    base = max(0, min(base, len(b) - 8))
    b[base : base + 8] = (value & (2**64 - 1)).to_bytes(8, "little")
    return bytes(b)


@pytest.mark.parametrize("name", sorted(BLOBS))
@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(m=mutation)
def test_corrupt_blob_raises_only_obd_errors(name, m):
    raw, want = original(name)
    bad = mutate(raw, m)
    tracemalloc.start()
    try:
        got = read_device(bad)
    except ObdError:
        got = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < LIMIT, f"peak allocation {peak} bytes"
    if got is not None and BLOBS[name][1]:
        assert got == want, "a checksummed blob read back different bytes without an error"
