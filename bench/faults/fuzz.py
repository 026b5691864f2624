"""Hostile inputs: mutations of the real overlaybd-made fixtures fed to obd's parsers.

Targets: LSMT layers (plain, sealed, ZFile-compressed, tar-wrapped), raw ZFiles, overlaybd's tar
envelope, ``config.v1.json`` and OCI manifests/indexes/configs (through an OCI layout, the way
``obd`` reads them). Each case applies one mutation — bit flips, a truncation, an 8/4/2-byte field
overwritten with a boundary value at the places parsers look first (header, trailer, index),
a zeroed sector, or for JSON a value replaced by one of another type or a key deleted — and
reads everything the parser exposes, under a per-case watchdog and an address-space cap.

Wrong bytes are counted where the format promises to detect damage: ZFiles with per-block CRCs
(and LSMT layers inside them) must either fail with an obd error or return the original bytes.
Plain LSMT data and the tar envelope's payload carry no checksum, so for them only the outcome
kind (clear error / no crash / no hang) is judged; a changed byte that reads back changed is
what the format allows.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from faults.tally import Clock, Tally
from fixtures import FIXTURES, materialize
from obd.errors import ObdError
from obd.formats.tar_envelope import open_envelope, unwrap
from obd.image.config import ImageConfig
from obd.io.source import BytesSource, Source
from obd.layer.blob import open_source
from obd.lsmt.sealed import SealedLayer
from obd.lsmt.stack import Stack
from obd.oci.layout import OCILayout
from obd.registry.manifests import select_platform
from obd.zfile import ZFileReader

# (fixture, whether a successful read must return the original bytes)
LSMT = [
    ("overlaybd/lsmt/commit/L1.commit", False),
    ("overlaybd/lsmt/seal/L1.sealed", False),
    ("overlaybd/lsmt/commit/L1.lz4.commit", True),
    ("overlaybd/lsmt/commit/L2.zstd.commit", True),
    ("overlaybd/lsmt/commit/L2.lz4-tar.commit", True),
    ("overlaybd/lsmt/seal/L1.from-sealed.lz4.commit", True),
    ("overlaybd/lsmt/cli-create/empty1g.lz4.commit", True),
]
ZFILES = [
    f"overlaybd/zfile/cli/{name}.{algo}.{bs}.zfile"
    for name in ("text_200k.txt", "odd_100003.bin", "tiny_1.bin", "zeros_1m.bin")
    for algo in ("lz4", "zstd")
    for bs in ("bs4", "bs64")
]
ENVELOPES = [
    "overlaybd/zfile/cli/odd_100003.bin.lz4.bs4.zfile.tar",
    "overlaybd/lsmt/commit/L2.lz4-tar.commit",
]
CONFIGS = [f"overlaybd/cfg/{n}" for n in ("lsmt-stack-lz4.json", "lsmt-stack-mixed.json", "service.json")]
ACI = FIXTURES / "aci-hello-world"
BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]
JSON_VALUES: list[Any] = [
    None,
    -1,
    0,
    2**63,
    2**64 + 1,
    1.5,
    True,
    "",
    "x" * 300,
    [],
    {},
    "sha256:" + "0" * 64,
]
AS_LIMIT = 8 << 30  # a parser that believes a hostile size and allocates it fails here, as a crash


def mutate_bytes(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of ``raw``; returns its description and the mutated bytes."""
    if not raw:
        return "extend", b"\0" * rng.choice([1, 512, 4096])
    kind = rng.choice(["flip", "flip", "truncate", "field", "field", "zero"])
    b = bytearray(raw)
    n = len(b)
    # where parsers look first: the start (headers), the end (trailers), the index just before them
    anchors = [0, 512, 1024, 1536, max(0, n - 4096), max(0, n - 1024), max(0, n - 512)]
    if kind == "flip":
        where = []
        for _ in range(rng.randint(1, 8)):
            pos = (
                rng.randrange(n)
                if rng.random() < 0.5
                else min(n - 1, rng.choice(anchors) + rng.randrange(512))
            )
            b[pos] ^= 1 << rng.randrange(8)
            where.append(pos)
        return f"flip@{where}", bytes(b)
    if kind == "truncate":
        cut = rng.randrange(n) if rng.random() < 0.5 else max(0, n - rng.randrange(1, 1536))
        return f"truncate@{cut}", bytes(b[:cut])
    if kind == "zero":
        pos = min(rng.choice(anchors), max(0, n - 512))
        b[pos : pos + 512] = bytes(len(b[pos : pos + 512]))
        return f"zero-sector@{pos}", bytes(b)
    width = rng.choice([8, 4, 2])
    value = rng.choice(BOUNDARY) & ((1 << (8 * width)) - 1)
    pos = min(rng.choice(anchors) + rng.randrange(0, 512, width), max(0, n - width))
    b[pos : pos + width] = value.to_bytes(width, "little")[: n - pos]
    return f"field{width}@{pos}={value:#x}", bytes(b)


def mutate_json(obj: Any, rng: random.Random) -> tuple[str, Any]:
    """Replace one value somewhere in ``obj`` by one of another type, or delete a key."""
    obj = copy.deepcopy(obj)
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            paths.append((node, k))
            walk(v)

    walk(obj)
    if not paths:
        return "replace-root", rng.choice(JSON_VALUES)
    parent, key = rng.choice(paths)
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[key]
        return f"delete {key!r}", obj
    value = rng.choice(JSON_VALUES)
    parent[key] = value
    return f"set {key!r}={str(value)[:20]!r}", obj


def mutate_text(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A JSON document mutated structurally (half the time) or byte-wise."""
    if rng.random() < 0.5:
        with contextlib.suppress(ValueError):
            what, obj = mutate_json(json.loads(raw), rng)
            return what, json.dumps(obj).encode()
    return mutate_bytes(raw, rng)


# -- readers: everything a parser exposes, as one comparable value -------------------------------------


def read_lsmt(raw: bytes) -> str:
    """Digest of the device a layer blob holds: size, extent map and every data byte."""
    return read_source(BytesSource(raw, "fuzzed"))


def read_source(source: Source) -> str:
    """:func:`read_lsmt` of a blob behind any source (a registry blob, say)."""
    blob = open_source(source)
    if "lsmt" not in blob.kinds:
        raise ObdError("not a layer", path=source.name)
    stack = Stack([SealedLayer(blob.source)])
    h = hashlib.sha256(str(stack.size).encode())
    for e in stack.extents():
        h.update(f"{e.offset}:{e.length}:{e.kind}".encode())
        if e.kind == "data":
            h.update(stack.pread(e.offset, e.length))
    return h.hexdigest()


def read_zfile(raw: bytes) -> str:
    z = ZFileReader(unwrap(BytesSource(raw, "fuzzed")))
    return hashlib.sha256(z.pread(0, z.size)).hexdigest() + f":{z.size}"


def read_envelope(raw: bytes) -> tuple[int, int]:
    env = open_envelope(BytesSource(raw, "fuzzed"))
    payload = env.payload
    payload.pread(0, min(payload.size, 4096))
    return payload.size, env.end_offset


class LayoutCase:
    """A private copy of the aci-hello-world OCI layout (JSON blobs only) to plant mutations in."""

    TAGS = ("amd64-converted", "docker-list", "amd64")

    def __init__(self, root: Path):
        self.root = root
        shutil.copytree(ACI, root, ignore=lambda d, names: [n for n in names if self._big(Path(d) / n)])
        self.index = json.loads((root / "index.json").read_text())
        self.json_blobs = sorted(p.name for p in (root / "blobs" / "sha256").iterdir())

    @staticmethod
    def _big(path: Path) -> bool:
        return path.is_file() and path.stat().st_size > 64 << 10

    def blob(self, hexd: str) -> Path:
        return self.root / "blobs" / "sha256" / hexd

    def read_all(self) -> list[Any]:
        layout = OCILayout(self.root)
        out: list[Any] = []
        for tag in self.TAGS:
            try:
                image = layout.resolve(tag, platform="linux/amd64")
            except ObdError as e:
                out.append(type(e).__name__)
                continue
            out.append((image.manifest_digest, len(image.layers)))
            with contextlib.suppress(ObdError):
                out.append(len(image.overlaybd_layers()))
        return out

    def plant(self, rng: random.Random) -> tuple[str, Callable[[], None]]:
        """Mutate index.json or one JSON blob (re-digested so the parser, not the digest check, meets
        the damage); returns a description and the function that undoes it."""
        pick_index = rng.random() < 0.3
        target = self.root / "index.json" if pick_index else self.blob(rng.choice(self.json_blobs))
        original = target.read_bytes()
        what, bad = mutate_text(original, rng)
        if target.name == "index.json":
            target.write_bytes(bad)
            return f"index.json {what}", lambda: target.write_bytes(original)
        new_hex = hashlib.sha256(bad).hexdigest()
        self.blob(new_hex).write_bytes(bad)
        text = (self.root / "index.json").read_bytes()
        old_refs = {
            p: p.read_bytes() for p in (self.root / "blobs" / "sha256").iterdir() if p.stat().st_size < 8192
        }
        for p, data in old_refs.items():  # point manifests and the index at the mutated blob
            if target.name.encode() in data and p.name != new_hex:
                p.write_bytes(data.replace(target.name.encode(), new_hex.encode()))
        (self.root / "index.json").write_bytes(text.replace(target.name.encode(), new_hex.encode()))

        def undo() -> None:
            (self.root / "index.json").write_bytes(text)
            for p, data in old_refs.items():
                p.write_bytes(data)
            if new_hex != target.name:
                self.blob(new_hex).unlink(missing_ok=True)

        return f"{target.name[:12]} {what}", undo


@contextlib.contextmanager
def address_space_cap(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run(cases: int, seconds: float, seed: int = 13, case_timeout: float = 10.0) -> list[Tally]:
    """About ``cases`` mutations spread over the targets (fewer if ``seconds`` run out); one tally per
    target family."""
    clock = Clock(seconds)
    rng = random.Random(seed)
    families: list[tuple[str, list[tuple[str, bytes, Any, Callable[[bytes], Any]]]]] = []
    lsmt = []
    for rel, checked in LSMT:
        raw = materialize(rel).read_bytes()
        lsmt.append((rel, raw, read_lsmt(raw) if checked else None, read_lsmt))
    families.append(("fuzz: LSMT layers", lsmt))
    zf = [(rel, (raw := materialize(rel).read_bytes()), read_zfile(raw), read_zfile) for rel in ZFILES]
    families.append(("fuzz: ZFile", zf))
    families.append(
        ("fuzz: tar envelope", [(r, materialize(r).read_bytes(), None, read_envelope) for r in ENVELOPES])
    )

    def read_config(raw: bytes, path: Path) -> Any:
        path.write_bytes(raw)
        cfg = ImageConfig.load(path)
        return [(lo.file, lo.digest, lo.size) for lo in cfg.lowers], cfg.upper.enabled, cfg.to_json()

    tallies = []
    with tempfile.TemporaryDirectory(prefix="obd-fuzz-") as tmp, address_space_cap(AS_LIMIT):
        cfg_path = Path(tmp) / "config.v1.json"
        cfgs = [
            (r, materialize(r).read_bytes(), None, lambda raw: read_config(raw, cfg_path)) for r in CONFIGS
        ]
        families.append(("fuzz: config.v1.json", cfgs))
        per_family = max(1, cases // (len(families) + 1))
        for name, targets in families:
            t = Tally(name)
            started = clock.left()
            for i in range(per_family):
                if clock.left() <= 0:
                    t.notes.append(f"stopped by the time budget after {i} cases")
                    break
                rel, raw, want, read = targets[i % len(targets)]
                mutator = mutate_text if rel.endswith(".json") else mutate_bytes
                what, bad = mutator(raw, rng)
                t.trial(
                    lambda read=read, bad=bad: read(bad), want, timeout=case_timeout, label=f"{rel} {what}"
                )
            t.seconds = started - clock.left()
            tallies.append(t)
        t = Tally("fuzz: OCI manifests")
        started = clock.left()
        case = LayoutCase(Path(tmp) / "layout")
        want_index = json.loads((ACI / "index.json").read_text())
        for i in range(per_family):
            if clock.left() <= 0:
                t.notes.append(f"stopped by the time budget after {i} cases")
                break
            if i % 4 == 3:  # a manifest list on its own, as a registry would answer it
                what, idx = mutate_json(want_index, rng)
                t.trial(
                    lambda idx=idx: select_platform(idx, "linux/amd64", "fuzzed").digest,
                    None,
                    timeout=case_timeout,
                    label=f"index {what}",
                )
                continue
            what, undo = case.plant(rng)
            try:
                t.trial(case.read_all, None, timeout=case_timeout, label=what)
            finally:
                undo()
        t.seconds = started - clock.left()
        tallies.append(t)
    return tallies
