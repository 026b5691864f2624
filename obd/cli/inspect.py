"""``obd inspect``: what a blob, an RW layer or a stack of layers is made of."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from obd.cli.common import add_remote_args, print_stats, remote_options
from obd.errors import ObdError
from obd.image.resolve import image_config, looks_like_reference
from obd.inspect.lsmt import VARIANT_TEXT
from obd.inspect.plot import plot_layout
from obd.inspect.report import inspect_files
from obd.observability.progress import human_bytes
from obd.verify.coverage import coverage, coverage_summary
from obd.verify.pins import config_pins, describe

DESCRIPTION = """\
Describe overlaybd files from the outside in: the tar envelope, the ZFile (both records, flags by
name, options, compression statistics), the LSMT layer (header and trailer, identity, index slots,
on-disk tags, bytes mapped to data / zeroed / unmapped, garbage in the data area, fragmentation),
RW data and index files (the replayed index, overwritten bytes, the hole map of sparse layers).

With two or more layers (lowest first), or --config, it also describes the stack: the uuid chain
(a broken link is a warning; overlaybd never checks it), the virtual size, and how many bytes of
the merged device each layer supplies as data and as zeros.

An append-mode RW data file finds its index file by itself when a sibling named with "data"
replaced by "index" exists and has the same uuid (writable_data -> writable_index, L2.data ->
L2.index); otherwise give both with --upper DATA INDEX. An RW data file given as the last FILE is
the stack's upper layer.

examples:
  obd inspect layer.commit
  obd inspect base.commit layer1.commit layer2.commit --plot layers.png
  obd inspect --config config.v1.json --json > report.json
  obd inspect L0.commit L1.commit --upper writable_data writable_index
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="describe blobs, RW layers and stacks (fields, flags, space, garbage, fragmentation)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="blobs or RW files, lowest layer first (e.g. base.commit layer1.commit)",
    )
    p.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="describe the layers of an overlaybd config.v1.json (its lowers and upper) instead of FILEs; "
        "e.g. --config /var/lib/overlaybd/dev1/config.v1.json",
    )
    p.add_argument(
        "--upper",
        nargs="+",
        metavar=("DATA", "INDEX"),
        help="an RW layer on top: its data file and, unless sparse, its index file; e.g. "
        "--upper writable_data writable_index",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON document (sizes in bytes; keys in docs/inspect.md)",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw where each layer's mappings lie across the device into a PNG "
        "(needs matplotlib: the 'plot' extra); e.g. --plot layers.png",
    )
    add_remote_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    files, config, remote = list(args.files), args.config, None
    if (
        len(files) == 1
        and not os.path.exists(files[0])
        and (files[0].startswith("oci:") or looks_like_reference(files[0]))
    ):
        # an image name rather than a file: oci:DIR[:TAG] or a registry reference
        remote = remote_options(args)
        config = image_config(files[0], platform=remote.platform, remote=remote)
        files = []
    inspection = inspect_files(files, config=config, upper=args.upper, remote=remote)
    if remote is not None and config is not None and not isinstance(config, str):
        pins = config_pins(config)
        inspection.report["verification"] = {
            "tables": {d: p.as_json() for d, p in pins.items()},
            "layers": len(config.lowers),
            "mode": remote.verify,
            "summary": describe(pins, len(config.lowers)),
            "coverage": coverage(config),  # docs/verify.md: what else is checked, and how
        }
    print_stats(args)
    if args.plot:
        if inspection.layout is None:
            raise ObdError("nothing to plot: none of the files is an LSMT layer", field="plot")
        plot_layout(inspection.layout, args.plot)
    if args.json:
        json.dump(inspection.report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(inspection.report))
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# --- rendering -----------------------------------------------------------------------------------

LABEL = 16


def size(n: int | None) -> str:
    """``67108864`` → ``64.0 MiB (67108864 B)``; small values in bytes only."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n} B"
    return f"{human_bytes(n)} ({n} B)"


def pow2(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}"
        n //= 1024
    raise AssertionError("unreachable")


def number(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def head(self, text: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines.append(text)

    def row(self, label: str, value: str, indent: int = 2) -> None:
        pad = " " * indent
        self.lines.append(f"{pad}{label:<{LABEL - indent}} {value}".rstrip())

    def more(self, value: str) -> None:
        self.lines.append(f"{'':<{LABEL}} {value}".rstrip())

    def table(self, rows: Iterable[Iterable[str]], indent: int = 2, *, align: bool = False) -> None:
        """Left-aligned columns; ``align`` starts the second column where :meth:`row` values start."""
        grid = [list(r) for r in rows]
        widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
        if align:
            widths[0] = max(widths[0], LABEL - indent - 1)
        for r in grid:
            cells = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
            self.lines.append((" " * indent + "  ".join(cells)).rstrip())

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(report: dict[str, Any]) -> str:
    """The human-readable form of an :func:`obd.inspect.report.inspect_files` report."""
    out = _Out()
    for f in report["files"]:
        _file(out, f)
    if report["stack"] is not None:
        _stack(out, report["stack"])
    for note in report["notes"]:
        out.head(f"note: {note}")
    if report.get("verification"):
        v = report["verification"]
        out.head(f"verification: {v['summary']} [--verify={v['mode']}]")
        parts = v.get("coverage") or []
        if parts:
            out.row("coverage", coverage_summary(parts))
            for e in parts:
                out.row(e["part"], f"[{e['verified']}] {e['what']}: {e['check']}", 4)
    return out.text()


def _warnings(out: _Out, warnings: list[str]) -> None:
    for w in warnings:
        out.lines.append(f"  warning: {w}")


def _file(out: _Out, f: dict[str, Any]) -> None:
    out.head(f"== {f['path']}")
    out.row("size", size(f["size"]), 0)
    out.row("kind", f["description"], 0)
    if f["tar"]:
        _tar(out, f["tar"])
    if f["zfile"]:
        _zfile(out, f["zfile"])
    if f["lsmt"]:
        _lsmt(out, f["lsmt"])
    if f["rw_data"]:
        _rw_data(out, f["rw_data"])
    if f["rw_index"]:
        _rw_index(out, f["rw_index"])
    if f["warnings"]:
        out.lines.append("")
        _warnings(out, f["warnings"])


def _tar(out: _Out, t: dict[str, Any]) -> None:
    out.head("tar envelope")
    out.row("entry", f"{t['entry_name']}, mode 0{t['mode']:o}, uid {t['uid']} gid {t['gid']}")
    out.more(f"uname {t['uname'] or '-'} gname {t['gname'] or '-'}, mtime {t['mtime']}")
    out.row("headers", ", ".join(f"'{h['typeflag']}' {h['name']} @{h['offset']}" for h in t["headers"]))
    pax = ", ".join(f"{k}={v}" for k, v in t["pax_records"].items()) or "-"
    out.row("pax records", pax)
    if t["global_records"]:
        out.row("global records", ", ".join(f"{k}={v}" for k, v in t["global_records"].items()))
    out.row("payload", f"at {t['payload_offset']}, {size(t['payload_size'])}")
    if t["overlaybd_offset"] != t["payload_offset"]:
        out.more(f"(overlaybd would read it at {t['overlaybd_offset']})")
    trail = f"{t['trailing_size']} B: {t['trailing_padding']} B padding + 1024 B end-of-archive"
    if t["trailing_extra"]:
        trail += f" {'+' if t['trailing_extra'] > 0 else '-'} {abs(t['trailing_extra'])} B extra"
    out.row("trailing", trail)


def _zfile(out: _Out, z: dict[str, Any]) -> None:
    out.head("zfile")
    out.row(
        "algorithm",
        f"{z['algorithm']} (algo {z['algorithm_id']}), {pow2(z['block_size'])} blocks, "
        f"verify {'on (CRC32C after each block)' if z['verify'] else 'off'}",
    )
    checked = "checked" if z["index_crc_checked"] else "not checked (digest flag clear)"
    crc = f"CRC 0x{z['index_crc']:08x} {checked}"
    out.row("blocks", f"{z['block_count']}, index at {z['index_offset']}, {crc}")
    ratio = f", ratio {z['ratio']:.2f}" if z["ratio"] is not None else ""
    out.row("size", f"{size(z['original_size'])} → {size(z['compressed_size'])}{ratio}")
    b = z["compressed_blocks"]
    if b:
        out.row(
            "block bytes",
            f"min {b['min']} · median {number(b['median'])} · max {b['max']} · mean {b['mean']:.1f} "
            f"(compressed, without CRC)",
        )
        if b["not_smaller"]:
            out.more(f"{b['not_smaller']} block(s) did not shrink")
    used = z["record_used"]
    why = "header-overwritten: the trailer is not read" if used == "header" else "header not overwritten"
    out.row("record used", f"{used} ({why})")
    rows = [["", "header", "trailer"]]
    recs = [z["header"], z["trailer"]]

    def cells(fn: Any) -> list[str]:
        return [fn(r) if r is not None else "-" for r in recs]

    rows.append(["flags", *cells(lambda r: f"0x{r['flags']:x}")])
    rows.append(["flag names", *cells(lambda r: ",".join(r["flag_names"]) or "-")])
    rows.append(
        ["garbage bits", *cells(lambda r: f"0x{r['garbage_flag_bits']:x}" if r["garbage_flag_bits"] else "-")]
    )
    rows.append(["digest", *cells(lambda r: f"0x{r['digest']:08x} {r['digest_status']}")])
    rows.append(["index_offset", *cells(lambda r: str(r["index_offset"]))])
    rows.append(["index_size", *cells(lambda r: str(r["index_size"]))])
    rows.append(["original size", *cells(lambda r: str(r["original_file_size"]))])
    rows.append(["index_crc", *cells(lambda r: f"0x{r['index_crc']:08x}")])
    rows.append(["block_size", *cells(lambda r: str(r["block_size"]))])
    rows.append(["algo", *cells(lambda r: r["algorithm"])])
    rows.append(["level", *cells(lambda r: str(r["level"]))])
    rows.append(["dict", *cells(lambda r: f"use {r['use_dict']}, size {r['dict_size']}")])
    rows.append(["verify", *cells(lambda r: str(r["verify"]))])
    rows.append(["bytes 96..511", *cells(lambda r: "non-zero" if r["nonzero_padding"] else "zero")])
    out.table(rows, align=True)


def _record_rows(recs: list[dict[str, Any] | None], names: list[str]) -> list[list[str]]:
    def cells(fn: Any) -> list[str]:
        return [fn(r) if r is not None else "-" for r in recs]

    return [
        ["", *names],
        ["flags", *cells(lambda r: f"0x{r['flags']:02x} {','.join(r['flag_names'])}")],
        ["index_offset", *cells(lambda r: str(r["index_offset"]))],
        ["index_size", *cells(lambda r: str(r["index_size"]))],
        ["virtual_size", *cells(lambda r: str(r["virtual_size"]))],
        ["uuid", *cells(lambda r: r["uuid"])],
        ["parent_uuid", *cells(lambda r: r["parent_uuid"])],
        ["user_tag", *cells(lambda r: json.dumps(r["user_tag"], ensure_ascii=False))],
        ["version", *cells(lambda r: f"{r['version']}.{r['sub_version']}")],
        ["size", *cells(lambda r: str(r["size"]))],
    ]


def _space(out: _Out, s: dict[str, Any], label: str = "device") -> None:
    out.row(
        label,
        f"data {size(s['data_bytes'])} · zeroed {size(s['zero_bytes'])} · "
        f"unmapped {size(s['unmapped_bytes'])}",
    )
    if s["beyond_size_bytes"]:
        out.more(f"+ {size(s['beyond_size_bytes'])} mapped past {s['size']}")


def _fragmentation(out: _Out, fr: dict[str, Any], label: str = "mappings") -> None:
    longest = fr["longest"]
    text = f"{fr['entries']} entries ({fr['data_entries']} data, {fr['zero_entries']} zeroed)"
    if fr["entries"]:
        text += f", mean {size(round(fr['mean_bytes']))}"
    out.row(label, text)
    if longest:
        kind = "zeroed" if longest["zeroed"] else "data"
        out.more(f"longest {size(longest['length'])} {kind} at offset {longest['offset']}")
    buckets = [b for b in fr["histogram"] if b["count"]]
    if not buckets:
        return
    top = max(b["count"] for b in buckets)
    rows = []
    for b in buckets:
        lo, hi = b["min_sectors"] * 512, (b["max_sectors"] + 1) * 512
        bar = "#" * max(1, round(30 * b["count"] / top))
        rows.append([f"[{pow2(lo)}, {pow2(hi)})", str(b["count"]), bar])
    label = "lengths"
    for r in rows:
        out.row(label, "  ".join([r[0].ljust(max(len(x[0]) for x in rows)), r[1].rjust(7), r[2]]))
        label = ""


def _lsmt(out: _Out, m: dict[str, Any]) -> None:
    out.head(f"lsmt layer: {VARIANT_TEXT[m['variant']]}")
    out.table(_record_rows([m["header"], m["trailer"]], ["header", "trailer (used)"]), align=True)
    out.row("virtual size", size(m["virtual_size"]))
    i = m["index"]
    out.row(
        "index",
        f"{i['slots']} slots at {i['offset']}: {i['valid']} valid, {i['padding']} padding, "
        f"{i['empty']} empty → {i['entries']} mappings",
    )
    out.row("on-disk tags", " ".join(str(t) for t in i["tags_on_disk"]) or "-")
    _space(out, m["space"])
    s = m["storage"]
    text = (
        f"{size(s['data_area_bytes'])}: live {size(s['live_data_bytes'])}, garbage {size(s['garbage_bytes'])}"
    )
    out.row("data area", text)
    if s["remote_bytes"]:
        out.more(f"+ {size(s['remote_bytes'])} mapped into the turboOCI target")
    _fragmentation(out, m["fragmentation"])


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _records(out: _Out, r: dict[str, Any]) -> None:
    out.row(
        "log",
        f"{_count(r['records'], 'record')} ({r['invalid_records']} padding), "
        f"tags {' '.join(str(t) for t in r['record_tags']) or '-'}",
    )
    out.more(f"{_count(r['write_records'], 'write')} of {size(r['written_bytes'])} in total")
    out.more(f"{_count(r['trim_records'], 'trim')} of {size(r['trimmed_bytes'])} in total")


def _replay(out: _Out, p: dict[str, Any]) -> None:
    out.row("replayed", f"{p['entries']} mappings, highest end {size(p['max_end'])}")
    _space(out, p["space"])
    if p["garbage_bytes"] is not None:
        out.row(
            "data area",
            f"{size(p['data_area_bytes'])}: live {size(p['live_data_bytes'])}, "
            f"garbage (overwritten) {size(p['garbage_bytes'])}",
        )
    _fragmentation(out, p["fragmentation"])


def _rw_data(out: _Out, d: dict[str, Any]) -> None:
    out.head(f"rw data file: {d['mode']} mode")
    recs = [d["header"]] + ([d["index_header"]] if d["index_header"] else [])
    names = ["data header"] + (["index header (used)"] if d["index_header"] else [])
    out.table(_record_rows(recs, names), align=True)
    if d["index_file"]:
        how = {"sibling": "found next to the data file", "explicit": "given", "config": "from the config"}
        out.row("index file", f"{d['index_file']} ({how.get(d['pairing'], d['pairing'])})")
    if d["records"]:
        _records(out, d["records"])
    if d["replay"]:
        _replay(out, d["replay"])
    h = d["holes"]
    if h:
        out.row(
            "hole map",
            f"apparent {size(h['apparent_size'])}, allocated {size(h['allocated_bytes'])}, "
            f"{h['data_extents']} data extents → {h['entries']} mappings",
        )
        _space(out, h["space"])
        _fragmentation(out, h["fragmentation"])


def _rw_index(out: _Out, d: dict[str, Any]) -> None:
    out.head("rw index file" + (" (turboOCI)" if d["warp"] else ""))
    out.table(_record_rows([d["header"]], ["header"]), align=True)
    out.row("data file", d["data_file"] or "not found (garbage from the log alone)")
    _records(out, d["records"])
    _replay(out, d["replay"])


def _stack(out: _Out, s: dict[str, Any]) -> None:
    out.head(f"== stack: {s['layer_count']} layers, lowest first")
    rows = [["#", "role", "uuid", "parent_uuid", "chain", "file"]]
    for ly in s["layers"]:
        link = "-" if ly["parent_ok"] is None else "ok" if ly["parent_ok"] else "BROKEN"
        rows.append([str(ly["position"]), ly["role"], ly["uuid"], ly["parent_uuid"], link, ly["path"]])
    out.table(rows)
    src = s["virtual_size_from"]
    where = f", from layer {src} (the top-most non-zero)" if src is not None else " (no layer sets it)"
    out.row("virtual size", size(s["virtual_size"]) + where)
    out.row("uuid chain", "ok" if s["uuid_chain_ok"] else "broken (see warnings)")
    out.row(
        "device",
        f"data {size(s['data_bytes'])} · zeroed {size(s['zero_bytes'])} · unmapped {size(s['hole_bytes'])}",
    )
    out.lines.append("  contribution   bytes of the merged device each layer supplies")
    rows = [["#", "data", "zeroed", "hidden by layers above", "own mappings"]]
    for ly in s["layers"]:
        rows.append(
            [
                str(ly["position"]),
                size(ly["data_bytes"]),
                size(ly["zero_bytes"]),
                size(ly["hidden_bytes"]),
                str(ly["entries"]),
            ]
        )
    out.table(rows, LABEL + 1)
    _fragmentation(out, s["fragmentation"], "merged index")
    if s["warnings"]:
        out.lines.append("")
        _warnings(out, s["warnings"])
