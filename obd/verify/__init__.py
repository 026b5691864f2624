"""Verified lazy reads: per-block SHA-256 digest tables pinned by the image manifest (docs/verify.md)."""

from obd.verify.format import DEFAULT_BLOCK_SIZE, DigestTable, build_table, build_table_file
from obd.verify.verifier import MISMATCHES, REFETCHES, VERIFIED_BLOCKS, VERIFIED_BYTES, VerifiedSource

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MISMATCHES",
    "REFETCHES",
    "VERIFIED_BLOCKS",
    "VERIFIED_BYTES",
    "DigestTable",
    "VerifiedSource",
    "build_table",
    "build_table_file",
]
