"""``obd push``: put an overlaybd image (layer files or an OCI layout) into a registry."""

from __future__ import annotations

import argparse
import os
import sys

from obd.cli.common import add_remote_args, remote_options
from obd.errors import ObdError

DESCRIPTION = """\
Push an overlaybd image to a registry, blobs byte for byte (never recompressed, annotations kept):

  obd push oci:DIR[:TAG] REF        an image from an OCI layout (manifest lists too)
  obd push LAYER... REF             layer files, lowest first, as a new overlaybd image whose layers
                                    carry the containerd.io/snapshot/overlaybd/* annotations

Blobs the registry already has are skipped; uploads use a single PUT, or chunked PATCHes for
large blobs. Registry options (credentials, --insecure-registry, TLS) are described in
docs/registry.md.

examples:
  obd push oci:./layout:latest localhost:5000/app:1.0 --insecure-registry localhost:5000
  obd push base.commit layer1.commit registry.example.com/team/app:v2
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="push an overlaybd image to a registry",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="IMAGE", help="oci:DIR[:TAG], or layer files lowest first")
    p.add_argument("reference", metavar="REF", help="where to push: [HOST/]REPO[:TAG]")
    add_remote_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the registry client (aiohttp, ~110 ms) loads only when obd push runs, not for every obd command
    from obd.image.assemble import push_files_image
    from obd.registry.push import push_layout

    opts = remote_options(args)
    client = opts.client()
    if args.sources[0].startswith("oci:"):
        if len(args.sources) != 1:
            raise ObdError("an oci:DIR[:TAG] image is pushed alone")
        coro = push_layout(client, args.sources[0], args.reference)
    else:
        for path in args.sources:
            if not os.path.isfile(path):
                raise ObdError("no such layer file", path=path)
        coro = push_files_image(client, args.sources, args.reference)
    result = opts.runner.run(coro, 3600)
    print(
        f"pushed {result.reference} ({result.digest}): {len(result.uploaded)} blobs uploaded, "
        f"{len(result.existing)} already there, {len(result.mounted)} mounted",
        file=sys.stderr,
    )
    print(result.digest)
    return 0
