"""Hostile tar layers given to ``obd convert``: the conversion refuses them or contains them, and the
host file system is never touched.

Each case is a one-layer OCI image whose layer tar tries to reach outside the image: ``..`` paths,
absolute paths, symlinks to the outside followed by a write through them, hard links to outside
files, device nodes, a header claiming a huge size, a gzip bomb (a small layer that inflates far
past the device). ``obd convert`` runs as a user runs it, a subprocess with its scratch directory
beside a *canary* directory; afterwards the canary must be byte-for-byte as it was and no file
named by the layer may exist on the host. Outcomes: exit 0 with the host untouched is *correct*
(the entry was stored inside the image, as device nodes and outward symlinks legitimately are),
exit 1 with an ``obd: error:`` line is a *clear error*, a touched host counts as *wrong bytes*.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

from faults.tally import Clock, Tally
from fixtures import REPO, cache_dir
from obd.io.publish import publish_bytes

GIB = 1 << 30


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = kw.pop("mode", 0o755 if kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            if ti.type == tarfile.REGTYPE:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return buf.getvalue()


def huge_header_tar() -> bytes:
    """A file entry claiming 1 TiB (base-256 size field) followed by nothing."""
    ti = _info("big")
    ti.size = 1 << 40
    block = ti.tobuf(format=tarfile.GNU_FORMAT)
    return block + bytes(1024)


def gzip_bomb(inflated: int) -> tuple[bytes, str]:
    """A gzip layer whose tar holds one file of ``inflated`` zero bytes; returns it and its diff_id.

    Compressing gigabytes takes seconds, so the result is kept in the fixture cache directory."""
    cached = cache_dir() / "reliability" / f"gzip-bomb-{inflated}.tar.gz"
    if cached.with_suffix(".diffid").is_file():
        return cached.read_bytes(), cached.with_suffix(".diffid").read_text()
    ti = _info("bomb")
    ti.size = inflated
    header = ti.tobuf(format=tarfile.PAX_FORMAT)
    tail = bytes(-inflated % 512) + bytes(1024)
    h = hashlib.sha256(header)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [comp.compress(header)]
    chunk = bytes(8 << 20)
    left = inflated
    while left:
        piece = chunk[: min(left, len(chunk))]
        h.update(piece)
        out.append(comp.compress(piece))
        left -= len(piece)
    h.update(tail)
    out.append(comp.compress(tail))
    out.append(comp.flush())
    bomb, diff_id = b"".join(out), "sha256:" + h.hexdigest()
    cached.parent.mkdir(parents=True, exist_ok=True)
    publish_bytes(cached, bomb)
    publish_bytes(cached.with_suffix(".diffid"), diff_id.encode())
    return bomb, diff_id


def cases(canary: Path) -> list[tuple[str, bytes, str | None]]:
    """(name, gzip layer, diff_id or None to compute) of every hostile layer."""
    up = "../" * 12
    rel = f"{up}{str(canary).lstrip('/')}"
    plain = [
        ("path traversal", [(_info(f"{rel}/pwned-dotdot"), b"owned\n")]),
        ("absolute path", [(_info(f"{canary}/pwned-abs"), b"owned\n")]),
        (
            "symlink escape, absolute",
            [
                (_info("esc", tarfile.SYMTYPE, linkname=str(canary)), b""),
                (_info("esc/pwned-sym"), b"owned\n"),
            ],
        ),
        (
            "symlink escape, relative",
            [(_info("up", tarfile.SYMTYPE, linkname=rel), b""), (_info("up/pwned-rel"), b"owned\n")],
        ),
        ("hard link outside", [(_info("h", tarfile.LNKTYPE, linkname=f"{canary}/keep"), b"")]),
        ("hard link via ..", [(_info("h", tarfile.LNKTYPE, linkname=f"{rel}/keep"), b"")]),
        (
            "device nodes",
            [
                (_info("dev", tarfile.DIRTYPE), b""),
                (_info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b""),
                (_info("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), b""),
                (_info("dev/fifo", tarfile.FIFOTYPE), b""),
                (_info("outward", tarfile.SYMTYPE, linkname="/etc/shadow"), b""),
            ],
        ),
    ]
    out: list[tuple[str, bytes, str | None]] = [(n, gzip.compress(make_tar(e)), None) for n, e in plain]
    out.append(("huge size field", gzip.compress(huge_header_tar()), None))
    bomb, diff_id = gzip_bomb(3 * GIB)
    out.append((f"gzip bomb ({len(bomb) >> 10} KiB → 3 GiB)", bomb, diff_id))
    return out


def write_layout(root: Path, layer: bytes, diff_id: str | None) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    if diff_id is None:
        diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put(json.dumps(config).encode()),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(layer)}],
    }
    entry = {"mediaType": manifest["mediaType"], **put(json.dumps(manifest).encode())}
    entry["annotations"] = {"org.opencontainers.image.ref.name": "1"}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its type and content digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


def run(passes: int, seconds: float) -> Tally:
    t = Tally("hostile tar → obd convert")
    with tempfile.TemporaryDirectory(prefix="obd-hostile-") as tmp:
        base = Path(tmp)
        canary = base / "canary"
        canary.mkdir()
        (canary / "keep").write_text("canary\n")
        before = snapshot(canary)
        sandbox = base / "sandbox" / "a" / "b" / "c"
        all_cases = cases(canary)
        clock = Clock(seconds)
        for p in range(passes):
            for i, (name, layer, diff_id) in enumerate(all_cases):
                if clock.left() <= 0:
                    t.notes.append(f"stopped by the time budget in pass {p + 1} at case {i}")
                    return t
                work = sandbox / f"case{p}-{i}"
                work.mkdir(parents=True)
                write_layout(work / "src", layer, diff_id)
                cmd = [sys.executable, "-m", "obd", "convert", "-q", "--mkfs", "--vsize", "2"]
                cmd += [
                    "--no-convert-cache",
                    "--workdir",
                    str(work / "scratch"),
                    "--cache-dir",
                    str(work / "cache"),
                ]
                cmd += [f"oci:{work / 'src'}:1", f"oci:{work / 'dst'}:1"]
                (work / "scratch").mkdir()
                env = dict(os.environ, PYTHONPATH=str(REPO))
                try:
                    proc = subprocess.run(
                        cmd, cwd=work / "scratch", capture_output=True, text=True, timeout=120, env=env
                    )
                except subprocess.TimeoutExpired:
                    t.add("hang", name)
                    continue
                touched = snapshot(canary) != before or any(
                    Path(x).exists() for x in ("/pwned-dotdot", "/pwned-abs", "/pwned-rel")
                )
                if touched:
                    t.add("wrong bytes", f"{name}: the canary directory changed")
                elif proc.returncode == 0:
                    t.add("correct")
                elif (
                    proc.returncode == 1
                    and proc.stderr.startswith("obd: error:")
                    and "Traceback" not in proc.stderr
                ):
                    t.add("clear error")
                else:
                    t.add("crash", f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
                shutil.rmtree(work, ignore_errors=True)
    return t
