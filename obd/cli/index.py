"""``obd index``: build (and push) the lazy-read index of a plain OCI image, without running it."""

from __future__ import annotations

import argparse
import sys

from obd.cli.common import add_remote_args, print_stats, remote_options
from obd.errors import ConfigError
from obd.observability.progress import human_bytes

DESCRIPTION = """\
Build the file-system index of a plain OCI/Docker image (gzip or uncompressed tar layers), the way
obd run/nbd/mount/export build it on first use: each layer is streamed once and gets a turboOCI-style
meta layer (its ext4 metadata, file data mapped onto the original tar) plus, for gzip, a gzip index
of seek points. The result is cached locally, keyed by the chain of layer digests.

With --push the index is also pushed to the image's repository as an OCI artifact (artifactType
application/vnd.containerd.overlaybd.turbo.v1+json, subject = the image manifest) and linked with
the referrers tag fallback sha256-<manifest hex>, so that another machine started with
--allow-referrers reads the image lazily from its first run, like `soci create` + `soci push`.
The artifact format, and which parts are byte-compatible with overlaybd's turboOCI, is in
docs/index.md.

examples:
  obd index registry.example.com/app:1.0
  obd index --push localhost:5000/app:1.0 --insecure-registry localhost:5000
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build (and --push) the lazy-read index of a plain OCI image",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("reference", metavar="REF", help="the plain image: [HOST/]REPO[:TAG|@DIGEST]")
    p.add_argument("--push", action="store_true", help="push the index artifact to the image's repository")
    add_remote_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: obd.image.remote pulls aiohttp (~110 ms) into every obd command that lists its options
    from obd.image.remote import resolve_image
    from obd.turbo import is_plain_image
    from obd.turbo.artifact import TIMEOUT, push_index_artifact
    from obd.turbo.remote import ensure_meta

    opts = remote_options(args)
    ref, image = resolve_image(args.reference, opts)
    if not is_plain_image(image):
        raise ConfigError(
            "an overlaybd image is read lazily as it is; obd index is for plain OCI images",
            path=args.reference,
        )
    metas = ensure_meta(ref, image, opts)
    size = sum(m.meta.stat().st_size + (m.gzip_index.stat().st_size if m.gzip_index else 0) for m in metas)
    print(
        f"indexed {args.reference} ({image.manifest_digest}): {len(metas)} layers, "
        f"{human_bytes(size)} of index for {human_bytes(sum(m.size for m in metas))} of layers",
        file=sys.stderr,
    )
    if args.push:
        client = opts.client(ref.api_host if opts.is_http(ref.api_host) else None)
        pushed = opts.runner.run(push_index_artifact(client, ref, image, metas), TIMEOUT)
        print(
            f"pushed index artifact {pushed.digest} ({pushed.layers} layers, {human_bytes(pushed.bytes)}), "
            f"linked by tag {pushed.tag}",
            file=sys.stderr,
        )
        print(pushed.digest)
    print_stats(args)
    return 0
