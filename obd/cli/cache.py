"""``obd cache``: look at and trim the persistent block cache (``ls``, ``du``, ``prune``, ``clear``)."""

from __future__ import annotations

import argparse
import json
import time

from obd.cache.store import (
    DEFAULT_LIMIT,
    ENV_DIR,
    ENV_LIMIT,
    BlobEntry,
    CacheStore,
    check_digest,
    default_cache_dir,
    parse_size,
)
from obd.errors import ObdError
from obd.observability.progress import human_bytes

DESCRIPTION = f"""\
Inspect and trim the block cache that keeps the parts of remote layer blobs obd has read.

The cache lives in --cache-dir, else ${ENV_DIR}, else $XDG_CACHE_HOME/obd (~/.cache/obd).
Its size limit is --limit, else ${ENV_LIMIT}, else {human_bytes(DEFAULT_LIMIT)}. A process filling
the cache past its limit evicts whole blobs, least recently used first. Every command here is safe
while other obd processes use the cache: they fetch again whatever is removed.

examples:
  obd cache ls                       blobs, most recently used last
  obd cache du --json                totals against the limit, for scripts
  obd cache prune --to 2G            evict least recently used blobs until 2 GiB remain
  obd cache clear --digest 3f2a9c    drop one blob (a unique digest prefix is enough)
  obd cache clear                    drop everything
"""


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--limit``: for any command that opens the cache."""
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"the cache directory (default: ${ENV_DIR}, else $XDG_CACHE_HOME/obd: {default_cache_dir()})",
    )
    parser.add_argument(
        "--limit",
        metavar="SIZE",
        help=f"cache size limit, e.g. 512M, 10G (default: ${ENV_LIMIT}, else {human_bytes(DEFAULT_LIMIT)})",
    )


def store_from_args(args: argparse.Namespace) -> CacheStore:
    """The :class:`CacheStore` named by ``--cache-dir``/``--limit``, else the environment or defaults."""
    root = getattr(args, "cache_dir", None) or None
    limit = getattr(args, "limit", None)
    return CacheStore(root, limit_bytes=parse_size(limit) if limit else None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="list, measure, prune or clear the block cache of remote blobs",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    add_cache_args(common)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    actions = p.add_subparsers(dest="cache_command", metavar="ACTION")
    ls = actions.add_parser(
        "ls", parents=[common], help="list cached blobs (least recently used first)", description=LS_HELP
    )
    ls.add_argument("--no-trunc", action="store_true", help="show whole digests")
    actions.add_parser("du", parents=[common], help="total size of the cache against its limit")
    prune = actions.add_parser(
        "prune",
        parents=[common],
        help="evict least recently used blobs down to the limit",
        description="Remove broken entries, then whole blobs, least recently used first, until the "
        "cache fits the limit (or --to SIZE).",
    )
    prune.add_argument("--to", metavar="SIZE", help="evict down to SIZE instead of the limit")
    clear = actions.add_parser("clear", parents=[common], help="remove every cached blob (or one)")
    clear.add_argument(
        "--digest", metavar="DIGEST", help="only this blob (sha256:HEX or a unique hex prefix)"
    )
    p.set_defaults(func=run, cache_parser=p)


LS_HELP = """\
One line per cached blob: digest, blob size, bytes cached, share of the blob cached, bytes used on
disk and last use. Blobs whose page table is broken are listed with the problem; `obd cache prune`
removes them (and obd rebuilds them empty when it next opens the blob)."""


def run(args: argparse.Namespace) -> int:
    if not args.cache_command:
        args.cache_parser.print_help()
        return 2
    store = store_from_args(args)
    return {"ls": _ls, "du": _du, "prune": _prune, "clear": _clear}[args.cache_command](store, args)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _short(digest: str, full: bool) -> str:
    alg, _, hexd = digest.partition(":")
    return digest if full else f"{alg}:{hexd[:12]}"


def _ls(store: CacheStore, args: argparse.Namespace) -> int:
    entries = store.entries()
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"{store.root}: empty")
        return 0
    rows = [("DIGEST", "SIZE", "CACHED", "%", "ON DISK", "LAST USED")]
    for e in entries:
        if e.problem is not None:
            size = cached = pct = "-"
        else:
            assert e.blob_size is not None and e.present_bytes is not None
            size, cached = human_bytes(e.blob_size), human_bytes(e.present_bytes)
            pct = f"{100.0 * e.present_bytes / e.blob_size:.1f}" if e.blob_size else "100.0"
        row = (
            _short(e.digest, args.no_trunc),
            size,
            cached,
            pct,
            human_bytes(e.disk_bytes),
            _when(e.last_used),
        )
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r, shown in zip(rows, [None, *entries], strict=True):
        line = "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        if shown is not None and shown.problem is not None:
            line += f"  broken: {shown.problem}"
        print(line.rstrip())
    return 0


def _totals(store: CacheStore) -> dict:
    entries = store.entries()
    used = sum(e.disk_bytes for e in entries)
    return {
        "cache_dir": str(store.root),
        "blobs": len(entries),
        "broken": sum(e.problem is not None for e in entries),
        "disk_bytes": used,
        "cached_bytes": sum(e.present_bytes or 0 for e in entries),
        "limit_bytes": store.limit_bytes,
    }


def _du(store: CacheStore, args: argparse.Namespace) -> int:
    t = _totals(store)
    if args.json:
        print(json.dumps(t, indent=2))
        return 0
    share = f" ({100.0 * t['disk_bytes'] / t['limit_bytes']:.1f}%)" if t["limit_bytes"] else ""
    print(f"cache:   {t['cache_dir']}")
    print(f"blobs:   {t['blobs']}" + (f" ({t['broken']} broken)" if t["broken"] else ""))
    print(f"cached:  {human_bytes(t['cached_bytes'])} of blob data")
    print(f"on disk: {human_bytes(t['disk_bytes'])} of the {human_bytes(t['limit_bytes'])} limit{share}")
    return 0


def _report_removed(store: CacheStore, args: argparse.Namespace, verb: str, removed: list[BlobEntry]) -> None:
    freed = sum(e.disk_bytes for e in removed)
    left = store.usage()
    if args.json:
        doc = {
            verb: [e.as_dict() for e in removed],
            "freed_bytes": freed,
            "disk_bytes": left,
            "limit_bytes": store.limit_bytes,
        }
        print(json.dumps(doc, indent=2))
        return
    for e in removed:
        print(f"{verb} {e.digest} ({human_bytes(e.disk_bytes)})")
    print(
        f"{verb} {len(removed)} blob(s), freed {human_bytes(freed)}; {human_bytes(left)} left in {store.root}"
    )


def _prune(store: CacheStore, args: argparse.Namespace) -> int:
    target = parse_size(args.to) if args.to else None
    _report_removed(store, args, "evicted", store.prune(target))
    return 0


def _resolve_digest(store: CacheStore, text: str) -> str:
    """A full digest, or the one cached blob whose hex starts with ``text``."""
    try:
        return check_digest(text)
    except ObdError:
        pass
    alg, _, prefix = text.rpartition(":")
    prefix = prefix.lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise ObdError("not a digest or hex prefix", field="--digest", value=text)
    matches = [e.digest for e in store.entries(detail=False) if e.digest.partition(":")[2].startswith(prefix)]
    matches = [d for d in matches if not alg or d.startswith(alg + ":")]
    if len(matches) != 1:
        found = "no cached blob matches" if not matches else f"{len(matches)} cached blobs match"
        raise ObdError(f"{found} this prefix", field="--digest", value=text)
    return matches[0]


def _clear(store: CacheStore, args: argparse.Namespace) -> int:
    digest = _resolve_digest(store, args.digest) if args.digest else None
    _report_removed(store, args, "removed", store.clear(digest))
    return 0
