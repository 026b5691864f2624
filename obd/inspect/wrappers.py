"""Describers of the wrappers around an LSMT layer: the ZFile (both records) and the tar envelope.

Each ``describe_*`` takes an open engine object and returns a JSON-ready dict and a list of warnings.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def digest_status(rec: Any) -> str:
    """``"absent"`` (digest flag clear), ``"valid"`` or ``"bad"`` for a ZFile record."""
    if not rec.digest_enabled:
        return "absent"
    return "valid" if rec.digest_valid else "bad"


def describe_zfile_record(rec: Any) -> dict[str, Any] | None:
    """A ZFile header or trailer record (:class:`obd.zfile.ZFileRecord`) as a dict."""
    if rec is None:
        return None
    out = rec.as_dict()
    out["algorithm_id"] = rec.algorithm
    out["digest_status"] = digest_status(rec)
    out["nonzero_padding"] = bool(rec.raw is not None and any(rec.raw[96:]))
    return out


def describe_zfile(z: Any) -> tuple[dict[str, Any], list[str]]:
    """A ZFile (:class:`obd.zfile.ZFileReader`): the options in use, sizes, block statistics, both records."""
    warnings: list[str] = []
    lengths = np.asarray(z.compressed_lengths, dtype=np.int64)
    n = int(z.block_count)
    blocks = None
    if n:
        full = np.full(n, z.block_size, dtype=np.int64)
        full[-1] = z.block_length(n - 1)
        blocks = {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
            "mean": float(lengths.mean()),
            "total": int(lengths.sum()),
            "not_smaller": int((lengths >= full).sum()),
        }
    header = describe_zfile_record(z.header)
    trailer = describe_zfile_record(z.trailer)
    for name, rec in (("header", z.header), ("trailer", z.trailer)):
        if rec is None:
            continue
        if rec.garbage_flag_bits:
            warnings.append(
                f"ZFile {name} flags 0x{rec.flags:x} have garbage high bits 0x{rec.garbage_flag_bits:x} "
                "(an old writer; only the low 6 bits mean anything)"
            )
        if rec.digest_enabled and not rec.digest_valid:
            warnings.append(
                f"ZFile {name} digest 0x{rec.digest:08x} does not match its record"
                + (" (overlaybd never checks the trailer's)" if name == "trailer" else "")
            )
    if z.trailer is None:
        warnings.append("ZFile trailer missing or unreadable (not needed: the header was overwritten)")
    elif z.header.header_overwritten:
        fields = ("index_offset", "index_size", "original_file_size", "index_crc")
        differ = [f for f in fields if getattr(z.header, f) != getattr(z.trailer, f)]
        if differ:
            warnings.append(f"ZFile header and trailer disagree on {', '.join(differ)} (the header is used)")
    compressed = int(z.compressed_size)
    out = {
        "record_used": z.record_kind,
        "algorithm": z.algorithm_name,
        "algorithm_id": int(z.algorithm),
        "block_size": int(z.block_size),
        "verify": bool(z.verify_flag),
        "block_count": n,
        "index_offset": int(z.record.index_offset),
        "index_crc": int(z.record.index_crc),
        "index_crc_checked": bool(z.record.digest_enabled),
        "compressed_size": compressed,
        "original_size": int(z.original_size),
        "ratio": (int(z.original_size) / compressed) if compressed else None,
        "compressed_blocks": blocks,
        "header": header,
        "trailer": trailer,
    }
    return out, warnings


def describe_envelope(env: Any) -> tuple[dict[str, Any], list[str]]:
    """A tar envelope (:class:`obd.formats.tar_envelope.TarEnvelope`)."""
    warnings: list[str] = []
    head = env.header
    padding = -env.end_offset % 512
    out = {
        "entry_name": env.name,
        "mode": int(env.mode),
        "uid": int(head.uid),
        "gid": int(head.gid),
        "uname": head.uname.decode("utf-8", "replace"),
        "gname": head.gname.decode("utf-8", "replace"),
        "mtime": int(head.mtime),
        "headers": [
            {
                "offset": int(h.offset),
                "typeflag": h.typeflag.decode("latin-1"),
                "name": h.name.decode("utf-8", "replace"),
            }
            for h in env.headers
        ],
        "pax_records": dict(env.pax_records),
        "global_records": dict(env.global_records),
        "payload_offset": int(env.payload_offset),
        "payload_size": int(env.payload_size),
        "overlaybd_offset": int(env.overlaybd_offset),
        "trailing_size": int(env.trailing_size),
        "trailing_padding": padding,
        "trailing_extra": int(env.trailing_size) - padding - 1024,
    }
    if env.overlaybd_offset != env.payload_offset:
        warnings.append(
            f"overlaybd reads the payload at offset {env.overlaybd_offset} (it assumes a one-block PAX "
            f"record), but it starts at {env.payload_offset}"
        )
    return out, warnings
