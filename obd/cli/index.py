"""``obd index``: build (and push) the lazy-read index of a plain OCI image, without running it."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from obd.cli.common import add_progress_arg, add_remote_args, print_stats, remote_options
from obd.observability.progress import human_bytes

if TYPE_CHECKING:
    from obd.image.remote import RemoteOptions
    from obd.oci.model import Image
    from obd.registry.reference import Reference
    from obd.verify.pins import TablePin

DESCRIPTION = """\
Build the file-system index of a plain OCI/Docker image (gzip, zstd or uncompressed tar layers), the
way obd run/nbd/mount/export build it on first use: each layer is streamed once and gets a
turboOCI-style meta layer (its ext4 metadata, file data mapped onto the original tar) plus, for gzip,
a gzip index of seek points and, for zstd, an index of its frames (a zstd layer of one frame has no
seek point: it is kept decompressed in the cache instead). The result is cached locally, keyed by the
chain of layer digests, and re-checked against its recorded digests before each use.

With --push the index is also pushed to the image's repository as an OCI artifact (artifactType
application/vnd.containerd.overlaybd.turbo.v1+json, subject = the image manifest) and linked with
the referrers tag fallback sha256-<manifest hex>, so that another machine started with
--allow-referrers reads the image lazily from its first run, like `soci create` + `soci push`.
The artifact format, and which parts are byte-compatible with overlaybd's turboOCI, is in
docs/index.md.

Every layer also gets a sha256 digest table (one digest per 64 KiB block, built while the layer is
streamed and its digest checked), kept in the cache: later lazy reads check every block against it
(--verify=auto|require, docs/verify.md). --push puts the tables in the artifact. For an overlaybd
image whose manifest pins no tables, obd index builds only the tables (the image is left unchanged)
and --push publishes them in a table artifact linked the same way.

With --link TAG, an image index is pushed at TAG holding the image's manifest descriptor annotated
with the artifact's digest (io.github.obd.turbo.index-digest): whoever runs REPO:TAG, or pins that
index by digest, gets the image and its index together, with no trust in a mutable tag fallback.
For a multi-platform REF the link keeps every platform of REF's index; --platform picks the one
indexed (default: this machine's), --all-platforms indexes each of them (like soci create
--all-platforms). stdout gets each artifact's digest, then the link's; --quiet leaves only those.

examples:
  obd index registry.example.com/app:1.0
  obd index --push localhost:5000/app:1.0 --insecure-registry localhost:5000
  obd index --link 1.0-lazy localhost:5000/app:1.0 --insecure-registry localhost:5000
  obd index --all-platforms --link 1.0-lazy localhost:5000/app:1.0 --insecure-registry localhost:5000
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
    p.add_argument(
        "--link",
        metavar="TAG",
        help="also push, at TAG of the image's repository, an image index whose descriptor of the image "
        "carries the artifact's digest (a strong link, as SOCI index manifest v2: pulling TAG, or that "
        "index by digest, finds the index without --allow-referrers); implies --push",
    )
    p.add_argument(
        "--all-platforms",
        action="store_true",
        help="index every platform of a multi-platform REF (default: the one --platform picks)",
    )
    add_progress_arg(p)
    add_remote_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: obd.image.remote costs ~80 ms to import into every obd command that lists its options
    from obd.image.remote import resolve_image
    from obd.turbo import is_plain_image
    from obd.turbo.artifact import TIMEOUT, push_link

    opts = remote_options(args)
    ref, image = resolve_image(args.reference, opts)
    quiet = bool(getattr(args, "quiet", False))
    say = (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    targets = _platform_images(args, opts, ref, image) if args.all_platforms else [image]
    if len(targets) == 1 and not is_plain_image(targets[0]):
        return _index_overlaybd(args, opts, ref, targets[0], quiet=quiet)
    artifacts: dict[str, str] = {}
    for one in targets:
        if not is_plain_image(one):
            say(f"{one.reference}: an overlaybd image, read lazily as it is; not indexed here")
            continue
        digest = _index_plain(args, opts, ref, one, quiet=quiet)
        if digest is not None:
            artifacts[one.manifest_digest] = digest
    if args.link:
        client = opts.client(ref.api_host if opts.is_http(ref.api_host) else None)
        linked = opts.runner.run(push_link(client, ref, image, artifacts, args.link), TIMEOUT)
        say(
            f"pushed image index {ref.name}:{args.link}@{linked} linking {len(artifacts)} "
            f"image{'s' if len(artifacts) != 1 else ''} to {'their' if len(artifacts) != 1 else 'its'} "
            "index artifact"
        )
        print(linked)
    print_stats(args)
    return 0


def _platform_images(
    args: argparse.Namespace, opts: RemoteOptions, ref: Reference, image: Image
) -> list[Image]:
    """Each platform's image of the multi-platform index ``ref`` names, in its order (attestation
    manifests, whose platform is unknown/unknown, left out); ConfigError if ``ref`` names one image."""
    from obd.errors import ConfigError
    from obd.image.remote import resolve_image
    from obd.oci.model import MANIFEST_TYPES

    if not isinstance(image.index, dict):
        raise ConfigError(
            "--all-platforms needs a multi-platform image (an image index)", path=args.reference
        )
    out = []
    for d in image.index.get("manifests") or []:
        if not isinstance(d, dict) or d.get("mediaType", "") not in (*MANIFEST_TYPES, ""):
            continue
        if d.get("digest") == image.manifest_digest:
            out.append(image)
            continue
        platform = d.get("platform")
        if isinstance(platform, dict) and platform.get("os", "unknown") != "unknown":
            out.append(resolve_image(str(ref.with_target(digest=str(d.get("digest")))), opts)[1])
    return out


def _index_plain(
    args: argparse.Namespace, opts: RemoteOptions, ref: Reference, image: Image, *, quiet: bool
) -> str | None:
    """Build (and with --push or --link, push) the index of the plain image ``image``; the pushed
    artifact's digest, else None."""
    from obd.oci.model import config_platform
    from obd.turbo.artifact import TIMEOUT, push_index_artifact
    from obd.turbo.remote import ensure_meta
    from obd.verify.index import build_layer_tables, table_bytes

    say = (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    metas = ensure_meta(ref, image, opts, quiet=quiet)
    size = sum(m.meta.stat().st_size + (m.gzip_index.stat().st_size if m.gzip_index else 0) for m in metas)
    layer_bytes = sum(m.size for m in metas)
    platform = "/".join(config_platform(image.config).values())
    say(
        f"indexed {image.reference} ({platform}, {image.manifest_digest}): {len(metas)} layers, "
        f"{human_bytes(size)} of index for {human_bytes(layer_bytes)} of layers"
    )
    pins = build_layer_tables(ref, [(m.digest, m.size) for m in metas], opts, quiet=quiet)
    if not quiet:
        _say_tables(pins, layer_bytes)
    if not (args.push or args.link):
        return None
    client = opts.client(ref.api_host if opts.is_http(ref.api_host) else None)
    tables = table_bytes(opts, pins)
    pushed = opts.runner.run(push_index_artifact(client, ref, image, metas, tables), TIMEOUT)
    say(
        f"pushed index artifact {pushed.digest} ({pushed.layers} layers, {human_bytes(pushed.bytes)}, "
        f"{len(tables)} digest tables), linked by tag {pushed.tag}"
    )
    print(pushed.digest)
    return pushed.digest


def _say_tables(pins: dict[str, TablePin], layer_bytes: int) -> None:
    table = sum(p.size for p in pins.values())
    print(
        f"digest tables: {len(pins)} layers, {human_bytes(table)} for {human_bytes(layer_bytes)} "
        f"({100 * table / max(1, layer_bytes):.3f} %), kept in the cache",
        file=sys.stderr,
    )


def _index_overlaybd(
    args: argparse.Namespace, opts: RemoteOptions, ref: Reference, image: Image, *, quiet: bool
) -> int:
    """An overlaybd image is read lazily as it is; what it may lack is digest tables: build those of
    the layers its manifest pins none for, and with --push publish them in a linked table artifact."""
    from obd.verify.index import build_layer_tables, push_linked_tables, table_bytes
    from obd.verify.pins import layer_pins

    pinned = layer_pins(((d.digest, d.annotations) for d in image.layers), path=args.reference)
    todo = [(d.digest, d.size) for d in image.layers if d.digest not in pinned]
    layer_bytes = sum(size for _, size in todo)
    if not todo:
        print(f"{args.reference}: the manifest pins a digest table for every layer", file=sys.stderr)
        print_stats(args)
        return 0
    pins = build_layer_tables(ref, todo, opts, quiet=quiet)
    _say_tables(pins, layer_bytes)
    if args.push:
        client = opts.client(ref.api_host if opts.is_http(ref.api_host) else None)
        tables = table_bytes(opts, pins)
        digest = opts.runner.run(push_linked_tables(client, ref, image, tables), 600)
        print(f"pushed digest-table artifact {digest} ({len(tables)} tables)", file=sys.stderr)
        print(digest)
    print_stats(args)
    return 0
