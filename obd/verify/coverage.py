"""What of an image is verified, and by what: the ``coverage`` part of ``obd inspect`` (docs/verify.md).

An image's bytes reach a reader through several parts, each checked its own way (or not):

* an overlaybd layer blob: every block against its **digest table** (pinned by the manifest, or
  kept locally by ``obd index``), or only by ZFile CRCs (an accident check) without one;
* the **acceleration layer** (a prefetch trace): no table; it is small and read whole, and the whole
  blob is checked against the digest the manifest pins before the trace is used;
* a plain image's data blobs: like overlaybd layers (tables built while indexing);
* a plain image's **base layer**: unpacked from obd's package, checked against the sha256 obd carries;
* a plain image's **meta layers** (``ext4.fs.meta``, ``gzip.meta``/``zstd.meta``) in the local
  cache: built here from digest-checked layer blobs, or fetched by digest from an index artifact
  whose subject is the image. Their sizes and sha256 are recorded beside them (``turbo.json``) and
  re-checked each time they are used. That record is written into the cache by the same process, so
  it catches damage, not someone who can write the cache directory: such a writer could also
  rewrite the record, or the locally kept tables. The cache is trusted as its directory is;
* a zstd layer's decompressed local copy: every block against the digest table made when it was
  decompressed from its digest-checked blob, kept beside it (hashed in the record like the meta
  files); a copy made before obd kept tables: its size only.

This module reads only the config and the meta records (no network); each entry is a small dict
``{"part", "what", "check", "verified"}`` with ``verified`` one of ``yes``, ``local`` (checked
against a record kept in the cache), ``no``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from obd.image.config import ImageConfig, LowerConfig
from obd.verify.pins import TablePin, config_pins

#: The acceleration layer's key in the ``obd`` metadata (obd.image.accel.META_KEY; not imported:
#: that module pulls in the trace decoder).
ACCEL_KEY = "trace_layer"
#: A meta directory's record (obd.turbo.remote.RECORD_NAME).
RECORD_NAME = "turbo.json"
BASE_NAME = "ext4_64"
#: Beside a local copy: its digest table (obd.verify.local.SIDECAR_SUFFIX).
SIDECAR_SUFFIX = ".sha256-table"


def _table(pin: TablePin | None) -> tuple[str, str]:
    if pin is None:
        return "none: no digest table (ZFile CRCs only, if any; --verify=require refuses it)", "no"
    return f"digest table {pin.digest[:19]}…, sha256 per {pin.block_size >> 10} KiB block", "yes"


def _record(meta_file: str) -> dict[str, Any] | None:
    try:
        obj = json.loads((Path(meta_file).parent / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _meta_entry(i: int, lower: LowerConfig) -> dict[str, str]:
    record = _record(lower.file)
    files = sorted((record or {}).get("files") or {})
    hashed = ", ".join(f for f in files if f.endswith(".meta")) or os.path.basename(lower.file)
    if record is None:
        check, verified = "no record of its files: not checked", "no"
    else:
        source = (
            f"fetched by digest from index artifact {str(record['artifact'])[:19]}…"
            if record.get("artifact")
            else "built here from the digest-checked layer blob"
        )
        check = (
            f"{source}; size and sha256 recorded in the cache and re-checked before each use "
            "(catches damage, not a writer of the cache)"
        )
        verified = "local"
    return {"part": f"lowers[{i}] meta", "what": hashed, "check": check, "verified": verified}


def coverage(cfg: ImageConfig) -> list[dict[str, str]]:
    """One entry per part of the image ``cfg`` describes: what it is, how it is checked, whether."""
    pins = config_pins(cfg)
    found = cfg.extra.get("obd")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    out: list[dict[str, str]] = []
    for i, lower in enumerate(cfg.lowers):
        part = f"lowers[{i}]"
        if lower.targetDigest or lower.targetFile:  # a plain image's meta layer over its blob
            out.append(_meta_entry(i, lower))
            if lower.gzipIndexDigest:  # gzip.meta read by ranges from the registry
                check, verified = _table(pins.get(lower.gzipIndexDigest))
                what = f"gzip index blob {lower.gzipIndexDigest[:19]}…"
                out.append({"part": f"{part} gzip index", "what": what, "check": check, "verified": verified})
            if lower.targetFile:
                tabled = os.path.isfile(lower.targetFile + SIDECAR_SUFFIX)
                out.append(
                    {
                        "part": f"{part} data",
                        "what": f"local decompressed copy {os.path.basename(lower.targetFile)}",
                        "check": "every 64 KiB block against the table made when it was decompressed"
                        if tabled
                        else "its size only",
                        "verified": "local" if tabled else "no",
                    }
                )
            else:
                check, verified = _table(pins.get(lower.targetDigest))
                what = f"layer blob {lower.targetDigest[:19]}…"
                out.append({"part": f"{part} data", "what": what, "check": check, "verified": verified})
        elif lower.digest:
            check, verified = _table(pins.get(lower.digest))
            what = f"layer blob {lower.digest[:19]}…"
            out.append({"part": part, "what": what, "check": check, "verified": verified})
        elif os.path.basename(lower.file) == BASE_NAME:
            check = "sha256 checked against the digest obd's package carries (once per process)"
            out.append({"part": part, "what": "base layer", "check": check, "verified": "yes"})
        else:
            what = lower.file or lower.dir
            out.append({"part": part, "what": f"local file {what}", "check": "none", "verified": "no"})
    accel = meta.get(ACCEL_KEY)
    if isinstance(accel, dict):
        out.append(
            {
                "part": "acceleration layer",
                "what": f"trace blob {str(accel.get('digest'))[:19]}…",
                "check": "whole blob against the digest the manifest pins, before the trace is used",
                "verified": "yes",
            }
        )
    return out


def coverage_summary(entries: list[dict[str, str]]) -> str:
    """``N of M parts verified (K against records in the cache)``."""
    yes = sum(e["verified"] == "yes" for e in entries)
    local = sum(e["verified"] == "local" for e in entries)
    text = f"{yes} of {len(entries)} parts verified"
    return text + (f", {local} checked against records kept in the cache" if local else "")


__all__ = ["coverage", "coverage_summary"]
