"""``obd demo``: the built-in default job — cold-start python in a microVM from a lazily read image.

1. A quick check of the engine against real overlaybd output: the OCI layout bundled in
   ``fixtures/aci-hello-world`` (a hello-world converted by containerd/accelerated-container-image)
   is resolved, its layer (tar envelope → ZFile → LSMT) opened, the 64 GiB device exported sparse,
   ``/hello`` read out of its ext4 with ``debugfs`` and compared with the plain image's.
2. A python image is made locally — no internet needed besides the apt mirror: ``debootstrap
   --variant=minbase --include=python3-minimal bookworm`` from the mirror apt is configured with,
   then ``mke2fs -d`` and obd's own conversion into an overlaybd layer (zstd ZFile, tar envelope).
3. A private registry (Debian's ``docker-registry``) is started on 127.0.0.1 and the image pushed.
4. ``python3 -c 'print("hello world!")'`` runs in a fresh microVM (QEMU ``-M microvm``; KVM when it
   works, else TCG) whose root disk is that image, read lazily from the registry with a cold block
   cache; the cold-start time and the bytes fetched are printed. That run records a prefetch
   trace, which is then attached to the image as an overlaybd acceleration layer (``obd trace
   attach``), and the new image runs again from a cold cache: obd replays its trace by itself.

Everything built is cached — the root file system, layer and registry storage under --cache-dir,
the VM kernel and initramfs in ~/.cache/obd/vm — so a second run takes seconds; every process and
socket is cleaned up on exit or Ctrl-C.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from obd.errors import ObdError
from obd.image.resolve import open_oci_layout
from obd.layer.export import export_stack
from obd.observability.progress import human_bytes
from obd.observability.stats import Stats
from obd.oci.layout import OCILayout

DEFAULT_LAYOUT = Path(__file__).resolve().parents[2] / "fixtures" / "aci-hello-world"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the built-in default job: build a python image, push it, cold-start it in a microVM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--layout", default=str(DEFAULT_LAYOUT), help="OCI layout to use (default: the bundled one)"
    )
    p.add_argument("--tag", default="amd64-converted", help="overlaybd image tag in the layout")
    p.add_argument("--plain-tag", default="amd64", help="the same image in plain OCI form, to compare with")
    p.add_argument("--keep", metavar="DIR", help="keep the exported disk image in DIR")
    p.add_argument("--fixture-only", action="store_true", help="only step 1 (no image build, no VM)")
    p.add_argument("--skip-fixture", action="store_true", help="skip step 1")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the built root file system, layer and registry storage are kept "
        "(default: $OBD_CACHE_DIR/images, else ~/.cache/obd/images)",
    )
    p.add_argument("--mirror", metavar="URL", help="Debian mirror for debootstrap (default: apt's)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="QEMU accelerator")
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
    if not args.skip_fixture:
        fixture_check(args)
    if not args.fixture_only:
        python_demo(args)
    return 0


def fixture_check(args: argparse.Namespace) -> None:
    """Step 1: the bundled overlaybd image, read and verified byte for byte."""
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
            f"uuid {ly.uuid}"  # type: ignore[attr-defined]
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


def python_demo(args: argparse.Namespace) -> None:
    """Steps 2–4: build and convert a python image, push it to a private registry, cold-start it."""
    # The run frontend and the registry client load only when the demo runs: every obd command
    # imports this module to list its options.
    from frontends.run.images import (
        cached_layer,
        debian_python_rootfs,
        default_cache_dir,
        push_image,
        python_config,
    )
    from frontends.run.launcher import RunOptions, run_image
    from frontends.run.registry import LocalRegistry
    from frontends.run.vm import ensure_assets, write_stdout
    from obd.image.remote import RemoteOptions

    def say(msg: str) -> None:
        print(f"    {msg}", flush=True)

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    step("building a python image: debootstrap minbase + python3-minimal (cached after the first time)")
    t0 = time.monotonic()
    root = debian_python_rootfs(cache, mirror=args.mirror, progress=say)
    layer = cached_layer(root, cache, "debian-python", progress=say)
    print(
        f"    root file system {root}\n    overlaybd layer {layer} ({human_bytes(layer.stat().st_size)}; "
        f"ext4 → LSMT, zstd ZFile, tar envelope) in {time.monotonic() - t0:.1f} s"
    )
    step("preparing the microVM kernel and initramfs (cached)")
    ensure_assets(progress=say)
    with tempfile.TemporaryDirectory(prefix="obd-demo-") as tmp, LocalRegistry(cache / "registry") as reg:
        ref = f"{reg.host}/demo/python:3"
        step(f"pushing the image to a private registry at {reg.url}")
        digest = push_image([layer], ref, config=python_config(), insecure=True)
        print(f"    {ref}@{digest}")
        argv = ["python3", "-c", 'print("hello world!")']
        trace = os.path.join(tmp, "boot.trace")
        accel_ref = f"{reg.host}/demo/python:3-accel"
        results: list[float] = []
        runs: tuple[tuple[str, str, dict[str, Any]], ...] = (
            ("lazily, cold cache; recording a prefetch trace", ref, {"record_trace": trace}),
            ("the same image with that trace attached as its acceleration layer, cold cache", accel_ref, {}),
        )
        for label, image, extra in runs:
            if image == accel_ref:
                step(f"obd trace attach {ref} boot.trace {accel_ref}")
                _attach(ref, trace, accel_ref)
            step(f"obd run {image} -- python3 -c 'print(\"hello world!\")'   ({label})")
            cache_dir = os.path.join(tmp, f"cache-{len(results)}")
            remote = RemoteOptions(insecure=True, cache_dir=cache_dir, stats=Stats())
            res = run_image(
                image,
                argv,
                RunOptions(remote=remote, accel=args.accel, on_output=_indented(write_stdout), **extra),
            )
            if res.exit_code != 0:
                raise ObdError(f"python3 exited with {res.exit_code} in the VM", path=image)
            t = res.timings
            s = res.stats
            print(
                f"    cold start: {t.get('first_output', t['exit']):.2f} s to the first output "
                f"({res.accel.upper()} VM; resolve {t['resolve']:.2f} s, disk served {t['server']:.2f} s); "
                f"exit {t['exit']:.2f} s"
            )
            resolved = res.resolve_stats.get("requests", 0)
            print(
                f"    fetched {human_bytes(s.get('bytes_fetched', 0))} of the "
                f"{human_bytes(layer.stat().st_size)} layer in {s.get('requests', 0)} requests "
                f"(+{resolved} for the manifest and config)"
            )
            results.append(t.get("first_output", t["exit"]))
    step(
        f"done: python started in a microVM from a registry image in {results[0]:.2f} s lazily, "
        f"{results[1]:.2f} s with its acceleration layer — no pull, no extraction, no kernel module"
    )


def _attach(ref: str, trace: str, dest: str) -> None:
    """Push ``ref`` again as ``dest`` with ``trace`` as its acceleration layer (obd trace attach)."""
    # Loaded only when the demo runs (see python_demo).
    from obd.image.assemble import push_trace_image
    from obd.image.remote import RemoteOptions

    remote = RemoteOptions(insecure=True, no_cache=True)
    with open(trace, "rb") as f:
        data = f.read()
    res = remote.runner.run(push_trace_image(remote.client(), ref, data, dest), 120)
    print(f"    {dest}@{res.digest}: the same layers plus a {len(data)}-byte trace on top")


def _indented(write: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Prefix the command's output lines with ``  | `` so they stand out from the demo's own."""
    state = {"bol": True}

    def out(chunk: bytes) -> None:
        if not chunk:
            return
        text = (b"  | " if state["bol"] else b"") + chunk.replace(b"\n", b"\n  | ")
        state["bol"] = chunk.endswith(b"\n")
        write(text[:-4] if state["bol"] else text)

    return out
