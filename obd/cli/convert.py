"""``obd convert``: turn an OCI/Docker image into an overlaybd image (docs/convert.md)."""

from __future__ import annotations

import argparse
import os
import sys

from obd.cli.common import add_remote_args, print_stats, remote_options
from obd.errors import ConfigError
from obd.observability.progress import Progress, human_bytes

DESCRIPTION = """\
Convert an image into an overlaybd image, one overlaybd layer per source layer, as
accelerated-container-image's convertor does: each layer tar is applied to ext4 (through
e2fsprogs' debugfs, never through the host file system), the blocks it changes are committed as a
tar-wrapped ZFile (lz4 by default) with a uuid derived from the chain id, and the manifest carries
the containerd.io/snapshot/overlaybd/* annotations that overlaybd's snapshotter, and obd, read.

SRC and DST use skopeo's transport syntax:
  docker://REF  or  REF         a registry image (layers fetched only when they must be converted)
  oci:DIR[:TAG]                 an OCI image layout (DST: created or updated)
  docker-archive:FILE[:REF]     a `docker save` tarball (SRC only; REF or @N picks one image)

Layers already converted with the same settings (same chain id) come from the conversion cache
under the obd cache directory (--cache-dir; see docs/convert.md).

examples:
  obd convert docker://localhost:5000/app:1 localhost:5000/app:1-obd --insecure-registry localhost:5000
  obd convert oci:./app-layout:latest oci:./obd-layout:latest --oci
  obd convert docker-archive:app.tar oci:./out:app --mkfs --vsize 16
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an OCI/Docker image into an overlaybd image",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", metavar="SRC", help="docker://REF, REF, oci:DIR[:TAG] or docker-archive:FILE[:REF]"
    )
    p.add_argument("destination", metavar="DST", help="docker://REF, REF or oci:DIR[:TAG]")
    p.add_argument("--fstype", default="ext4", help="file system of the layers (only ext4)")
    lower = p.add_mutually_exclusive_group()
    lower.add_argument(
        "--mkfs",
        action="store_true",
        help="make layer 0 on a fresh mkfs'd ext4 instead of stacking on the standard base layer",
    )
    lower.add_argument(
        "--base-layer",
        action="store_true",
        help="stack on overlaybd's standard 64 GiB base layer, pushed as the first layer (default)",
    )
    p.add_argument(
        "--vsize", type=int, metavar="GB", help="virtual size of the device with --mkfs (default 64)"
    )
    p.add_argument(
        "--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile compression (default lz4)"
    )
    p.add_argument(
        "--bs", type=int, default=4, metavar="KIB", help="ZFile block size in KiB: 4..64 (default 4)"
    )
    p.add_argument(
        "--verify-block-size",
        type=int,
        default=64,
        metavar="KIB",
        help="block size in KiB of the per-layer sha256 digest tables the manifest pins, which "
        "`--verify` checks reads against (docs/verify.md): 4..16384, default 64; 0 writes none",
    )
    p.add_argument(
        "--oci",
        action="store_true",
        help="OCI media types for manifest, config and layers (default: Docker's, as the convertor)",
    )
    p.add_argument(
        "--no-convert-cache", action="store_true", help="neither use nor fill the conversion cache"
    )
    p.add_argument("--no-fsck", action="store_true", help="skip the e2fsck -fn check after each layer")
    p.add_argument(
        "--no-mount", action="store_true", help="never ask the registry for cross-repository mounts"
    )
    p.add_argument("--workdir", metavar="DIR", help="scratch directory (default: the system temp dir)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_remote_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: obd.convert pulls the registry client (aiohttp, ~110 ms) into every obd command
    from obd.convert import ConvertOptions, convert_image

    if args.workdir and not os.path.isdir(args.workdir):
        raise ConfigError("--workdir must be an existing directory", path=args.workdir, field="workdir")
    remote = remote_options(args)
    options = ConvertOptions(
        fstype=args.fstype,
        mkfs=args.mkfs,
        vsize_gb=args.vsize,
        algorithm=args.algorithm,
        block_size=args.bs * 1024,
        verify_block_size=args.verify_block_size * 1024,
        oci=args.oci,
        platform=args.platform,
        cache_dir=args.cache_dir,
        use_cache=not args.no_convert_cache,
        check=not args.no_fsck,
        workdir=args.workdir,
        mount=not args.no_mount,
    )

    def bar(label: str, total: int | None) -> Progress:
        return Progress(label, total, quiet=args.quiet)

    result = convert_image(args.source, args.destination, options, remote=remote, progress=bar)
    if not args.quiet:
        for i, layer in enumerate(result.layers):
            what = "base layer" if layer.source_digest is None else f"from {layer.source_digest[:19]}"
            how = "cached" if layer.cached else "converted"
            line = f"  layer {i}: {layer.digest[:19]} {human_bytes(layer.size):>10} {how}, {what}"
            if layer.stats is not None and not layer.cached:
                s = layer.stats
                line += (
                    f" ({s.entries} entries, {human_bytes(s.changed_bytes)} of blocks changed; "
                    f"ext4 {s.ext4_seconds:.1f} s, compress {s.commit_seconds:.1f} s)"
                )
            print(line, file=sys.stderr)
        pushed = result.pushed
        extra = ""
        if pushed is not None:
            extra = (
                f"; {len(pushed.uploaded)} blobs uploaded, {len(pushed.existing)} already there, "
                f"{len(pushed.mounted)} mounted"
            )
        print(f"converted {result.source} -> {result.destination}{extra}", file=sys.stderr)
    print(result.manifest_digest)
    print_stats(args)
    return 0
