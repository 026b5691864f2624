"""``obd snapshot`` and ``obd fork``: commit a served image's writes, or branch off a committed state.

The upper-directory layout they work on is described in :mod:`obd.image.upper`.
"""

from __future__ import annotations

import argparse
import os
import sys

from obd.cli.common import progress
from obd.cli.output_args import add_output_args, output_options
from obd.errors import ConfigError, ObdError
from obd.image.resolve import image_config, image_label
from obd.image.upper import CONFIG_NAME, UpperDir
from obd.observability.progress import human_bytes

SNAPSHOT_DESCRIPTION = """\
Seal the live RW layer of an upper directory into a new read-only layer (DIR/layers/G.commit) and
start an empty RW layer on top of it. The device reads the same before and after; later writes go
to the new RW layer, and the snapshot layer can be stacked, exported, merged or pushed like any
other layer. The directory must not be in use: stop the nbd server, unmount the FUSE file, or
let `obd run` end first.

An upper directory is made by the nbd server on first use (obd nbd IMAGE --upper DIR) or by
`obd fork`; see docs/nbd.md for its layout.

examples:
  obd snapshot vm1.upper -m "after apt-get install"
  obd snapshot -z vm1.upper          # ZFile lz4 layer
  obd snapshot --list vm1.upper
"""

FORK_DESCRIPTION = """\
Make a new upper directory NEW over a committed state: over SOURCE's base image and snapshots
(SOURCE an upper directory; its uncommitted writes are not included: snapshot first), or over an
image (layer files lowest first, a config.v1.json, or oci:DIR[:TAG]). The new directory shares
SOURCE's layer files by path. SOURCE may be in use while it is forked.

examples:
  obd snapshot vm1.upper && obd fork vm1.upper vm2.upper
  obd fork base.commit app.commit --new vm3.upper --sparse
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshot",
        help="seal an upper directory's RW layer into a layer and start a fresh one",
        description=SNAPSHOT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="the upper directory")
    p.add_argument("--list", action="store_true", help="list the snapshots and exit")
    add_output_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_snapshot)

    f = sub.add_parser(
        "fork",
        help="start a new upper directory over a committed state",
        description=FORK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("source", nargs="+", metavar="SOURCE", help="an upper directory, or an image")
    f.add_argument("--new", metavar="NEW", help="the new upper directory (default: the last argument)")
    flavour = f.add_mutually_exclusive_group()
    flavour.add_argument("--sparse", dest="sparse", action="store_true", default=None, help="sparse RW layer")
    flavour.add_argument("--append", dest="sparse", action="store_false", help="append-mode RW layer")
    f.add_argument("--platform", help="platform of a multi-platform oci: image (default: this machine's)")
    f.set_defaults(func=run_fork)


def run_snapshot(args: argparse.Namespace) -> int:
    ud = UpperDir(args.dir)
    if args.list:
        cfg = ud.load()
        meta = ud.meta(cfg)
        for s in meta.get("snapshots", []):
            print(f"{s['file']}\t{s['uuid']}\t{s.get('time', '')}\t{s.get('message', '')}")
        print(f"live: generation {meta['generation']} ({'sparse' if meta['sparse'] else 'append'})")
        return 0
    opts = output_options(args)
    if args.parent_uuid:
        raise ObdError("--parent-uuid: a snapshot's parent is always the layer below it")
    ud.load()  # a clear error for a directory that is not an upper directory, before locking it
    with ud.locked(), progress(args, "snapshot") as prog:
        entry = ud.snapshot(options=opts, message=args.message, uuid=args.uuid, progress_cb=prog.update)
    if not args.quiet:
        print(
            f"snapshot {os.path.join(ud.path, entry['file'])}: {human_bytes(entry['bytes'])}, "
            f"{human_bytes(entry['data_bytes'])} of data, uuid {entry['uuid']}",
            file=sys.stderr,
        )
    return 0


def run_fork(args: argparse.Namespace) -> int:
    sources = list(args.source)
    if args.new:
        new = args.new
    else:
        if len(sources) < 2:
            raise ObdError("give SOURCE... NEW (or --new NEW)")
        new = sources.pop()
    if os.path.exists(os.path.join(new, CONFIG_NAME)):
        raise ConfigError("already an upper directory", path=new)
    src = UpperDir(sources[0]) if len(sources) == 1 else None
    if src is not None and os.path.isdir(src.path) and src.exists():
        if src.has_uncommitted_data():
            print(
                f"obd: note: {src.path} has writes after its last snapshot; the fork does not include them",
                file=sys.stderr,
            )
        made = src.fork(new, sparse=args.sparse)
    else:
        made = UpperDir(new)
        with made.locked():
            made.create(
                image_config(sources, platform=args.platform),
                image=image_label(sources),
                sparse=bool(args.sparse),
            )
    meta = made.meta(made.load())
    print(
        f"new upper directory {made.path}: {meta['base_layers']} layer(s) below, "
        f"{'sparse' if meta['sparse'] else 'append'} RW layer",
        file=sys.stderr,
    )
    return 0
