"""``obd demo``: the built-in default job — open the bundled overlaybd image and prove it byte for byte.

Uses the OCI layout that ships in the repository's ``fixtures/aci-hello-world`` (an overlaybd-converted
hello-world made by containerd/accelerated-container-image): resolves the image, opens its layer (a
tar-wrapped ZFile holding an LSMT layer), exports the merged 64 GiB device as a sparse image, reads
``/hello`` out of the ext4 inside it with ``debugfs``, checks it against ``/hello`` of the plain OCI
image of the same layout, and runs it. Later versions of the demo boot it in a microVM instead.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from obd.errors import ObdError
from obd.export import export_stack
from obd.image.local import open_oci_layout
from obd.image.oci import OCILayout
from obd.progress import human_bytes

DEFAULT_LAYOUT = Path(__file__).resolve().parents[2] / "fixtures" / "aci-hello-world"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="open the bundled overlaybd image, export it, read and run /hello from it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--layout", default=str(DEFAULT_LAYOUT), help="OCI layout to use (default: the bundled one)"
    )
    p.add_argument("--tag", default="amd64-converted", help="overlaybd image tag in the layout")
    p.add_argument("--plain-tag", default="amd64", help="the same image in plain OCI form, to compare with")
    p.add_argument("--keep", metavar="DIR", help="keep the exported disk image in DIR")
    p.set_defaults(func=run)


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def plain_file(layout: OCILayout, tag: str, name: str) -> bytes | None:
    """``name`` from the (gzip) tar layers of a plain OCI image, top layer first."""
    image = layout.resolve(tag)
    for desc in reversed(image.layers):
        with open(layout.blob_path(desc.digest), "rb") as f:
            raw = f.read()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if member.name.lstrip("./") == name.lstrip("/") and member.isfile():
                    return tar.extractfile(member).read()  # type: ignore[union-attr]
    return None


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.layout):
        raise ObdError("bundled OCI layout not found; run from a checkout or pass --layout", path=args.layout)
    layout = OCILayout(args.layout)
    ref = f"oci:{args.layout}:{args.tag}"
    step(f"resolving {ref}")
    image = layout.resolve(args.tag)
    for i, layer in enumerate(image.overlaybd_layers()):
        print(f"    layer {i}: {layer.digest} ({human_bytes(layer.size)}, {layer.media_type})")
    t0 = time.monotonic()
    stack = open_oci_layout(ref)
    for ly in stack.lowers:
        blob = ly.blob  # type: ignore[attr-defined]
        print(
            f"    opened {os.path.basename(ly.name)[:19]}…: {blob.kind}, {len(ly.index)} mappings, "
            f"uuid {ly.uuid}"
        )
    print(f"    virtual disk: {human_bytes(stack.size)} in {(time.monotonic() - t0) * 1000:.1f} ms")
    workdir = args.keep or tempfile.mkdtemp(prefix="obd-demo-")
    os.makedirs(workdir, exist_ok=True)
    disk = os.path.join(workdir, "hello-world.img")
    try:
        step(f"exporting the merged device to {disk} (sparse)")
        t0 = time.monotonic()
        res = export_stack(stack, disk)
        used = os.stat(disk).st_blocks * 512
        print(
            f"    {human_bytes(res.data_bytes)} of data written in {time.monotonic() - t0:.2f} s; "
            f"{human_bytes(res.virtual_size)} apparent, {human_bytes(used)} on disk"
        )
        debugfs = shutil.which("debugfs") or "/sbin/debugfs"
        if not os.path.exists(debugfs):
            raise ObdError(
                "debugfs (Debian package e2fsprogs) is needed to read the ext4 inside; run ./setup.sh"
            )
        step("reading / and /hello from the ext4 filesystem on the disk (debugfs, no mount)")
        ls = subprocess.run([debugfs, "-R", "ls -l /", disk], capture_output=True, text=True, check=True)
        print("\n".join("    " + line for line in ls.stdout.splitlines() if line.strip()))
        hello = os.path.join(workdir, "hello")
        subprocess.run([debugfs, "-R", f"dump /hello {hello}", disk], capture_output=True, check=True)
        ours = Path(hello).read_bytes()
        theirs = plain_file(layout, args.plain_tag, "hello")
        digest = hashlib.sha256(ours).hexdigest()
        print(f"    /hello: {len(ours)} bytes, sha256 {digest}")
        if theirs is not None:
            same = hashlib.sha256(theirs).hexdigest() == digest
            print(f"    plain OCI image {args.plain_tag!r} has the same /hello: {'yes' if same else 'NO'}")
            if not same:
                raise ObdError("/hello differs from the plain image's", path=ref)
        if platform.system() == "Linux" and platform.machine() == "x86_64":
            step("running /hello from the overlaybd image")
            os.chmod(hello, 0o755)
            out = subprocess.run([hello], capture_output=True, text=True, timeout=30)
            print("\n".join("    " + line for line in out.stdout.strip().splitlines()[:4]))
            print("    …")
        step("done: the overlaybd image was read, merged and verified by obd alone")
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
